"""Encoder artifacts: ``encoder.safetensors`` (weights) and ``encoder.json`` (what rebuilds the module).

No pickles: the type and sizes in the JSON rebuild the module, and safetensors fills its weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..data.prepared import PreparedDataset
from ..errors import UserError
from ..home import encoder_dir
from . import ENCODERS
from .base import SequentialEncoder

WEIGHTS_FILE = "encoder.safetensors"
CONFIG_FILE = "encoder.json"
FORMAT_VERSION = 1
MAX_ITEMS, MAX_HIDDEN = 100_000_000, 8192  # what an encoder.json may ask to allocate


def build_encoder(kind: str, n_items: int, model_config: dict[str, Any]) -> SequentialEncoder:
    """A freshly initialised encoder of type ``kind`` from its config fields."""
    if kind not in ENCODERS:
        raise UserError(f"Unknown encoder type {kind!r}; choose one of: {', '.join(ENCODERS)}.")
    model_cls, config_cls = ENCODERS[kind]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(map(str, set(model_config) - names))
    if unknown:
        raise UserError(f"Unknown {kind} setting{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}.")
    return model_cls(config_cls(**model_config), n_items)


def save_encoder(model: SequentialEncoder, config_dict: dict[str, Any], directory: Path) -> Path:
    """Write the weights and ``encoder.json`` (type, sizes, plus ``config_dict``) into ``directory``.

    For an all-or-nothing write, pass the temporary directory of ``home.atomic_directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "type": model.kind})
    doc = {
        "format_version": FORMAT_VERSION,
        "type": model.kind,
        "model": dataclasses.asdict(model.config),
        "n_items": model.n_items,
        "pad_id": model.pad_id,
        "hidden_size": model.hidden_size,
        "max_len": model.config.max_len,
        "tool_version": __version__,
        **config_dict,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return directory


def resolve_encoder_dir(name_or_path: str | Path) -> Path:
    """A directory holding ``encoder.json``: a path, or a name under ``$ILORA_HOME/encoders``."""
    p = Path(name_or_path)
    if (p / CONFIG_FILE).is_file():
        return p
    if isinstance(name_or_path, str) and "/" not in name_or_path:
        d = encoder_dir(name_or_path)
        if (d / CONFIG_FILE).is_file():
            return d
        raise UserError(f"No encoder named {name_or_path!r} in {d.parent}; run `ilora encode` first.")
    raise UserError(f"{p} is not an encoder directory (no {CONFIG_FILE}); run `ilora encode` first.")


def load_encoder(
    name_or_path: str | Path, device: str | torch.device = "cpu"
) -> tuple[SequentialEncoder, dict[str, Any]]:
    """Rebuild a saved encoder, frozen (no gradients) and in eval mode; returns it and its encoder.json."""
    directory = resolve_encoder_dir(name_or_path)
    try:
        info = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{directory / CONFIG_FILE} is not valid JSON: {type(exc).__name__}.") from None
    if not isinstance(info, dict) or not {"type", "model", "n_items"} <= set(info):
        raise UserError(f"{directory / CONFIG_FILE} is not an encoder description (needs type, model, n_items).")
    if info.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise UserError(f"{directory} was written by a newer version of ilora; upgrade to load it.")
    try:
        sizes = dict(info["model"])
        n_items, hidden = int(info["n_items"]), int(sizes.get("hidden_size", 1))
        if not (1 <= n_items <= MAX_ITEMS and 1 <= hidden <= MAX_HIDDEN):
            raise ValueError(f"{n_items} items of width {hidden}")
        model = build_encoder(info["type"], n_items, sizes)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
        # a hand-edited encoder.json: sizes of the wrong type or out of range (checked before allocating)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{directory / CONFIG_FILE} does not describe a buildable encoder ({first}).") from None
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{directory} has no {WEIGHTS_FILE}.")
    try:
        state = load_file(str(weights))
    except SafetensorError as exc:
        raise UserError(f"{weights} is not a readable safetensors file: {exc}.") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"The weights in {weights} do not match its {CONFIG_FILE}: {first}") from None
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    info["path"] = str(directory)
    return model, info


def check_compatible(info: dict[str, Any], dataset: PreparedDataset) -> None:
    """Refuse an encoder trained on another catalogue: its item rows would mean different items."""
    where = info.get("path", "the encoder")
    trained = info.get("dataset") or {}
    if not isinstance(trained, dict):  # an edited encoder.json: its dataset must describe one, with a checksum
        raise UserError(f"{where}/{CONFIG_FILE} does not describe the dataset it was trained on; train it again.")
    trained_name = trained.get("name", "?")
    if int(info["n_items"]) != dataset.n_items:
        raise UserError(
            f"The encoder {where} was trained on {trained_name!r} with {info['n_items']} items, but the "
            f"dataset {dataset.name!r} has {dataset.n_items}; train an encoder on it with "
            f"`ilora encode --dataset {dataset.name}`."
        )
    if trained.get("checksum") != dataset.checksum:
        raise UserError(
            f"The encoder {where} was trained on a different dataset ({trained_name!r}, checksum "
            f"{str(trained.get('checksum'))[:12]}) than {dataset.name!r} (checksum {dataset.checksum[:12]}); "
            f"train an encoder on it with `ilora encode --dataset {dataset.name}`."
        )
