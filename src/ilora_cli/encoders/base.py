"""What every collaborative encoder shares: the item table, the padding convention and scoring.

Input convention (METHOD.md §2): ``seq`` (B, L) item ids, oldest first, right-padded with the padding id
``n_items``; ``len_seq`` (B,) the number of real items, at least 1.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SequentialEncoder(nn.Module):
    """Base class: an item embedding table with a padding row, and user representations from histories."""

    kind = ""  # the registry name written into encoder.json

    def __init__(self, n_items: int, hidden_size: int):
        super().__init__()
        self.n_items = n_items
        self.pad_id = n_items
        self.hidden_size = hidden_size
        self.item_embedding = nn.Embedding(n_items + 1, hidden_size, padding_idx=n_items)

    def forward(self, seq: torch.Tensor, len_seq: torch.Tensor) -> torch.Tensor:
        """(B, hidden) user representations."""
        raise NotImplementedError

    def item_embeddings(self) -> torch.Tensor:
        """(n_items, hidden) item rows, without the padding row (not contextualised)."""
        return self.item_embedding.weight[: self.n_items]

    def score_all(self, seq: torch.Tensor, len_seq: torch.Tensor) -> torch.Tensor:
        """(B, n_items) dot-product scores of every catalogue item."""
        return self(seq, len_seq) @ self.item_embeddings().T  # (B, d) @ (d, N) -> (B, N)


def real_mask(seq: torch.Tensor, len_seq: torch.Tensor) -> torch.Tensor:
    """(B, L) True at real positions (< len_seq), False at padding, whatever ids the padding holds."""
    positions = torch.arange(seq.shape[1], device=seq.device)  # (L,)
    return positions[None, :] < len_seq[:, None]  # (B, L)


def embed_history(embedding: nn.Embedding, seq: torch.Tensor, len_seq: torch.Tensor) -> torch.Tensor:
    """(B, L, d) embeddings with padding positions zeroed, so the ids stored there never matter."""
    mask = real_mask(seq, len_seq)  # (B, L)
    safe = seq.masked_fill(~mask, embedding.padding_idx)  # (B, L)
    return embedding(safe) * mask[..., None]  # (B, L, d)


def last_position(h: torch.Tensor, len_seq: torch.Tensor) -> torch.Tensor:
    """(B, d) the output at each row's last real position ``len_seq - 1``."""
    index = (len_seq - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, h.shape[-1])  # (B, 1, d)
    return h.gather(1, index).squeeze(1)  # (B, d)


def clip_history(
    seq: torch.Tensor, len_seq: torch.Tensor, max_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``max_len`` most recent items of each right-padded history: (B, min(L, max_len)) and (B,)."""
    if seq.dim() != 2 or len_seq.shape != seq.shape[:1]:
        raise ValueError(f"expected seq (B, L) and len_seq (B,), got {tuple(seq.shape)} and {tuple(len_seq.shape)}")
    L = seq.shape[1]
    if L <= max_len:
        return seq, len_seq
    start = (len_seq - max_len).clamp(min=0)  # (B,)
    index = (start[:, None] + torch.arange(max_len, device=seq.device)[None, :]).clamp(max=L - 1)  # (B, max_len)
    kept = len_seq.clamp(max=max_len)  # (B,)
    out = seq.gather(1, index)  # (B, max_len)
    return out.masked_fill(~real_mask(out, kept), pad_id), kept
