"""The gate's statistics in the training log: closed forms on tiny tensors, then a real run (K = 2 and K = 1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ilora_cli.training import gate_stats
from ilora_cli.training.loop import TrainConfig, train

FAST = dict(dataset="cyc", batch_size=4, candidates=6, checkpoint_every=4, quiet=True, seed=5)


def test_batch_stats_closed_form():
    g = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # one user on expert 0 alone, one uniform
    s = {k: float(v) for k, v in gate_stats.batch_stats(g).items()}
    assert s["gate_entropy"] == pytest.approx(math.log(2) / 2)  # (0 + log 2) / 2
    assert (s["gate_load0"], s["gate_load1"]) == pytest.approx((0.75, 0.25))
    assert s["gate_spread"] == pytest.approx(0.5)  # K·g = [[2, 0], [1, 1]]: each column's std is 0.5
    same = gate_stats.batch_stats(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
    assert float(same["gate_spread"]) == pytest.approx(0.0)  # one mixture for everyone, however peaked


def test_drift_closed_form_and_no_parameters():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    initial = gate_stats.snapshot([w])
    with torch.no_grad():
        w.add_(torch.tensor([0.3, -0.4]))
    assert gate_stats.drift([w], initial) == pytest.approx(0.5 / 5.0)
    assert gate_stats.drift([], []) is None  # the uniform gate has nothing to move


def test_log_fields_take_the_gate_out_of_the_terms():
    terms = {"rank": 1.5, "gate_entropy": 0.6, "gate_spread": 0.1, "gate_load1": 0.3, "gate_load0": 0.7}
    out = gate_stats.log_fields(terms, [], None)
    assert out == {"gate_entropy": 0.6, "gate_spread": 0.1, "gate_load": [0.7, 0.3]}
    assert terms == {"rank": 1.5}  # nothing of the gate is logged as a loss term
    assert gate_stats.log_fields({"rank": 1.0}, [], None) == {}


@pytest.fixture
def world(tiny_world, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    return tiny_world


def test_a_k2_run_logs_its_gate_every_step_and_draws_it(world):
    cfg = TrainConfig(backbone=str(world / "tiny-backbone"), name="gate-log", max_steps=4, experts=2, **FAST)
    run = train(cfg)
    records = [json.loads(x) for x in (Path(run["run_dir"]) / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert 0.0 <= r["gate_entropy"] <= math.log(2) + 1e-6
        assert len(r["gate_load"]) == 2 and sum(r["gate_load"]) == pytest.approx(1.0, abs=1e-5)
        assert r["gate_spread"] >= 0.0 and not any(k.startswith("loss_gate") for k in r)
    drifts = [r["gate_drift"] for r in records]
    assert drifts[-1] > drifts[0] >= 0.0  # B = 0 at the start: the gate moves once the LoRA layers have
    assert (Path(run["run_dir"]) / "plots" / "gate-training.png").stat().st_size > 0


def test_a_k1_run_logs_no_gate(world):
    cfg = TrainConfig(backbone=str(world / "tiny-backbone"), name="gate-k1", max_steps=2, experts=1, **FAST)
    run = train(cfg)
    records = [json.loads(x) for x in (Path(run["run_dir"]) / "logs" / "train.jsonl").read_text().splitlines()]
    assert not any(k.startswith("gate_") for r in records for k in r)
    assert not (Path(run["run_dir"]) / "plots" / "gate-training.png").exists()
