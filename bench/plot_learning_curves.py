"""Learning curves of a lever sweep: val HR@1 and MRR against training rows, with the CPU minutes of each point.

    python bench/plot_learning_curves.py RESULT.json --configs today compact --step-seconds STEP.json \
        --out docs/learning-curve.png

RESULT.json is a ``bench_levers.py`` result (its runs carry the validations made during training); the
points of a configuration are averaged over its seeds. STEP.json is a ``bench_step.py --configs`` result:
its median seconds per step turn steps into CPU minutes (printed in the table and on the top axis).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def curves(doc: dict, configs: list[str]) -> dict[str, dict]:
    """Per configuration: rows, steps and the mean ± std over seeds of each ranking's HR@1 and MRR."""
    out = {}
    for config in configs:
        runs = [r for r in doc["runs"].values() if r["config"] == config and r["curve"]]
        if not runs:
            continue
        steps = sorted({c["step"] for r in runs for c in r["curve"]})
        table = {"steps": steps, "rows": [], "seeds": len(runs)}
        for s in steps:
            points = [c for r in runs for c in r["curve"] if c["step"] == s]
            table["rows"].append(points[0]["samples"])
            for ranking in ("llm", "fused", "encoder"):
                for m in ("hr@1", "mrr"):
                    vals = np.array([p["val"][ranking][m] for p in points if ranking in p["val"]])
                    table.setdefault(f"{ranking}_{m}", []).append((float(vals.mean()), float(vals.std())))
        out[config] = table
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path)
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--step-seconds", type=Path, default=None, help="a bench_step.py --configs result")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(args.result.read_text())
    seconds = json.loads(args.step_seconds.read_text())["median_seconds"] if args.step_seconds else {}
    data = curves(doc, args.configs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("hr@1", "mrr")):
        for config, t in data.items():
            mean = np.array([m for m, _ in t[f"llm_{metric}"]])
            std = np.array([s for _, s in t[f"llm_{metric}"]])
            line = ax.errorbar(t["rows"], mean, yerr=std if t["seeds"] > 1 else None, marker="o", capsize=3)
            ax.plot(t["rows"], [m for m, _ in t[f"fused_{metric}"]], linestyle="--", color=line[0].get_color())
            line[0].set_label(f"{config}: LLM alone (dashed: fused)")
        enc = next(iter(data.values()))[f"encoder_{metric}"][0][0]
        ax.axhline(enc, color="black", linewidth=1, label=f"encoder alone ({enc:.3f})")
        ax.axhline({"hr@1": 0.05, "mrr": 0.180}[metric], color="grey", linestyle=":", label="random")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training rows")
        ax.set_ylabel(f"val {metric.upper()} (20 candidates)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="center right")
    fig.suptitle(f"{doc['dataset']}: learning curves ({doc['device']}, {doc['dtype']}, batch {doc['batch_size']})")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    for config, t in data.items():
        per = seconds.get(config)
        print(f"\n{config} ({t['seeds']} seed{'s' if t['seeds'] > 1 else ''})")
        print(f"{'rows':>6} {'steps':>6} {'CPU min':>8}  LLM HR@1 / MRR     fused HR@1 / MRR   encoder HR@1 / MRR")
        for i, (rows, step) in enumerate(zip(t["rows"], t["steps"])):
            minutes = f"{step * per / 60:8.1f}" if per else f"{'-':>8}"
            cells = "   ".join(
                f"{t[f'{r}_hr@1'][i][0]:.3f} / {t[f'{r}_mrr'][i][0]:.3f}" for r in ("llm", "fused", "encoder")
            )
            print(f"{rows:>6} {step:>6} {minutes}  {cells}")


if __name__ == "__main__":
    main()
