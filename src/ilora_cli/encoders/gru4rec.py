"""GRU4Rec (Hidasi et al., 2016): a GRU over the history; the user is its state after the last real item."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import SequentialEncoder, clip_history, embed_history, last_position


@dataclass
class GRU4RecConfig:
    hidden_size: int = 64  # item embedding and GRU state width
    num_layers: int = 1  # stacked GRU layers
    dropout: float = 0.1  # on the input embeddings and the GRU outputs
    max_len: int = 10  # longest history accepted


class GRU4Rec(SequentialEncoder):
    kind = "gru4rec"

    def __init__(self, config: GRU4RecConfig, n_items: int):
        super().__init__(n_items, config.hidden_size)
        self.config = config
        self.emb_dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(
            config.hidden_size,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.out_dropout = nn.Dropout(config.dropout)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.zeros_(self.item_embedding.weight[self.pad_id])

    def forward(self, seq: torch.Tensor, len_seq: torch.Tensor) -> torch.Tensor:
        seq, len_seq = clip_history(seq, len_seq, self.config.max_len, self.pad_id)
        x = self.emb_dropout(embed_history(self.item_embedding, seq, len_seq))  # (B, L, d)
        # Right padding comes after the last real item, so a plain (unpacked) GRU never reads it
        # before that position: the state there is exactly the state of the real history.
        h, _ = self.gru(x)  # (B, L, d)
        return self.out_dropout(last_position(h, len_seq))  # (B, d)
