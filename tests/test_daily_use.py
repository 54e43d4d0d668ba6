"""Daily use: plain progress, pictures, keep-best, the tracker, the scheduler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ilora_cli.console import PlainProgress
from ilora_cli.training.loop import TrainConfig, lr_lambda, train

FAST = dict(dataset="cyc", batch_size=4, candidates=6, checkpoint_every=2, quiet=True, seed=5)


@pytest.fixture
def world(tiny_world, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    return tiny_world


def _cfg(world, **kw):
    return TrainConfig(backbone=str(world / "tiny-backbone"), **{**FAST, **kw})


def test_plain_progress_prints_lines_with_counts_rate_and_eta():
    from rich.console import Console

    console = Console(record=True, width=200, file=open("/dev/null", "w"))
    with PlainProgress(interval=0, console=console) as bar:
        task = bar.add_task("train", total=4, info="")
        for i in range(1, 5):
            bar.update(task, completed=i, info=f"loss {1 / i:.4f}")
    lines = console.export_text().splitlines()
    assert len(lines) == 4  # one per update with interval 0, the last one once
    assert lines[0].startswith("train 1/4 (25%)  loss 1.0000  elapsed 0:00:00  ETA ")
    assert lines[-1].startswith("train 4/4 (100%)  loss 0.2500  elapsed ") and "ETA" not in lines[-1]


def test_plain_progress_waits_for_its_interval_and_always_ends_with_a_line():
    from rich.console import Console

    console = Console(record=True, width=200, file=open("/dev/null", "w"))
    with PlainProgress(interval=3600, console=console) as bar:
        task = bar.add_task("encode", total=100, info="")
        for _ in range(60):
            bar.advance(task, 1)  # never reaches the total: the closing line comes from __exit__
    lines = console.export_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("encode 60/100 (60%)")


def test_our_schedule_is_not_transformers_cosine_with_min_lr_so_it_stays():
    """transformers' get_cosine_with_min_lr_schedule_with_warmup spends its first step at lr 0; ours starts at
    1/warmup of the peak. After the warm-up both are the same cosine to min_lr."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    total, ratio, floor = 40, 0.1, 0.01
    ours = lr_lambda(total, ratio, floor)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(opt, 4, total, min_lr_rate=floor)
    seq_theirs = []
    for _ in range(total):
        seq_theirs.append(theirs.get_last_lr()[0])
        opt.step()
        theirs.step()
    seq_ours = [ours(s) for s in range(total)]
    assert seq_theirs[0] == 0.0 and seq_ours[0] == 0.25  # the difference: a first step that learns nothing
    np.testing.assert_allclose(seq_ours[4:], seq_theirs[4:], rtol=1e-12)  # identical cosine after warm-up


