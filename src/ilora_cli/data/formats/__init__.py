"""Source formats. Each module exposes ``load(options: PrepareConfig) -> SourceData``.

The registry maps the ``--format`` names to those functions; modules are imported lazily so that a
format's optional parsing code is only loaded when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..source import SourceData

FORMATS: dict[str, str] = {
    "llara": "llara",
    "ml-100k": "movielens",
    "hetrec-lastfm": "hetrec_lastfm",
    "steam": "steam",
    "interactions": "interactions",
    "synthetic": "synthetic",
}


def loader(fmt: str) -> Callable[[Any], SourceData]:
    """The ``load`` function of a format (it takes the PrepareConfig of data/prepare.py)."""
    module = importlib.import_module(f"{__name__}.{FORMATS[fmt]}")
    return module.load
