"""K = 1 and K > 1 runs of one seed share every random stream but the gate's: the mixture is the only difference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ilora_cli.training.loop import TrainConfig, train

FAST = dict(dataset="cyc", batch_size=4, candidates=6, checkpoint_every=8, quiet=True, seed=11, head="item")


@pytest.fixture
def world(tiny_world, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    return tiny_world


def _cfg(world, **kw):
    return TrainConfig(backbone=str(world / "tiny-backbone"), **{**FAST, **kw})


def test_the_user_gate_does_not_shift_the_head_initialisation(world):
    """The user gate's initial weights come from a stream of their own: the item head (random init) of a K = 4 run
    is the K = 1 run's, and the gate itself still follows the seed."""
    from ilora_cli.training.trainer import Trainer

    heads, gates = {}, {}
    for name, kw in {"k1": dict(experts=1), "k4": dict(experts=4), "k4b": dict(experts=4)}.items():
        trainer = Trainer(_cfg(world, name=f"nm-{name}", head_init="random", max_steps=1, overwrite=True, **kw))
        heads[name] = [p.detach().clone() for p in trainer.unwrapped.item_head.parameters()]
        gates[name] = [p.detach().clone() for p in trainer.unwrapped.gate.parameters()]
        trainer.close() if hasattr(trainer, "close") else None
    for a, b in zip(heads["k1"], heads["k4"]):
        assert torch.equal(a, b)
    assert gates["k4"] and all(torch.equal(a, b) for a, b in zip(gates["k4"], gates["k4b"]))


def test_k4_with_the_uniform_gate_ends_where_k1_ends(world):
    """Same seed, dropout on: a K = 4 run with the uniform gate is plain LoRA of the same total rank, so it trains
    to the same weights as the K = 1 run (to rounding): same data order, same dropout masks, same initialisation."""
    runs = {}
    for name, kw in {"k1": dict(experts=1), "k4u": dict(experts=4, gate="uniform")}.items():
        out = train(_cfg(world, name=f"nm-train-{name}", max_steps=3, lora_dropout=0.2, overwrite=True, **kw))
        runs[name] = Path(out["run_dir"])
    for file in ("adapter/adapter_model.safetensors", "head.safetensors", "projector.safetensors"):
        a, b = load_file(runs["k1"] / file), load_file(runs["k4u"] / file)
        assert a.keys() == b.keys(), file
        moved = False
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=f"{file}: {key}")
            moved = moved or bool(a[key].abs().sum() > 0)
        assert moved, file
