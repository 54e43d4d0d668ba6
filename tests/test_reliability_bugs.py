"""The bugs found in review, each pinned by a test that failed before its fix."""

from __future__ import annotations

import pytest
import torch

from ilora_cli.encoders.sasrec import SASRec, SASRecConfig
from ilora_cli.llm.model import ExpertConfig, ILoraModel, attach_lora
from ilora_cli.llm.prompt import PromptBuilder, add_placeholder_tokens
from ilora_cli.llm.scoring import candidate_logprobs

from tiny import tiny_llama, word_tokenizer

N_ITEMS = 12
TITLES = [f"song {w}" for w in "alpha beta gamma delta omega zeta eta theta iota kappa lambda mu".split()]
HIST = [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9, 10, 11]]
CANDS = [[3, 4, 5], [0, 1, 2], [1, 2, 3]]


def _model(gate: str, checkpointing: bool, experts: int = 4):
    tok = word_tokenizer(TITLES)
    base = tiny_llama(len(tok) + 2, seed=0)
    add_placeholder_tokens(tok, base)
    for p in base.parameters():
        p.requires_grad_(False)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    torch.manual_seed(0)
    encoder = SASRec(SASRecConfig(hidden_size=16), N_ITEMS)
    cfg = ExpertConfig(experts=experts, rank=8, alpha=16, dropout=0.0, gate=gate)
    llm = attach_lora(base, cfg, init_lora_weights=False)  # random B: every parameter gets a gradient
    model = ILoraModel(llm, tok, encoder, cfg).train()
    return model, PromptBuilder(tok, TITLES, "music")


def _grads(gate: str, objective: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    model, builder = _model(gate, checkpointing)
    if objective == "generate":
        loss = model(builder.batch(HIST, CANDS, [3, 0, 2], pad_id=N_ITEMS))[0].loss
    else:
        prefix = builder.batch(HIST, CANDS, None, pad_id=N_ITEMS, padding_side="left")
        scores, _ = candidate_logprobs(model, builder, prefix, torch.tensor(CANDS))
        loss = torch.nn.functional.cross_entropy(scores, torch.tensor([0, 0, 2]))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "gate,objective", [("user", "rank"), ("user", "generate"), ("token", "rank"), ("mlp", "generate")]
)
def test_gradient_checkpointing_with_experts_gives_the_same_gradients(gate, objective):
    plain = _grads(gate, objective, checkpointing=False)
    recomputed = _grads(gate, objective, checkpointing=True)  # raised CheckpointError for K > 1 before
    assert plain.keys() == recomputed.keys()
    gate_params = [n for n in plain if n.startswith(("gate.", "token_routers."))]
    assert gate_params  # the gate is trained ...
    for n in gate_params:
        assert plain[n].abs().sum() > 0, n  # ... and gets a gradient through the recomputed layers
    for n in plain:
        torch.testing.assert_close(recomputed[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_evaluation_creates_every_tensor_on_the_models_device():
    """``recommend device=cuda`` built the history on the CPU and gave it to the encoder on the GPU. Every
    tensor that evaluation and recommendation create must name its device (or be moved there at once);
    this reads each creation site, as no GPU is available to every test run."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "ilora_cli" / "evaluation"
    creation = re.compile(r"torch\.(tensor|as_tensor|zeros|ones|full|arange|empty|rand\w*|from_numpy)\(")
    unplaced = []
    for path in sorted(root.glob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if creation.search(line) and "device=" not in line and ".to(" not in line:
                unplaced.append(f"{path.name}:{lineno}: {line.strip()}")
    assert not unplaced, unplaced
    assert creation.search("x = torch.as_tensor(seq)")  # the pattern finds what it looks for
