"""Where an ablation keeps its files: one run directory per training, one JSON document per cell, written whole."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def run_dir(p, cell) -> Path:
    """The training run of ``cell`` (cells that differ only in evaluation share it)."""
    return p.directory / "runs" / cell.train_key


def cell_file(p, cell) -> Path:
    return p.directory / "cells" / f"{cell.name}.json"


def write_json(path: Path, doc: Any) -> None:
    """``doc`` as JSON at ``path``, atomically (a reader never sees half a file)."""
    from ..console import _json_default

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)
