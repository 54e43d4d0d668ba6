"""Pictures (PNG, matplotlib's Agg backend): a run's loss and validation curves, a bar chart of evaluated
systems with error bars over candidate draws, and the gate — the mean expert weights per group of users,
the picture that shows whether instance-wise routing happens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write the figure atomically (a half-written PNG is never left behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    tmp.replace(path)
    _pyplot().close(fig)
    return path


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a run's log, skipping lines that are not whole JSON objects (the half-written last line
    of a killed process, an edited line)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    """``logs/train.jsonl``: the records with a step and a loss."""
    return [r for r in read_jsonl(Path(run_dir) / "logs" / "train.jsonl") if _number(r.get("step"), r.get("loss"))]


def validation_records(run_dir: Path) -> list[dict[str, Any]]:
    """``logs/validation.jsonl``: the records with a step, their sizes and HR@1 and MRR of every ranking."""

    def whole(r: dict[str, Any]) -> bool:
        val = r.get("val")
        return (
            _number(r.get("step"), r.get("val_rows"), r.get("val_draws"))
            and isinstance(val, dict)
            and all(isinstance(m, dict) and _number(m.get("hr@1"), m.get("mrr")) for m in val.values())
        )

    records = [r for r in read_jsonl(Path(run_dir) / "logs" / "validation.jsonl") if whole(r)]
    return [r for r in records if set(r["val"]) == set(records[0]["val"])]


def _number(*xs: Any) -> bool:
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)


def loss_curve(records: list[dict[str, Any]], path: Path, title: str = "training loss") -> Path:
    """The training loss per optimisation step (and its running mean when there are many steps)."""
    plt = _pyplot()
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        steps, loss, lw=1, alpha=0.5 if len(loss) > 20 else 1.0, marker="o" if len(loss) <= 20 else None, label="loss"
    )
    if len(loss) > 20:
        w = max(5, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")  # (n - w + 1,)
        ax.plot(steps[w - 1 :], smooth, lw=2, label=f"mean of {w} steps")
    _integer_steps(ax)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def validation_curves(records: list[dict[str, Any]], path: Path, title: str = "validation") -> Path:
    """HR@1 and MRR of each ranking (LLM alone, fused, encoder) against the optimisation step."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("hr@1", "mrr")):
        for name in records[0]["val"]:
            ax.plot(steps, [r["val"][name][metric] for r in records], marker="o", label=name)
        _integer_steps(ax)
        ax.set_xlabel("optimisation step")
        ax.set_ylabel(f"val {metric.upper()}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title} ({records[0]['val_rows']} rows, {records[0]['val_draws']} draws)")
    return _save(fig, path)


