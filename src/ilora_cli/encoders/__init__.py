"""Collaborative encoders (SASRec, GRU4Rec, Caser): trained by ``ilora encode``, then frozen for the LLM.

Each encoder maps right-padded histories to (B, hidden) user representations and owns an item table
whose rows feed the hybrid prompt (METHOD.md §3).
"""

from __future__ import annotations

from .base import SequentialEncoder
from .caser import Caser, CaserConfig
from .gru4rec import GRU4Rec, GRU4RecConfig
from .sasrec import SASRec, SASRecConfig

# type name -> (model class, config class); the name is what encoder.json records.
ENCODERS: dict[str, tuple[type[SequentialEncoder], type]] = {
    "sasrec": (SASRec, SASRecConfig),
    "gru4rec": (GRU4Rec, GRU4RecConfig),
    "caser": (Caser, CaserConfig),
}

__all__ = [
    "ENCODERS",
    "Caser",
    "CaserConfig",
    "GRU4Rec",
    "GRU4RecConfig",
    "SASRec",
    "SASRecConfig",
    "SequentialEncoder",
]
