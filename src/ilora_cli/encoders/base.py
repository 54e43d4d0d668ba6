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

    def score_candidates(self, seq: torch.Tensor, len_seq: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, C) dot-product scores of each row's candidates: the same numbers as ``score_all`` picks out."""
        user = self(seq, len_seq)  # (B, d)
        items = self.item_embedding(candidates)  # (B, C, d)
        return torch.einsum("bd,bcd->bc", user, items)  # (B, C)

    @torch.no_grad()
    def top_items(self, seq, len_seq, n: int, batch_size: int = 1024):
        """(N, n) numpy array: each row's ``n`` best-scored items of the whole catalogue, its history excluded.

        ``seq`` (N, L) and ``len_seq`` (N,) may be numpy arrays or tensors on any device; the work happens on
        the encoder's device and the result comes back to the CPU.
        """
        import numpy as np

        device = self.item_embedding.weight.device
        seq = torch.as_tensor(seq, dtype=torch.long)
        len_seq = torch.as_tensor(len_seq, dtype=torch.long)
        out = []
        for start in range(0, len(seq), batch_size):
            s = seq[start : start + batch_size].to(device)  # (b, L)
            lens = len_seq[start : start + batch_size].to(device)  # (b,)
            scores = self.score_all(s, lens).float()  # (b, n_items)
            # one spare column takes the padding id (= n_items) and the history gets -inf
            scores = torch.cat([scores, scores.new_zeros(len(s), 1)], dim=1)  # (b, n_items + 1)
            history = s.masked_fill(~real_mask(s, lens), self.n_items)  # (b, L): padding -> the spare column
            scores.scatter_(1, history, float("-inf"))
            out.append(scores[:, :-1].topk(n, dim=1).indices.cpu().numpy())  # (b, n)
        return np.concatenate(out) if out else np.zeros((0, n), dtype=np.int64)


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