def _assert_each_users_own_gate(run_dir, doc, seed):
    """gates.json's mean gate of each cluster is the mean, over the cluster's val rows, of each user's own gate
    softmax(W u + b), computed here by hand from the run's saved gate weights and the encoder's representation u
    of the user's history; and the users' gates, and so the clusters' means, differ."""
    from safetensors.torch import load_file

    from ilora_cli import plots
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.training.run import load_run

    run = load_run(run_dir)
    split = PreparedDataset.open(run.info["dataset"]["name"]).split("val")
    n = doc["rows"]
    assert n == len(split)
    info = run.info["dataset"]
    prefix = run.builder.batch(split.histories()[:n], [[]] * n, None, None, info["pad_id"], info["max_history"])
    weights = load_file(run_dir / "gate.safetensors")
    w, b = weights["gate.net.weight"], weights["gate.net.bias"]  # (K, d), (K,)
    with torch.no_grad():
        users = run.model.encoder(prefix.history, prefix.history_len).float()  # (n, d)
        rows = torch.softmax(users @ w.T + b, dim=-1).numpy()  # (n, K)
    assert np.ptp(rows, axis=0).max() > 1e-3  # users with other histories get other gates
    groups = plots.kmeans(users.numpy(), int(min(8, max(2, n // 10))), seed=seed)  # the picture's clusters
    assert doc["size"] == {str(g): int((groups == g).sum()) for g in np.unique(groups)}
    for g, mean in doc["mean_gate"].items():
        np.testing.assert_allclose(mean, rows[groups == int(g)].mean(0), atol=2e-5, err_msg=g)
    means = np.array(list(doc["mean_gate"].values()))  # (groups, K)
    assert np.ptp(means, axis=0).max() > 1e-4


@pytest.mark.slow
def test_training_writes_pictures_and_keeps_the_best_checkpoint(world):
    r = train(_cfg(world, name="pics", max_steps=4, experts=2, validate_every=2, keep_best=True, apart_users=0))
    run_dir = world / "runs" / "pics"
    for png in ("loss.png", "validation.png", "gates.png"):
        data = (run_dir / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    gates = json.loads((run_dir / "plots" / "gates.json").read_text())
    assert gates["groups"] == "k-means cluster" and sum(gates["size"].values()) == gates["rows"]
    for mean in gates["mean_gate"].values():
        assert len(mean) == 2 and abs(sum(mean) - 1) < 1e-5
    _assert_each_users_own_gate(run_dir, gates, seed=FAST["seed"])
    val = [json.loads(x) for x in (run_dir / "logs" / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [2, 4]
    ndcg = {v["step"]: v["val"]["fused"]["full_ndcg@10"] for v in val}  # the item head: chosen on the catalogue
    assert all(v["selection"]["chosen_on"] == "val" for v in val)  # no rows set apart in this run
    best_step = max(ndcg, key=lambda s: (ndcg[s], -s))
    assert r["kept"] == {
        "step": best_step,
        "metric": "full_ndcg@10",
        "value": ndcg[best_step],
        "chosen_on": "val",
        "ranking": "fused",
        "last_step": 4,
    }
    info = json.loads((run_dir / "ilora.json").read_text())
    assert info["training"]["kept"]["step"] == best_step
    best = sorted((run_dir / "checkpoints" / "best").iterdir())
    assert [p.name for p in best] == [f"step-{best_step:06d}"]


@pytest.mark.slow
@pytest.mark.parametrize("settings,best", [({"fusion_lr": 1.0, "seed": 2}, 1), ({"lr": 0.5, "fusion_lr": 1.0}, 3)])
def test_keep_best_loads_the_best_weights_into_the_run(world, settings, best):
    """The validation MRR alone decides which weights the run ends with: here step 1's (a fast fusion rate makes
    the ranking worse by step 3), there step 3's. Each case first checks its premise: the MRR of the kept step
    is strictly the better one, so "keep the first" or "keep the last" fails one of them."""
    from safetensors.torch import load_file

    from ilora_cli.training.loop import Trainer

    name = f"best-{best}"
    cfg = _cfg(
        world,
        name=name,
        max_steps=3,
        experts=2,
        validate_at=[1],
        keep_best=True,
        head="title",
        apart_users=0,
        **settings,
    )
    trainer = Trainer(cfg)
    trainer.run()
    val = [json.loads(x) for x in (world / "runs" / name / "logs" / "validation.jsonl").read_text().splitlines()]
    mrr = {v["step"]: v["val"]["fused"]["mrr"] for v in val}
    assert sorted(mrr) == [1, 3] and mrr[best] > mrr[4 - best]  # the premise
    assert trainer.kept == {
        "step": best,
        "metric": "mrr",
        "value": mrr[best],
        "chosen_on": "val",
        "ranking": "fused",
        "last_step": 3,
    }
    params = dict(trainer.unwrapped.named_parameters())
    kept = load_file(trainer.best()["path"] / "trainable.safetensors")
    last = load_file(world / "runs" / name / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert all(torch.equal(params[n].detach().cpu(), v) for n, v in kept.items())
    assert (best == 3) == all(torch.equal(params[n].detach().cpu(), v) for n, v in last.items())


@pytest.mark.slow
def test_keep_best_chooses_on_the_rows_set_apart_when_there_are_any(world):
    """With rows set apart, the kept step is the one whose default ranking is best there (catalogue NDCG@10 with the
    fusion fitted on them), not on val: val is what the run is reported on."""
    r = train(_cfg(world, name="apart-best", max_steps=4, experts=2, validate_every=1, keep_best=True, apart_users=0.3))
    val = [
        json.loads(x) for x in (world / "runs" / "apart-best" / "logs" / "validation.jsonl").read_text().splitlines()
    ]
    chosen = {v["step"]: v["apart"]["metrics"]["fused"]["ndcg@10"] for v in val}
    assert all(v["selection"]["chosen_on"] == "apart" and v["selection"]["metric"] == "ndcg@10" for v in val)
    best_step = max(chosen, key=lambda s: (chosen[s], -s))
    assert r["kept"]["step"] == best_step and r["kept"]["value"] == chosen[best_step]
    assert r["kept"]["chosen_on"] == "apart"


def test_keep_best_needs_validation(world):
    from ilora_cli.errors import UserError

    with pytest.raises(UserError, match="validate_every"):
        _cfg(world, keep_best=True).validate()


@pytest.mark.slow
def test_report_to_tensorboard_writes_event_files(world):
    pytest.importorskip("tensorboard")
    train(_cfg(world, name="tb", max_steps=2, experts=2, report_to="tensorboard", validate_at=[2]))
    events = list((world / "runs" / "tb" / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/fused_mrr", "val/llm_hr@1"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_kmeans_separates_clear_clusters_deterministically():
    from ilora_cli.plots import kmeans

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + rng.normal(0, 0.5, (20, 2)) for c in centres])  # (60, 2)
    labels = kmeans(x, 3, seed=1)
    assert np.array_equal(labels, kmeans(x, 3, seed=1))
    for block in range(3):  # each true cluster is one label, and the three labels differ
        assert len(set(labels[block * 20 : (block + 1) * 20])) == 1
    assert len(set(labels)) == 3


def test_synthetic_groups_are_recovered_for_every_val_row(ilora_home):
    from ilora_cli.data.prepare import PrepareConfig, prepare
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.plots import synthetic_groups, user_groups

    cfg = PrepareConfig(format="synthetic", synthetic_users=80, synthetic_items=40, synthetic_groups=3)
    cfg.validate()
    prepare(cfg)
    ds = PreparedDataset.open("synthetic")
    val = ds.split("val")
    groups = synthetic_groups(ds.meta, val.histories(), val.next)
    assert groups is not None and len(groups) == len(val) and set(groups) <= {0, 1, 2}
    # A row that the generator did not produce is not matched: the caller falls back to k-means.
    assert synthetic_groups(ds.meta, [*val.histories()[:3], [-1]], np.array([*val.next[:3], 0])) is None
    labels, kind = user_groups({"source": {"format": "llara"}}, [], [], np.eye(30), seed=0)
    assert kind == "k-means cluster" and len(labels) == 30


def test_eval_bar_chart_is_a_png_with_error_bars(tmp_path):
    from ilora_cli.plots import metrics_bars

    rows = {
        "run (fused)": {"hr@1": {"mean": 0.3, "std": 0.02, "n_draws": 5}, "mrr": {"mean": 0.5, "std": 0.01}},
        "encoder": {"hr@1": {"mean": 0.25, "std": 0.03, "n_draws": 5}, "mrr": {"mean": 0.45, "std": 0.02}},
    }
    path = metrics_bars(rows, tmp_path / "chart.png", title="val")
    assert path.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*.tmp"))
