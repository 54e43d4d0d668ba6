"""ilora ablate end to end on a tiny backbone: an interrupted grid resumes without rerunning finished cells;
results, CSV and plots; evaluation axes; cross-domain; the gradient-conflict analysis."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from ilora_cli.ablation.analysis import (
    AnalysisConfig,
    cluster_gradients,
    cosine_matrix,
    gradient_conflict,
    user_representations,
)
from ilora_cli.ablation.config import resolve_ablation
from ilora_cli.ablation.runner import run_ablation
from ilora_cli.data.prepared import PreparedDataset, write_prepared
from ilora_cli.data.source import SourceData, splits_from_sequences
from ilora_cli.errors import UserError

from conftest import run_main as run_cli  # in this process: see run_main

pytestmark = pytest.mark.slow  # trains and evaluates whole grids

PNG = b"\x89PNG\r\n\x1a\n"


def _train_flags(world, *extra):
    return [f"backbone={world / 'tiny-backbone'}", "batch_size=4", "candidates=6", "quiet=true", *extra]


def _ablate(world, out, overrides, **flags):
    config = resolve_ablation(None, {"dataset": "cyc", "output": out, **flags}, _train_flags(world, *overrides))
    return run_ablation(config)


def _attempts(out, run):
    return [json.loads(x) for x in (out / "logs" / f"{run}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def grid(tiny_world, tmp_path_factory):
    """K = 1 finished; then K = 1, 2 with K = 2 stopped after one step; then the same grid again."""
    os.environ["ILORA_HOME"] = str(tiny_world)
    out = tmp_path_factory.mktemp("ablation") / "experts"
    try:
        first = _ablate(tiny_world, out, ["max_steps=2", "eval_draws=2"], experts="1")
        k1_cell = (out / "cells" / "k1.json").stat().st_mtime_ns
        stopped = _ablate(tiny_world, out, ["max_steps=2", "eval_draws=2", "stop_after=1"], experts="1,2")
        k2_saved_when_stopped = (out / "runs" / "k2" / "ilora.json").exists()
        planned = run_ablation(
            resolve_ablation(
                None,
                {"dataset": "cyc", "output": out, "experts": "1,2", "dry_run": True},
                _train_flags(tiny_world, "max_steps=2", "eval_draws=2"),
            )
        )
        final = _ablate(tiny_world, out, ["max_steps=2", "eval_draws=2"], experts="1,2")
        again = _ablate(tiny_world, out, ["max_steps=2", "eval_draws=2"], experts="1,2")
    finally:
        os.environ.pop("ILORA_HOME", None)
    return dict(
        out=out,
        first=first,
        stopped=stopped,
        k2_saved_when_stopped=k2_saved_when_stopped,
        planned=planned,
        final=final,
        again=again,
        k1_cell=k1_cell,
    )


def test_an_interrupted_grid_resumes_and_skips_finished_cells(grid):
    out = grid["out"]
    assert [c["status"] for c in grid["first"]["cells"]] == ["done"]
    stopped = {c["name"]: c for c in grid["stopped"]["cells"]}
    assert stopped["k1"]["status"] == "finished before" and stopped["k1"]["metrics"] is not None
    assert stopped["k2"]["status"] == "stopped" and stopped["k2"]["metrics"] is None
    assert grid["stopped"]["unfinished"] == ["k2"]
    assert not grid["k2_saved_when_stopped"]
    plan = {c["name"]: c for c in grid["planned"]["cells"]}
    assert plan["k1"]["status"] == "finished" and plan["k2"]["status"] == "resume at step 1"
    assert plan["k2"]["train_minutes_estimate"] is not None  # measured on this ablation's earlier attempts
    final = {c["name"]: c for c in grid["final"]["cells"]}
    assert final["k1"]["status"] == "finished before" and final["k2"]["status"] == "done"
    # K = 1 trained once; K = 2 resumed from its checkpoint at step 1 instead of starting again
    assert len(_attempts(out, "k1")) == 1
    k2 = _attempts(out, "k2")
    assert [a["complete"] for a in k2] == [False, True]
    assert k2[1]["resumed_from"].endswith("step-000001") and k2[1]["steps"] == 2
    steps = [json.loads(x)["step"] for x in (out / "runs" / "k2" / "logs" / "train.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (out / "cells" / "k1.json").stat().st_mtime_ns == grid["k1_cell"]  # never evaluated again
    assert [c["status"] for c in grid["again"]["cells"]] == ["finished before"] * 2
    assert grid["again"]["cells"][1]["metrics"] == final["k2"]["metrics"]


def test_results_json_csv_and_plots(grid):
    out, doc = grid["out"], grid["final"]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(grid["again"]))
    assert doc["reference"] == "k1" and doc["axes"] == {"experts": [1, 2]}
    k1, k2 = doc["cells"]
    for cell in (k1, k2):
        assert cell["settings"]["experts"] == cell["axes"]["experts"]
        assert cell["run_dir"] == str(out / "runs" / cell["name"])
        assert cell["minutes"] > 0 and cell["rows"] == 4 and cell["draws"] == 2
        assert set(cell["metrics"]["mrr"]) == {"mean", "std", "n_draws"} and cell["metrics"]["mrr"]["n_draws"] == 2
        assert cell["ranking"] == "fused" and set(cell["llm_metrics"]) == set(cell["metrics"])
    assert "vs_reference" not in k1
    vs = k2["vs_reference"]
    assert vs["default"]["method"] == "exact" and 0 < vs["default"]["p_value"] <= 1
    assert vs["delta_mrr"] == pytest.approx(k2["metrics"]["mrr"]["mean"] - k1["metrics"]["mrr"]["mean"])
    # the per-user reciprocal ranks behind the test average to the reported MRR
    cell = json.loads((out / "cells" / "k2.json").read_text())
    assert np.mean(cell["per_user"]["default"]) == pytest.approx(k2["metrics"]["mrr"]["mean"], abs=1e-4)
    assert np.mean(cell["per_user"]["llm"]) == pytest.approx(k2["llm_metrics"]["mrr"]["mean"], abs=1e-4)
    # the item head ranks the catalogue: the test runs on each user's catalogue NDCG@10, which averages to the metric
    assert cell["test_metric"] == vs["default"]["metric"] == "full_ndcg@10"
    catalogue = cell["per_user"]["catalogue"]
    assert np.mean(catalogue["default"]) == pytest.approx(k2["metrics"]["full_ndcg@10"]["mean"], abs=1e-4)
    assert np.mean(catalogue["llm"]) == pytest.approx(k2["llm_metrics"]["full_ndcg@10"]["mean"], abs=1e-4)
    assert [e["name"] for e in doc["encoders"]] == ["sasrec alone"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["name"] for r in rows] == ["k1", "k2", "sasrec alone"]
    assert float(rows[1]["mrr_mean"]) == pytest.approx(k2["metrics"]["mrr"]["mean"], rel=1e-5)
    assert rows[1]["p_value"] != "" and rows[0]["p_value"] == ""
    # K = 2 gets the gate's counterfactual (own, shuffled, uniform gates), K = 1 has no gate to report
    assert k1["gate"] is None and set(k2["gate"]["counterfactual"]) == {"own", "shuffled", "uniform"}
    assert k2["gate"]["counterfactual"]["own"] == k2["metrics"]
    assert rows[0]["gate_own"] == "" and float(rows[1]["gate_own"]) == pytest.approx(
        k2["metrics"]["full_ndcg@10"]["mean"], rel=1e-5
    )
    assert sorted(os.path.basename(p) for p in doc["plots"]) == ["train-loss.png", "vs-experts.png"]
    for p in doc["plots"]:
        assert open(p, "rb").read(8) == PNG


def test_changed_shared_settings_are_refused_not_mixed(grid, tiny_world, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    with pytest.raises(UserError, match=r"trained with other settings \(lr: 0.0005 there, 0.001 now\)"):
        _ablate(tiny_world, grid["out"], ["max_steps=2", "eval_draws=2", "lr=1e-3"], experts="1,2")


def test_dry_run_writes_nothing(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    out = tmp_path / "dry"
    plan = _ablate(tiny_world, out, ["max_steps=3"], experts="1,2,4", candidates="6,8", dry_run=True)
    assert [c["name"] for c in plan["cells"]] == ["k1_c6", "k1_c8", "k2_c6", "k2_c8", "k4_c6", "k4_c8"]
    assert {c["status"] for c in plan["cells"]} == {"to train"} and plan["cells"][0]["steps"] == 3
    assert plan["total_minutes_estimate"] is None and "no estimate" in plan["estimate_basis"]  # tiny backbone
    assert not out.exists()


def test_dry_run_counts_the_rows_the_holdout_leaves_the_second_stage(tiny_world, tmp_path, monkeypatch):
    """Before: the estimate counted every train row, as if the run trained on the rows its encoder fitted."""
    from ilora_cli.data.holdout import dataset_holdout, partition

    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    ds = PreparedDataset(tiny_world / "datasets" / "cyc")
    held = len(partition(ds, dataset_holdout(ds)).second_stage_rows)
    every = ds.meta["splits"]["train"]
    assert 0 < held < every
    for extra, rows, epochs in (([], held, 3), (["holdout=none"], every, 3), (["head=title"], held, 1)):
        plan = _ablate(tiny_world, tmp_path / "dry", extra, experts="1", dry_run=True)
        assert plan["cells"][0]["steps"] == rows // 4 * epochs, extra


def test_candidates_and_train_fraction_axes(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    out = tmp_path / "sparse"
    doc = _ablate(
        tiny_world,
        out,
        ["max_steps=1", "eval_draws=1", "encode_epochs=1"],
        train_fraction="1,0.5",
        candidates="6,10",
    )
    cells = {c["name"]: c for c in doc["cells"]}
    assert list(cells) == ["users1_c6", "users1_c10", "users0.5_c6", "users0.5_c10"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["users0.5", "users1"]  # two trainings
    assert cells["users1_c10"]["protocol"] == "sampled, 10 candidates"
    assert cells["users0.5_c10"]["vs_reference"]["default"]["p_value"] is not None  # same users: paired
    half = PreparedDataset(out / "data" / "cyc-users0.5")
    full = PreparedDataset(tiny_world / "datasets" / "cyc")
    assert half.meta["derived_from"]["users_kept"] == round(half.meta["derived_from"]["users_total"] / 2)
    assert half.meta["splits"]["train"] < full.meta["splits"]["train"]
    assert (out / "encoders" / "cyc-users0.5-sasrec" / "encoder.json").is_file()  # its own encoder
    assert (full.path / "extra_candidates" / "val-c10.safetensors").is_file()
    assert [e["name"] for e in doc["encoders"]] == [
        "sasrec alone (users1) (c6)",
        "sasrec alone (users1) (c10)",
        "sasrec alone (users0.5) (c6)",
        "sasrec alone (users0.5) (c10)",
    ]
    assert {os.path.basename(p) for p in doc["plots"]} == {
        "vs-train-fraction.png",
        "vs-candidates.png",
        "train-loss.png",
    }


def test_cross_domain_through_the_command_line(tiny_world, tmp_path):
    cyc = PreparedDataset(tiny_world / "datasets" / "cyc")
    rng = np.random.default_rng(1)
    titles = [cyc.titles[j] for j in rng.permutation(30)[:20]] + ["Unrelated A", "Unrelated B"]
    seqs = [(rng.integers(22) + np.arange(9)) % 22 for _ in range(40)]
    src = SourceData(titles=titles, splits=splits_from_sequences(seqs, 22, seed=1), n_users=40)
    write_prepared(src, "other", tmp_path / "other", n_candidates=6, draws=2)
    r = run_cli(
        "ablate",
        "--train-dataset",
        "cyc",
        "--eval-dataset",
        str(tmp_path / "other"),
        "--output",
        str(tmp_path / "cross"),
        "--json",
        *_train_flags(tiny_world, "max_steps=1"),
        home=tiny_world,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    report = doc["cross_domain"]
    assert report["rows_from"] == "other" and report["catalogue"] == "cyc" and report["items_mapped"] == 20
    assert "not comparable with in-domain results" in report["comparable"]
    assert doc["cells"][0]["rows"] == report["rows_kept"] > 0 and doc["eval_dataset"] == "other"
    assert "cross-domain:" in r.stderr


def test_command_line_errors_exit_2(tiny_world):
    r = run_cli("ablate", "--dataset", "cyc", "--experts", "1,3", *_train_flags(tiny_world), home=tiny_world)
    assert r.returncode == 2 and "Cell k3: rank (16) must be a positive multiple of experts (3)" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--analysis", "loss-landscape", "--run", "x"], "Unknown analysis 'loss-landscape'"),
        (["--experts", "1,2"], "Pass --dataset"),
        (["--dataset", "cyc", "--run", "x"], "--run and --baseline belong to --analysis gradient-conflict"),
        (["--analysis", "gradient-conflict"], "Pass --run RUN"),
    ],
)
def test_refused_command_lines(args, message, tiny_world, monkeypatch):
    from typer.testing import CliRunner

    from ilora_cli.cli import app

    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    result = CliRunner().invoke(app, ["ablate", *args])
    assert isinstance(result.exception, UserError) and message in str(result.exception)


def test_gradient_conflict_on_a_tiny_model(grid, tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    runs = grid["out"] / "runs"
    config = AnalysisConfig(
        run=str(runs / "k2"), baseline=str(runs / "k1"), rows_per_cluster=3, batch_size=2, output=tmp_path / "gc"
    )
    doc = gradient_conflict(config)
    assert doc["clusters"]["k"] == 8 and sum(doc["clusters"]["sizes"]) == doc["clusters"]["clustered_rows"]
    sizes = doc["clusters"]["sizes"]
    assert doc["clusters"]["rows_used"] == [min(3, n) for n in sizes] and doc["same_encoder"]
    for role in ("run", "baseline"):
        r = doc["runs"][role]
        s = np.array(r["similarity"])
        assert s.shape == (8, 8)
        np.testing.assert_allclose(s, s.T, atol=1e-6)
        np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-5)
        assert (np.abs(s) <= 1 + 1e-6).all()
        assert r["mean_off_diagonal"] == pytest.approx(s[~np.eye(8, dtype=bool)].mean(), abs=1e-5)
        assert r["objective"] == "rank" and all(n > 0 for n in r["gradient_norms"])
    assert doc["runs"]["baseline"]["gates"] is None  # K = 1 has no gate
    written = json.loads((tmp_path / "gc" / "gradient-conflict.json").read_text())
    assert written["runs"]["run"]["similarity"] == doc["runs"]["run"]["similarity"]
    for name in ("conflict-run-k2.png", "conflict-baseline-k1.png", "gates-run-k2.png"):
        assert (tmp_path / "gc" / name).read_bytes()[:8] == PNG

    # The gates heatmap's numbers are the gate module applied to the encoder's user representations.
    from ilora_cli.training.run import load_run

    run = load_run(runs / "k2")
    split = PreparedDataset.open("cyc").split("train")
    with torch.no_grad():
        users = torch.as_tensor(user_representations(run.model.encoder, split))
        gates = run.model.gate(users).numpy()
    for k, rows in enumerate(doc["rows"]):
        np.testing.assert_allclose(doc["runs"]["run"]["gates"][k], gates[rows].mean(0), atol=1e-5)

    # Gradients are summed over rows: the batch size of the computation does not change them.
    rows = [doc["rows"][0][:2], doc["rows"][1][:2]]
    one = cluster_gradients(run, runs / "k2", split, rows, AnalysisConfig(run="k2", batch_size=1))
    two = cluster_gradients(run, runs / "k2", split, rows, AnalysisConfig(run="k2", batch_size=2))
    np.testing.assert_allclose(one["gradient_norms"], two["gradient_norms"], rtol=1e-3)
    np.testing.assert_allclose(one["similarity"], two["similarity"], atol=1e-4)


def test_cosine_matrix_is_exact_for_millions_of_heavy_tailed_weights():
    """A cosine with itself is 1 and the matrix matches float64 by hand (float32 products were off by 1e-4)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 2_000_000, generator=gen) * torch.exp(3 * torch.randn(3, 2_000_000, generator=gen))
    s = cosine_matrix(g)
    np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-12)
    a, b = g[0].double().numpy(), g[2].double().numpy()
    assert s[0, 2] == pytest.approx(a @ b / np.sqrt((a @ a) * (b @ b)), abs=1e-12)
    np.testing.assert_array_equal(s, s.T)


@pytest.mark.slow
def test_a_grid_of_item_head_cells_and_their_gradient_conflict(tiny_world, tmp_path, monkeypatch):
    """head=item as a shared setting: each cell saves its head, is evaluated on the sampled draws and the whole
    catalogue, and the gradient-conflict analysis clusters only the rows the run could train on."""
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    out = tmp_path / "item-grid"
    doc = _ablate(tiny_world, out, ["max_steps=2", "eval_draws=1", "head=item"], experts="1,2")
    for cell in doc["cells"]:
        assert (out / "runs" / cell["name"] / "head.safetensors").is_file()
        assert {"mrr", "full_hr@10", "full_ndcg@10"} <= set(cell["llm_metrics"])
    config = AnalysisConfig(run=str(out / "runs" / "k2"), rows_per_cluster=2, clusters=4, output=tmp_path / "gc")
    gc = gradient_conflict(config)
    from ilora_cli.data.holdout import partition

    held = set(partition(PreparedDataset.open("cyc"), None).second_stage_rows.tolist())
    assert gc["clusters"]["clustered_rows"] == len(held)
    assert all(set(rows) <= held for rows in gc["rows"])
    assert all(n > 0 for n in gc["runs"]["run"]["gradient_norms"])
