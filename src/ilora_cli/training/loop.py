"""``ilora train`` in one import: the settings, the trainer and the pieces scripts reach for.

The training package keeps one idea per file — config.py (:class:`TrainConfig` and its checks), batches.py (a
step's prompts, built ahead), loss.py (the loss of one batch), trainer.py (setup → loop → save), validation.py
(validation, the kept best checkpoint, the pictures) — and this module gathers what callers use.
"""

from __future__ import annotations

from .batches import Prefetcher, build_batch
from .config import DEFAULT_DISTILL_WEIGHT, DEFAULT_ITEM_EPOCHS, FUSIONS, LABELS, OBJECTIVES, PROMPTS, TrainConfig
from .loss import batch_loss
from .trainer import Trainer, ensure_encoder, lr_lambda, train
from .weights import is_trained_weight, weights_digest

__all__ = [
    "DEFAULT_DISTILL_WEIGHT",
    "DEFAULT_ITEM_EPOCHS",
    "FUSIONS",
    "LABELS",
    "OBJECTIVES",
    "PROMPTS",
    "Prefetcher",
    "TrainConfig",
    "Trainer",
    "batch_loss",
    "build_batch",
    "ensure_encoder",
    "is_trained_weight",
    "lr_lambda",
    "train",
    "weights_digest",
]
