"""What an ablation is: its axes, the training settings shared by every cell, and where it lives."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (
    MAX_SEED,
    as_written,
    check_minimums,
    check_seed,
    load_yaml,
    parse_overrides,
    resolve,
    written_overrides,
    written_scalars,
)
from ..errors import UserError
from ..home import check_name, ilora_home

# The most cells a grid may have: each trains a run (minutes to hours), so a larger grid is a typo or a plan for
# months; refusing it at once also keeps --dry-run instant (a grid of 10^6 cells was expanded before).
MAX_CELLS = 1000
# Training settings the ablation sets itself, per cell or once: they cannot be given as key=value.
MANAGED = ("dataset", "name", "output", "overwrite", "resume", "encoder")
# Training settings that are also axes: key=value fixes them for every cell, unless the axis is given.
AXIS_SETTINGS = {"experts": "experts", "gate": "gates", "prompt": "prompts", "objective": "objectives", "seed": "seeds"}


@dataclass
class AblateConfig:
    dataset: str | None = None  # prepared dataset the cells train on (name or path)
    eval_dataset: str | None = None  # evaluate on this dataset instead, its items mapped by title (cross-domain)
    experts: list[int] | None = None  # axis: LoRA experts K at the fixed total rank
    gates: list[str] | None = None  # axis: user, mlp, token, prompt, uniform
    encoders: list[str] | None = None  # axis: sasrec, gru4rec, caser
    prompts: list[str] | None = None  # axis: hybrid, text
    objectives: list[str] | None = None  # axis: rank, generate
    candidates: list[int] | None = None  # axis: candidates per evaluation row (stored draws extended or cut)
    train_fraction: list[float] | None = None  # axis: fraction of the training users kept (seeded)
    seeds: list[int] | None = None  # axis: training seeds
    reference: str | None = None  # the cell every other is tested against (default: the first)
    split: str = "val"  # evaluation split: val or test
    eval_draws: int | None = None  # evaluate on the first N stored candidate draws (None: all)
    eval_rows: int | None = None  # evaluate on the first N rows only (a quick look; reported as such)
    eval_batch_size: int = 8  # prompts per evaluation forward
    encode_epochs: int | None = None  # at most this many epochs for encoders the ablation trains
    seed: int = 42  # user subsets, cross-domain candidates, the permutation test; the training seed without seeds
    permutations: int = 20_000  # random sign flips of the significance test when it is not exact
    name: str | None = None  # directory name under $ILORA_HOME/ablations (default: dataset and axes)
    output: Path | None = None  # the ablation directory, instead of $ILORA_HOME/ablations/<name>
    overwrite: bool = False  # delete an existing ablation directory first
    dry_run: bool = False  # list the cells and the time they will take; train nothing
    quiet: bool = False  # no progress bars
    train: dict[str, Any] = field(default_factory=dict)  # training settings shared by every cell (key=value)

    def validate(self) -> None:
        from ..encoders import ENCODERS
        from ..llm.experts import GATE_TYPES
        from ..training.config import OBJECTIVES, PROMPTS

        if self.dataset is None:
            raise UserError("Pass --dataset (or --train-dataset) to name the prepared dataset the cells train on.")
        for axis, allowed in (
            ("gates", GATE_TYPES),
            ("encoders", tuple(ENCODERS)),
            ("prompts", PROMPTS),
            ("objectives", OBJECTIVES),
        ):
            for value in getattr(self, axis) or []:
                if value not in allowed:
                    raise UserError(f"Unknown value {value!r} in --{axis}; choose from {', '.join(allowed)}.")
        for axis in ("experts", "gates", "encoders", "prompts", "objectives", "candidates", "train_fraction", "seeds"):
            values = getattr(self, axis)
            if values is not None and (not values or len(set(values)) != len(values)):
                raise UserError(f"--{axis.replace('_', '-')} needs distinct comma-separated values; got {values}.")
        check_seed(self)
        if any(not 0 <= s <= MAX_SEED for s in self.seeds or []):
            raise UserError(f"Seeds must be in [0, {MAX_SEED}]; got {self.seeds}.")
        if any(k < 1 for k in self.experts or []):
            raise UserError(f"Expert counts must be at least 1; got {self.experts}.")
        if any(c < 2 for c in self.candidates or []):
            raise UserError(f"An evaluation needs at least 2 candidates; got {self.candidates}.")
        if any(not 0 < f <= 1 for f in self.train_fraction or []):
            raise UserError(f"Train fractions must be in (0, 1]; got {self.train_fraction}.")
        self._check_size()
        if self.split not in ("val", "test"):
            raise UserError(f"Unknown split {self.split!r}; choose val or test.")
        check_minimums(self, {"eval_draws": 1, "eval_rows": 1, "eval_batch_size": 1, "encode_epochs": 1})
        if self.permutations < 100:
            raise UserError(f"permutations must be at least 100; got {self.permutations}.")
        if self.name is not None:
            check_name(self.name, "ablation name")
        self._check_train_settings()

    def _check_size(self) -> None:
        """Count the cells before anything expands them; refuse a grid too large to run, or whose cells would
        share a name (values that print alike, such as 0.5 and 0.5000001)."""
        sizes = {a: len(getattr(self, a)) for a in AXES_ORDER if getattr(self, a) is not None}
        cells = math.prod(sizes.values())
        if cells > MAX_CELLS:
            axes = " x ".join(f"{n:,} {a.replace('_', ' ')}" for a, n in sizes.items())
            raise UserError(
                f"The grid has {cells:,} cells ({axes}); at most {MAX_CELLS:,} are allowed, as each cell trains a "
                "run: split it into smaller ablations."
            )
        for axis in sizes:
            label = AXES[axis][1]
            seen: dict[str, Any] = {}
            for value in getattr(self, axis):
                other = seen.setdefault(label(value), value)
                if other != value:
                    raise UserError(
                        f"--{axis.replace('_', '-')} values {other} and {value} would both be named "
                        f"{label(value)!r}; give values that differ in their first six significant digits."
                    )

    def _check_train_settings(self) -> None:
        from ..training.config import TrainConfig

        managed = sorted(set(self.train) & set(MANAGED))
        if managed:
            raise UserError(
                f"The ablation sets {', '.join(managed)} itself; use --dataset, --encoders and --output instead."
            )
        for key, axis in AXIS_SETTINGS.items():
            if key in self.train and getattr(self, axis) is not None:
                raise UserError(f"{key} is an axis of this ablation (--{axis}); drop {key}={self.train[key]}.")
        # Resolved once here so that a bad key or value is refused before anything runs.
        self.train = train_settings(self.train)
        resolve(TrainConfig, None, {**self.train, "dataset": self.dataset})

    def directory(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        return ilora_home() / "ablations" / (self.name or default_name(self))


def train_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Shared training settings checked against :class:`TrainConfig`: unknown keys refused, values coerced."""
    from ..config import _field_types
    from ..training.config import TrainConfig

    types = _field_types(TrainConfig)
    unknown = sorted(map(str, set(values) - set(types)))
    if unknown:
        raise UserError(
            f"Unknown training setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"valid keys are: {', '.join(sorted(set(types) - set(MANAGED)))}."
        )
    from ..config import _coerce

    return {k: _coerce(k, v, types[k]) for k, v in values.items()}