def gate_curves(records: list[dict[str, Any]], path: Path, title: str = "gate") -> Path:
    """The gate over the optimisation steps (training/gate_stats.py): its entropy against log K, the load of each
    expert, the spread across users and the drift of its weights from their initialisation."""
    plt = _pyplot()
    records = [r for r in records if _number(r.get("gate_entropy"), r.get("gate_spread"))]
    steps = [r["step"] for r in records]
    load = np.array([r["gate_load"] for r in records], dtype=float)  # (steps, K)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    axes[0].plot(steps, [r["gate_entropy"] for r in records])
    axes[0].axhline(np.log(load.shape[1]), ls="--", color="grey", label="log K (uniform)")
    axes[0].legend()
    for k in range(load.shape[1]):
        axes[1].plot(steps, load[:, k], label=f"expert {k}")
    axes[1].legend(fontsize=7)
    axes[2].plot(steps, [r["gate_spread"] for r in records])
    drift = [(r["step"], r["gate_drift"]) for r in records if _number(r.get("gate_drift"))]
    if drift:
        axes[3].plot(*zip(*drift))
    labels = ("entropy (nats)", "mean weight per expert", "spread across users (std of K·g)", "drift ‖W−W₀‖/‖W₀‖")
    for ax, label in zip(axes, labels):
        _integer_steps(ax)
        ax.set_xlabel("optimisation step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def training_plots(run_dir: Path) -> list[Path]:
    """``plots/loss.png``, ``plots/gate-training.png`` (K > 1) and ``plots/validation.png`` (when validation ran)
    from a run's logs."""
    run_dir = Path(run_dir)
    written = []
    train = train_records(run_dir)
    if train:
        written.append(loss_curve(train, run_dir / "plots" / "loss.png", f"{run_dir.name}: training loss"))
    if any(_number(r.get("gate_entropy")) for r in train):
        written.append(gate_curves(train, run_dir / "plots" / "gate-training.png", f"{run_dir.name}: the gate"))
    val = validation_records(run_dir)
    if val:
        written.append(validation_curves(val, run_dir / "plots" / "validation.png", f"{run_dir.name}: validation"))
    return written


def metrics_bars(
    rows: dict[str, dict[str, Any]], path: Path, metrics: tuple[str, ...] = ("hr@1", "hr@5", "ndcg@5", "mrr"), title=""
) -> Path:
    """Grouped bars: one group per metric, one bar per system, error bars = std over candidate draws."""
    plt = _pyplot()
    metrics = tuple(m for m in metrics if any(m in r for r in rows.values()))
    if not metrics:
        metrics = tuple(sorted({m for r in rows.values() for m, v in r.items() if isinstance(v, dict)}))
    n = len(rows)
    width = 0.8 / max(n, 1)
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics) * max(1, n / 2)), 4.5))
    for i, (label, r) in enumerate(rows.items()):
        means = [r[m]["mean"] if m in r else np.nan for m in metrics]
        stds = [r[m].get("std", 0.0) if m in r else 0.0 for m in metrics]
        ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(x, [m.upper() for m in metrics])
    ax.set_ylabel("value (mean ± std over draws)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(n, 3), frameon=False)
    return _save(fig, path)


def gate_heatmap(gates: np.ndarray, groups: np.ndarray, path: Path, title: str, group_label: str) -> Path:
    """Rows: groups of users (with their size); columns: experts; colour and number: mean gate weight.
    Identical rows mean every group gets the same mixture (no instance-wise routing)."""
    plt = _pyplot()
    labels = np.unique(groups)
    means = np.stack([gates[groups == g].mean(0) for g in labels])  # (G, K)
    fig, ax = plt.subplots(figsize=(1.2 * gates.shape[1] + 3, 0.5 * len(labels) + 2))
    im = ax.imshow(means, cmap="viridis", vmin=0, vmax=max(float(means.max()), 1e-6), aspect="auto")
    for (r, c), v in np.ndenumerate(means):
        ax.text(c, r, f"{v:.3f}", ha="center", va="center", color="white" if v < means.max() * 0.6 else "black")
    ax.set_xticks(range(gates.shape[1]), [f"expert {k}" for k in range(gates.shape[1])])
    ax.set_yticks(range(len(labels)), [f"{group_label} {g} ({int((groups == g).sum())})" for g in labels])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="mean gate weight")
    return _save(fig, path)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Cluster labels of Lloyd's k-means with k-means++ seeding (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.array(centers)[None]) ** 2).sum(-1), axis=1)  # (N,)
        centers.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
    c = np.array(centers)  # (k, d)
    labels = np.zeros(len(x), dtype=int)
    for _ in range(iters):
        labels_new = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)  # (N,)
        if _ and np.array_equal(labels_new, labels):
            break
        labels = labels_new
        for j in range(k):
            if (labels == j).any():
                c[j] = x[labels == j].mean(0)
    return labels


def synthetic_groups(meta: dict[str, Any], histories: list[list[int]], targets: np.ndarray) -> np.ndarray | None:
    """The latent group of each (history, target) row of a synthetic dataset, recovered by regenerating the
    users from the generator settings recorded in its ``meta.json``; None when a row cannot be matched."""
    from .data.formats.synthetic import generate

    source = meta.get("source", {})
    if source.get("format") != "synthetic":
        return None
    _, sequences, groups = generate(source["users"], source["items"], source["groups"], source["split_seed"])
    by_tail: dict[tuple[int, ...], int] = {}
    for seq, g in zip(sequences, groups):
        seq = [int(i) for i in seq]
        for length in range(1, len(seq)):
            by_tail.setdefault(tuple(seq[-length - 1 :]), int(g))
    out = []
    for hist, target in zip(histories, targets):
        key = (*map(int, hist), int(target))
        if key not in by_tail:
            return None
        out.append(by_tail[key])
    return np.array(out)


def user_groups(meta: dict[str, Any], histories, targets, user_vectors: np.ndarray, seed: int = 0):
    """(group of each row, what the groups are): the synthetic groups when known, else k-means clusters of the
    encoder's user representations (8, or fewer for few rows)."""
    known = synthetic_groups(meta, histories, targets)
    if known is not None:
        return known, "synthetic group"
    k = int(min(8, max(2, len(user_vectors) // 10)))
    return kmeans(user_vectors, k, seed=seed), "k-means cluster"
