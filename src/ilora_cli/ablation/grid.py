"""The grid of an ablation: every combination of the axes' values is a cell.

A cell trains one run and evaluates it. Cells that differ only in how they are evaluated (the number of
candidates) share one training run: ``train_key`` names it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ..config import resolve
from ..errors import UserError
from .config import AXES, AXES_ORDER, AblateConfig

NUMERIC_AXES = ("experts", "train_fraction", "candidates", "seeds")
EVAL_AXES = ("candidates",)  # axes that change the evaluation only


@dataclass
class Cell:
    name: str  # e.g. k4_gate-user
    axes: dict[str, Any]  # the value of every axis of the ablation
    train_key: str  # the training run this cell evaluates (its name without the evaluation axes)
    train: dict[str, Any] = field(default_factory=dict)  # training settings of the run (shared ones included)
    encoder: str = "sasrec"  # collaborative encoder type
    train_fraction: float = 1.0  # fraction of the training users kept
    candidates: int | None = None  # candidates per evaluation row (None: the dataset's stored draws)


def cell_name(axes: dict[str, Any]) -> str:
    return "_".join(AXES[a][1](v) for a, v in axes.items()) or "base"


def axes_of(config: AblateConfig) -> dict[str, list[Any]]:
    """The ablation's axes and their values, in grid order (evaluation axes last)."""
    return {a: list(getattr(config, a)) for a in AXES_ORDER if getattr(config, a) is not None}


def expand(config: AblateConfig) -> list[Cell]:
    """Every cell of the grid, in order: the first value of every axis first. Each cell's training settings
    are checked here (for example that the total rank is a multiple of every expert count)."""
    from ..training.config import TrainConfig

    axes = axes_of(config)
    cells = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        train = dict(config.train)
        train.setdefault("seed", config.seed)
        for axis, value in values.items():
            setting = AXES[axis][0]
            if setting is not None:
                train[setting] = value
        name = cell_name(values)
        try:
            resolve(TrainConfig, None, {**train, "dataset": str(config.dataset)})
        except UserError as exc:
            raise UserError(f"Cell {name}: {exc}") from None
        cells.append(
            Cell(
                name=name,
                axes=values,
                train_key=cell_name({a: v for a, v in values.items() if a not in EVAL_AXES}),
                train=train,
                encoder=values.get("encoders", "sasrec"),
                train_fraction=float(values.get("train_fraction", 1.0)),
                candidates=values.get("candidates"),
            )
        )
    return cells


def reference_cell(cells: list[Cell], name: str | None) -> Cell:
    """The cell every other is tested against: ``name``, or the first cell of the grid."""
    if name is None:
        return cells[0]
    for cell in cells:
        if cell.name == name:
            return cell
    raise UserError(f"No cell named {name!r} in this grid; the cells are: {', '.join(c.name for c in cells)}.")
