"""Which training settings decide what a run learns, so that a run is never continued with others.

A resumed run (``train --resume``, or an ablation cell continued from its checkpoint) must learn what the
interrupted one would have: the same data order, batch composition, schedule and model. The settings that
only say how this invocation runs (where it writes, how often it logs or checkpoints, when it stops, the
device) may change between the two; any other difference would mix two runs into one, and is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError

# Training settings that do not change what a run learns: a run may be resumed with other values.
OPERATIONAL = (
    "dataset",
    "name",
    "output",
    "overwrite",
    "resume",
    "encoder",
    "stop_after",
    "quiet",
    "threads",
    "checkpoint_every",
    "log_every",
    "device",
    "validate_every",
    "validate_at",
    "validate_rows",
    "validate_draws",
)


def identity(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The training settings that decide what a run learns (resolved defaults included)."""
    return {k: v for k, v in config_dict.items() if k not in OPERATIONAL}


def differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"seed: 5 there, 7 now"`` for every setting of ``now`` that decides what a run learns and differs."""
    old, new = identity(before), identity(now)
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in new if new.get(k) != old.get(k)]


def check_resume(run_dir: Path, config) -> None:
    """Refuse to resume the run in ``run_dir`` with settings other than those it was started with (its
    ``config.yaml``), naming them; a run is continued only as the run it is."""
    from ..config import resolve, to_dict
    from .config import TrainConfig

    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return
    try:
        before = resolve(TrainConfig, saved)
    except UserError as exc:
        raise UserError(f"The run {run_dir} cannot be resumed: its config.yaml is not valid ({exc})") from None
    diff = differences(to_dict(before), to_dict(config))
    if diff:
        raise UserError(
            f"The run {run_dir} was started with other settings ({'; '.join(diff[:4])}"
            f"{'; ...' if len(diff) > 4 else ''}); resuming it would mix two runs: give the same settings, or "
            "start a new run (--overwrite, or another --name or --output)."
        )


def data_identity(dataset, encoder_sha256: str, holdout_spec: str) -> dict[str, Any]:
    """What a run learns from besides its settings: the dataset (by name and checksum, not by where it lies), the
    encoder (by the checksum of its weights) and the holdout that divided the rows; checkpoints record it."""
    return {
        "dataset": {"name": dataset.name, "checksum": dataset.checksum},
        "encoder_sha256": encoder_sha256,
        "holdout": holdout_spec,
    }


def data_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"dataset: 'a' (checksum 1a2b...) there, 'b' (...) now"`` for every part of :func:`data_identity` that
    differs; a part ``before`` does not record (a checkpoint of an older version) is not compared."""

    def dataset(d: dict[str, Any]) -> str:
        return f"{d.get('name')!r} (checksum {str(d.get('checksum'))[:12]})"

    out = []
    old_ds, new_ds = before.get("dataset"), now["dataset"]
    if isinstance(old_ds, dict) and old_ds.get("checksum") != new_ds["checksum"]:
        out.append(f"dataset: {dataset(old_ds)} there, {dataset(new_ds)} now")
    old_enc = before.get("encoder_sha256")
    if old_enc is not None and old_enc != now["encoder_sha256"]:
        out.append(f"encoder: weights {str(old_enc)[:12]} there, {now['encoder_sha256'][:12]} now")
    if before.get("holdout") is not None and before["holdout"] != now["holdout"]:
        out.append(f"holdout: {before['holdout']!r} there, {now['holdout']!r} now")
    return out


def check_resume_data(run_dir: Path, before: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume the run in ``run_dir`` on another dataset, encoder or holdout than it was trained on."""
    diff = data_differences(before, now)
    if diff:
        raise UserError(
            f"The run {run_dir} was trained on other data ({'; '.join(diff)}); resuming it would mix two runs: give "
            "the dataset, encoder and holdout it was started with, or start a new run (--overwrite, or another "
            "--name or --output)."
        )


def saved_config(run_dir: Path):
    """The training settings a run was started with (its ``config.yaml``), or one sentence saying why that file is
    not a training config (not YAML, a list, unknown keys, ...)."""
    from ..config import resolve
    from .config import TrainConfig

    try:
        return resolve(TrainConfig, Path(run_dir) / "config.yaml")
    except UserError as exc:
        raise UserError(
            f"The run {run_dir} has no valid config.yaml ({str(exc).rstrip('.')}); train it again or restore a copy."
        ) from None
