"""Learning curves of several runs against samples seen: val HR@1 and MRR of the LLM alone, the fused ranking and the
encoder, read from each run's logs (as far as they got: an interrupted run keeps what it validated).

    python bench/gpu_curves.py LABEL=RUN_DIR ... --json curves.json --png curves.png [--budget-stopped LABEL ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RANKINGS = ("llm", "fused", "encoder")
METRICS = ("hr@1", "mrr")


def read_jsonl(path: Path) -> list[dict]:
    """The whole lines of a JSON-lines log (a process killed while writing leaves a partial last line)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def curve(run_dir: Path) -> dict:
    """One run's validation points and its training speed."""
    val = read_jsonl(run_dir / "logs" / "validation.jsonl")
    train = read_jsonl(run_dir / "logs" / "train.jsonl")
    out = {
        "samples": [r["samples"] for r in val],
        "steps": [r["step"] for r in val],
        "val_seconds": [r.get("val_seconds") for r in val],
        "last_step": train[-1]["step"] if train else 0,
        "train_samples_per_second": train[-1]["samples_per_second"] if train else None,
        "final_loss": train[-1]["loss"] if train else None,
    }
    for ranking in RANKINGS:
        for metric in METRICS:
            out[f"{ranking}_{metric}"] = [r["val"].get(ranking, {}).get(metric) for r in val]
    return out


def plot(curves: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"llm": "-", "fused": "--", "encoder": ":"}
    for ax, metric in zip(axes, METRICS):
        for i, (label, c) in enumerate(curves.items()):
            for ranking in RANKINGS:
                ys = c[f"{ranking}_{metric}"]
                if c["samples"] and any(y is not None for y in ys):
                    ax.plot(c["samples"], ys, styles[ranking], marker="o", color=f"C{i}", label=f"{label}: {ranking}")
        ax.axhline({"hr@1": 0.05, "mrr": 0.180}[metric], color="grey", linewidth=1, label="random (20 candidates)")
        ax.set_xlabel("training samples seen")
        ax.set_ylabel(f"val {metric.upper()}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--png", type=Path, required=True)
    ap.add_argument("--budget-stopped", nargs="*", default=[], help="labels of runs the budget guard interrupted")
    ap.add_argument("--title", default="learning curves")
    args = ap.parse_args()
    curves = {}
    for spec in args.runs:
        label, run_dir = spec.split("=", 1)
        curves[label] = curve(Path(run_dir)) | {"stopped_by_budget": label in args.budget_stopped}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(curves, indent=1) + "\n")
    plot(curves, args.png, args.title)
    for label, c in curves.items():
        last = {r: c[f"{r}_hr@1"][-1] for r in RANKINGS} if c["samples"] else None
        stopped = " (stopped by the budget)" if c["stopped_by_budget"] else ""
        print(f"{label}: {len(c['samples'])} validations, last step {c['last_step']}{stopped}; last HR@1 {last}")


if __name__ == "__main__":
    main()
