"""Resumable checkpoints in safe formats: tensors in safetensors, everything else in JSON.

A checkpoint directory holds ``trainable.safetensors`` (every trainable parameter by name),
``optimizer.safetensors`` + ``optimizer.json`` (AdamW moments and parameter groups),
``state.json`` (step, samples consumed, scheduler state, loss), ``rng.safetensors`` (torch RNG
states) and, last, ``manifest.json`` (every file's size and SHA-256). Directories are written atomically
and flushed to the disk, so an interrupted save never leaves a broken checkpoint; one damaged afterwards
fails its manifest and is skipped for the older one that is kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..home import atomic_directory, manifest_problem, write_manifest

_STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_to_safe(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_safe(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``directory/step-NNNNNN`` atomically and keep only the newest ``keep`` checkpoints."""
    target = Path(directory) / f"step-{state['step']:06d}"
    opt_tensors, opt_meta = optimizer_to_safe(optimizer)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = s
    with atomic_directory(target, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta) + "\n")
        save_file(rng, tmp / "rng.safetensors")
        full = dict(state, scheduler=scheduler.state_dict())
        (tmp / "state.json").write_text(json.dumps(full, indent=2, default=_jsonable) + "\n")
        write_manifest(tmp)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _jsonable(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.tolist()
    if callable(obj):
        return None
    raise TypeError(type(obj).__name__)


def list_checkpoints(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


class DamagedCheckpoint(Exception):
    """A checkpoint that fails its manifest or cannot be read; the message says why."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Everything :func:`save_checkpoint` wrote, as tensors and dicts (nothing applied yet), after checking
    it against its manifest; raises :class:`DamagedCheckpoint` for one that fails or cannot be read."""
    path = Path(path)
    if (path / "manifest.json").exists() or not (path / "state.json").is_file():
        problem = manifest_problem(path)  # checkpoints of older versions have no manifest: read them as they are
        if problem is not None:
            raise DamagedCheckpoint(problem)
    try:
        state = json.loads((path / "state.json").read_text())
        ck = {
            "trainable": load_file(path / "trainable.safetensors"),
            "optimizer": optimizer_from_safe(
                load_file(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text())
            ),
            "rng": load_file(path / "rng.safetensors"),
            "state": state,
        }
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, SafetensorError) as exc:
        raise DamagedCheckpoint(f"it cannot be read ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "scheduler" not in state:
        raise DamagedCheckpoint("its state.json lacks the step or the scheduler state")
    if "torch" not in ck["rng"]:
        raise DamagedCheckpoint("its rng.safetensors lacks the random state")
    return ck


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def truncate_log(log_file: Path, step: int) -> None:
    """Keep the log records up to ``step``, written atomically."""
    if not log_file.is_file():
        return
    kept = []
    for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # the half-written last line of a killed process
    tmp = log_file.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
    tmp.replace(log_file)
