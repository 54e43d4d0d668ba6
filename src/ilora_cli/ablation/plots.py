"""PNG plots of an ablation (matplotlib, Agg backend: no display needed).

- ``vs-<axis>.png`` for every numeric axis with several values: HR@1 and MRR against the axis, one line per
  combination of the other axes, the default ranking solid, the LLM alone dashed and the encoder alone
  dotted; error bars are the std over candidate draws (over seeds when the grid has several).
- ``train-loss.png``: the training-loss curves of every run of the grid on one figure.
- :func:`heatmap`: a labelled matrix (the gradient-conflict analysis).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

PLOTTED = (("hr@1", "HR@1"), ("mrr", "MRR"))
PLOT_AXES = ("experts", "train_fraction", "candidates")
_STYLE = {"metrics": "-", "llm_metrics": "--"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return str(path)


def write_plots(directory: Path, doc: dict[str, Any], curves: dict[str, list[tuple[int, float]]]) -> list[str]:
    """Write every plot the ablation's results allow; returns their paths."""
    plt = _pyplot()
    written = []
    finished = [c for c in doc["cells"] if c["metrics"] is not None]
    for axis in PLOT_AXES:
        if len(doc["axes"].get(axis, [])) > 1 and finished:
            fig = _against(plt, axis, finished)
            written.append(_save(fig, Path(directory) / f"vs-{axis.replace('_', '-')}.png"))
            plt.close(fig)
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, points in curves.items():
            if points:
                steps, losses = zip(*points)
                ax.plot(steps, losses, label=name, linewidth=1.2)
        ax.set_xlabel("optimisation step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("training loss")
        ax.set_title("Training loss of every run")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save(fig, Path(directory) / "train-loss.png"))
        plt.close(fig)
    return written


def _against(plt, axis: str, cells: list[dict[str, Any]]):
    """HR@1 and MRR against one axis; lines grouped by the other axes (seeds averaged)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in cells:
        key = tuple((a, v) for a, v in c["axes"].items() if a not in (axis, "seeds"))
        groups.setdefault(key, []).append(c)
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5.5 * len(PLOTTED), 4))
    for ax, (metric, title) in zip(np.atleast_1d(axes), PLOTTED):
        for key, members in groups.items():
            label = ", ".join(f"{a}={v}" for a, v in key) or "all"
            for field, style in (*_STYLE.items(), ("encoder_metrics", ":")):
                xs, ys, errs = _points(axis, members, field, metric)
                if field == "encoder_metrics" and not xs:
                    continue
                what = {"metrics": "default", "llm_metrics": "LLM alone", "encoder_metrics": "encoder"}[field]
                ax.errorbar(xs, ys, yerr=errs, fmt=style + "o", capsize=3, markersize=4, label=f"{label}: {what}")
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_ylabel(title)
        ax.set_title(f"{title} against {axis.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.set_xticks(sorted({c["axes"][axis] for c in cells}))
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _points(axis: str, members: list[dict[str, Any]], field: str, metric: str):
    by_x: dict[Any, list[dict[str, float]]] = {}
    for c in members:
        source = c.get(field)
        if source is None or metric not in source:
            continue
        by_x.setdefault(c["axes"][axis], []).append(source[metric])
    xs = sorted(by_x)
    ys, errs = [], []
    for x in xs:
        values = by_x[x]
        means = [v["mean"] for v in values]
        ys.append(float(np.mean(means)))
        errs.append(float(np.std(means)) if len(values) > 1 else float(values[0]["std"]))
    return xs, ys, errs


def heatmap(
    path: Path,
    matrix: np.ndarray,
    title: str,
    xlabels: list[str],
    ylabels: list[str],
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "coolwarm",
) -> str:
    """A matrix as a PNG heatmap with its values written in the cells."""
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * matrix.shape[1], 0.8 + 0.6 * matrix.shape[0]))
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax)
    tilt = max(map(len, xlabels), default=0) > 4  # long labels overlap side by side
    ax.set_xticks(range(matrix.shape[1]), xlabels, rotation=45 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(range(matrix.shape[0]), ylabels)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out
