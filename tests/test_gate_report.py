"""Whether the gate matters: group information in closed form, the derangement, forced gates, and eval's ``gate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ilora_cli.evaluation.gate_report import derangement, group_information

FAST = dict(dataset="cyc", batch_size=4, candidates=6, checkpoint_every=8, quiet=True, seed=5, head="item")


def test_group_information_closed_forms():
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    one_hot = np.eye(4)[groups]  # each group on its own expert: all log2(4) = 2 bits
    assert group_information(one_hot, groups) == pytest.approx(2.0)
    assert group_information(np.full((8, 4), 0.25), groups) == pytest.approx(0.0)  # uniform: nothing
    same = np.tile([0.7, 0.1, 0.1, 0.1], (8, 1))  # peaked, but the same for everyone: nothing either
    assert group_information(same, groups) == pytest.approx(0.0)
    halves = np.eye(2)[np.array([0, 0, 0, 0, 1, 1, 1, 1])]  # tells {0,1} from {2,3}: 1 bit of the 2
    assert group_information(halves, groups) == pytest.approx(1.0)


def test_derangement_moves_every_row():
    for n in (2, 3, 10, 122):
        p = derangement(n, seed=1)
        assert sorted(p.tolist()) == list(range(n)) and not np.any(p == np.arange(n))
    assert np.array_equal(derangement(10, 4), derangement(10, 4))


@pytest.fixture(scope="module")
def k2_run(tiny_world):
    import os

    from ilora_cli.training.loop import TrainConfig, train

    os.environ["ILORA_HOME"] = str(tiny_world)
    cfg = TrainConfig(backbone=str(tiny_world / "tiny-backbone"), name="gate-cf", max_steps=6, experts=2, **FAST)
    train(cfg)
    return tiny_world


def test_forced_gates_route_every_row(k2_run):
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.evaluation.llm import score_rows
    from ilora_cli.training.run import load_run

    run = load_run(k2_run / "runs" / "gate-cf")
    split = PreparedDataset.open("cyc").split("val")
    hist = split.histories()
    own = score_rows(run, hist, split.candidates, catalogue=True)
    again = score_rows(run, hist, split.candidates, catalogue=True, gates_in=own["gates"])
    np.testing.assert_allclose(again["catalogue"], own["catalogue"], rtol=1e-5, atol=1e-6)  # own gates: the same
    flipped = own["gates"][:, ::-1].copy()
    other = score_rows(run, hist, split.candidates, catalogue=True, gates_in=flipped)
    np.testing.assert_allclose(other["gates"], flipped, rtol=1e-6)  # what was used is what is reported
    assert not np.allclose(other["catalogue"], own["catalogue"], atol=1e-6)  # the experts differ after training
    with pytest.raises(ValueError, match="forced gates"):
        with run.model.forcing_gates(torch.ones(1, 2) / 2):
            score_rows(run, hist[:3], split.candidates[:3], catalogue=True)


def test_eval_reports_the_gate_and_its_counterfactual(k2_run):
    from ilora_cli.evaluation.evaluate import EvalConfig, evaluate

    out = evaluate(EvalConfig(runs=["gate-cf"], quiet=True))
    gate = out["results"]["gate-cf"]["gate"]
    assert set(gate["counterfactual"]) == {"own", "shuffled", "uniform"}
    assert gate["metric"] == "full_ndcg@10" and 0.0 <= gate["p_own_vs_shuffled"] <= 1.0
    assert gate["counterfactual"]["own"] == out["results"]["gate-cf"]["metrics"]  # own: what the run does
    llm = gate["counterfactual_llm"]
    assert llm["own"] == out["results"]["gate-cf"]["llm"]["metrics"]
    assert set(llm) == {"own", "shuffled", "uniform"} and "full_ndcg@10" in llm["uniform"]
    # (that other gates give other scores is test_forced_gates_route_every_row's; on 8 rows the ranks may tie)
    assert len(gate["load"]) == 2 and sum(gate["load"]) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= gate["entropy"] <= gate["entropy_uniform"] + 1e-9
    assert gate["group_information_bits"] >= 0.0 and gate["group_information_bits_untrained"] is not None
    assert gate["groups"] == "k-means cluster"
    off = evaluate(EvalConfig(runs=["gate-cf"], quiet=True, gate_counterfactual=False))
    assert "gate" not in off["results"]["gate-cf"]
