"""4-bit (NF4) training on the CPU computes the gradients of the same model with its weights dequantized.

bitsandbytes converts a 4-bit layer's weights to a packed CPU format the first time the layer runs in eval mode
without gradients (on CPUs with AVX512-BF16), and from then on multiplies with ``gemv_4bit``, which has no
backward: the gradient that flows back through every frozen 4-bit layer is then wrong, and so are the LoRA
gradients of every layer below the last. The backbone's load-time probe is such an eval forward.
"""

from __future__ import annotations

import pytest
import torch

FAMILY_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def world(tiny_world, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    return tiny_world


def _lora_model(base, tok, seed: int):
    from ilora_cli.encoders.io import load_encoder
    from ilora_cli.llm.model import ExpertConfig, ILoraModel, attach_lora

    encoder, _ = load_encoder("cyc-sasrec")
    cfg = ExpertConfig(experts=2, rank=4, dropout=0.0)  # no dropout: both models see the same activations
    torch.manual_seed(seed)
    return ILoraModel(attach_lora(base, cfg), tok, encoder, cfg)


def test_4bit_lora_gradients_equal_those_of_the_dequantized_model(world):
    bnb = pytest.importorskip("bitsandbytes")
    from ilora_cli.llm.backbone import BackboneSpec, load_backbone, prepare_for_training
    from ilora_cli.llm.prompt import PromptBuilder

    backbone = str(world / "tiny-backbone")
    base4, tok = load_backbone(BackboneSpec(backbone, load_in_4bit=True))  # its probe runs an eval forward
    base4 = prepare_for_training(base4)
    reference, _ = load_backbone(BackboneSpec(backbone))
    quantized = {n: m for n, m in base4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized and all(n.split(".")[-1] in FAMILY_WEIGHTS for n in quantized)
    with torch.no_grad():  # the reference: the same weights, dequantized; everything else copied as it is
        for name, module in quantized.items():
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            reference.get_submodule(name).weight.copy_(w.float())
        plain = dict(base4.named_parameters())
        for name, p in reference.named_parameters():
            if name.rsplit(".", 1)[0] not in quantized:
                p.copy_(plain[name].float())
    m4, ref = _lora_model(base4, tok, seed=3), _lora_model(reference, tok, seed=3)
    with torch.no_grad():  # B ≠ 0 in every layer, so that gradients flow through the frozen layers to A
        torch.manual_seed(4)
        for (n4, p4), (nr, pr) in zip(m4.named_parameters(), ref.named_parameters()):
            assert n4 == nr
            if p4.requires_grad:
                p4.copy_(torch.randn_like(p4) * 0.1 if "lora_B" in n4 else p4)
                pr.copy_(p4.float())
    builder = PromptBuilder(tok, [f"Item {chr(65 + i % 26)}{i}" for i in range(30)])
    batch = builder.batch([[0, 1, 2], [5, 6, 7]], [[3, 4, 5], [8, 9, 1]], [3, 9], pad_id=30)
    grads = []
    for model in (m4, ref):
        model.train()
        out, _ = model(batch)
        out.loss.backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if "lora_A" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(quantized)
    for name in grads[1]:
        torch.testing.assert_close(
            grads[0][name], grads[1][name], rtol=2e-3, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