def default_name(config: AblateConfig) -> str:
    """``<dataset>-<axes>`` (e.g. ``lastfm-experts``); ``-on-<eval dataset>`` for a cross-domain ablation."""
    axes = [a.replace("_", "-") for a in AXES_ORDER if getattr(config, a) is not None]
    name = "-".join([Path(str(config.dataset)).name, *(axes or ["base"])])
    if config.eval_dataset:
        name += f"-on-{Path(config.eval_dataset).name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


# axis -> (training setting it sets, how a cell name writes its value)
AXES: dict[str, tuple[str | None, Any]] = {
    "experts": ("experts", lambda v: f"k{v}"),
    "gates": ("gate", lambda v: f"gate-{v}"),
    "encoders": (None, str),
    "prompts": ("prompt", str),
    "objectives": ("objective", str),
    "train_fraction": (None, lambda v: f"users{v:g}"),
    "seeds": ("seed", lambda v: f"seed{v}"),
    "candidates": (None, lambda v: f"c{v}"),
}
AXES_ORDER = ("experts", "gates", "encoders", "prompts", "objectives", "train_fraction", "seeds", "candidates")


def _as_written(values: dict[str, Any], written: dict[str, str]) -> dict[str, Any]:
    """Training settings that hold text (names, paths) as written, not as YAML read them (007, yes)."""
    from ..config import _field_types
    from ..training.config import TrainConfig

    types = _field_types(TrainConfig)
    return {k: as_written(v, written.get(k), types[k]) if k in types else v for k, v in values.items()}


def resolve_ablation(config_file: Path | None, flags: dict[str, Any], overrides: list[str] | None) -> AblateConfig:
    """The ablation from a YAML file (ablation keys plus a ``train:`` mapping), flags, and key=value pairs.

    A key=value pair sets the ablation's own setting of that name (eval_draws, encode_epochs, seed, ...);
    any other key is a training setting shared by every cell.
    """
    fields = {f.name for f in dataclasses.fields(AblateConfig)}
    own = fields - {"train", "dataset", *AXES_ORDER}
    yaml_doc = load_yaml(config_file)
    train = yaml_doc.pop("train", None) or {}
    if not isinstance(train, dict):
        raise UserError(f"In the config file {config_file}, train must be a mapping of training settings.")
    unknown = sorted(map(str, set(yaml_doc) - fields))
    if unknown:
        raise UserError(
            f"Unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in the config file; "
            f"valid keys are: {', '.join(sorted(fields))} (training settings go under train:)."
        )
    train = _as_written(dict(train), written_scalars(config_file, "train"))
    pairs = {k: v for k, v in parse_overrides(overrides).items() if k not in own}
    train.update(_as_written(pairs, written_overrides(overrides)))
    ablation_pairs = [p for p in overrides or [] if p.partition("=")[0].strip() in own]
    merged = {**yaml_doc, **{k: v for k, v in flags.items() if v is not None}}
    config = resolve(AblateConfig, None, merged, ablation_pairs)
    config.train = train
    config.validate()
    return config
