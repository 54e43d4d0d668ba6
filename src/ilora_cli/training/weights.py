"""Which parameters training changes, and one digest of them to compare runs, processes and reloaded copies."""

from __future__ import annotations

from pathlib import Path


def is_trained_weight(name: str) -> bool:
    """Whether an :class:`ILoraModel` parameter is one that training changes (and a run saves)."""
    return "lora_" in name or name.startswith(
        ("projector.", "user_projector.", "gate.", "token_routers.", "fusion.", "item_head.")
    )


def weights_digest(model) -> str:
    """SHA-256 over the weights that training changes (LoRA, projector, gate, routers, fusion; name order),
    to compare processes, runs, or a run with its reloaded copy bit for bit. Chosen by name, not by
    ``requires_grad``, so that a reloaded (frozen) run hashes the same set."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if is_trained_weight(name):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def encoder_sha256(encoder_dir: Path) -> str:
    """The SHA-256 of an encoder directory's weights file (what a run was trained with)."""
    from .run import file_sha256

    return file_sha256(Path(encoder_dir) / "encoder.safetensors")
