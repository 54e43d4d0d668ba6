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
