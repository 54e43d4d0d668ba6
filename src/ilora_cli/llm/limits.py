"""Settings checked against the loaded backbone's sizes, before anything is allocated for them."""

from __future__ import annotations

from ..errors import UserError


def check_rank(model, rank: int) -> None:
    """Refuse a LoRA rank wider than the backbone's hidden size. A LoRA of rank r adds r x (in + out) weights to
    every adapted layer, and beyond the layers' width it adds only weights (before: rank=10^6 allocated 5.6 GB
    before failing); the check reads the model's embedding width, so it costs nothing."""
    width = model.get_input_embeddings().embedding_dim
    if rank > width:
        raise UserError(
            f"rank {rank} is wider than the backbone's hidden size ({width}): a LoRA wider than the layers it "
            f"adapts adds weights but no capacity; use at most rank={width}."
        )
