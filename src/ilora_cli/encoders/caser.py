"""Caser (Tang & Wang, 2018): horizontal and vertical convolutions over the L x d history "image".

Histories arrive right-padded; Caser's vertical filters weight positions, so each history is first
moved to end at the last row (the most recent item always sits at position L - 1) with zero rows before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import SequentialEncoder, clip_history, embed_history


@dataclass
class CaserConfig:
    hidden_size: int = 64  # item embedding width and output width
    n_h: int = 16  # horizontal filters per height (heights 1..max_len)
    n_v: int = 4  # vertical filters
    dropout: float = 0.1  # on the concatenated convolution features
    max_len: int = 10  # history rows of the image (L)


class Caser(SequentialEncoder):
    kind = "caser"

    def __init__(self, config: CaserConfig, n_items: int):
        super().__init__(n_items, config.hidden_size)
        self.config = config
        L, d = config.max_len, config.hidden_size
        self.vertical = nn.Conv2d(1, config.n_v, (L, 1))
        self.horizontal = nn.ModuleList(nn.Conv2d(1, config.n_h, (h, d)) for h in range(1, L + 1))
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(config.n_v * d + config.n_h * L, d)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.zeros_(self.item_embedding.weight[self.pad_id])

    def _end_aligned(self, seq: torch.Tensor, len_seq: torch.Tensor) -> torch.Tensor:
        """(B, L, d) embeddings with each history ending at row L - 1 and zero rows before it."""
        x = embed_history(self.item_embedding, seq, len_seq)  # (B, L_in, d), zeros at padding
        L = self.config.max_len
        x = F.pad(x, (0, 0, 0, L - x.shape[1]))  # (B, L, d): right-pad to max_len rows
        # Row j of the output takes input row j - (L - len); those indices wrap into zero rows.
        src = (torch.arange(L, device=seq.device)[None, :] - (L - len_seq[:, None])) % L  # (B, L)
        return x.gather(1, src[..., None].expand(-1, -1, x.shape[2]))  # (B, L, d)

    def forward(self, seq: torch.Tensor, len_seq: torch.Tensor) -> torch.Tensor:
        seq, len_seq = clip_history(seq, len_seq, self.config.max_len, self.pad_id)
        E = self._end_aligned(seq, len_seq).unsqueeze(1)  # (B, 1, L, d)
        v = self.vertical(E).flatten(1)  # (B, n_v, 1, d) -> (B, n_v * d)
        hs = []
        for conv in self.horizontal:
            c = F.relu(conv(E).squeeze(3))  # (B, n_h, L - h + 1)
            hs.append(c.max(dim=2).values)  # (B, n_h)
        o = self.dropout(torch.cat([v, *hs], dim=1))  # (B, n_v * d + n_h * L)
        return F.relu(self.fc(o))  # (B, d)
