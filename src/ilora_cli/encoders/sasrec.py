"""SASRec (Kang & McAuley, 2018): causal self-attention over the history; the user is the last real position.

METHOD.md §3 defaults: hidden 64, 1 block, 1 head, max length 10, dropout 0.1, learned absolute positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import SequentialEncoder, clip_history, embed_history, last_position, real_mask


@dataclass
class SASRecConfig:
    hidden_size: int = 64  # item embedding and model width
    num_blocks: int = 1  # self-attention blocks
    num_heads: int = 1  # attention heads per block (must divide hidden_size)
    dropout: float = 0.1  # on embeddings, attention weights and block outputs
    max_len: int = 10  # longest history (number of learned positions)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.n_head = config.num_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # 3 x (B, L, d)
        q = q.view(B, L, self.n_head, d // self.n_head).transpose(1, 2)  # (B, h, L, d/h)
        k = k.view(B, L, self.n_head, d // self.n_head).transpose(1, 2)  # (B, h, L, d/h)
        v = v.view(B, L, self.n_head, d // self.n_head).transpose(1, 2)  # (B, h, L, d/h)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, L, d/h)
        y = y.transpose(1, 2).contiguous().view(B, L, d)  # (B, L, d)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """SASRec's point-wise feed-forward network: d -> d -> d with a ReLU."""

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.relu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), allowed)  # (B, L, d)
        return x + self.ffn(self.ln_2(x))  # (B, L, d)


class SASRec(SequentialEncoder):
    kind = "sasrec"

    def __init__(self, config: SASRecConfig, n_items: int):
        super().__init__(n_items, config.hidden_size)
        if config.hidden_size % config.num_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
        self.config = config
        self.position_embedding = nn.Embedding(config.max_len, config.hidden_size)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        self.ln_f = nn.LayerNorm(config.hidden_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

    def forward(self, seq: torch.Tensor, len_seq: torch.Tensor) -> torch.Tensor:
        seq, len_seq = clip_history(seq, len_seq, self.config.max_len, self.pad_id)
        B, L = seq.shape
        positions = torch.arange(L, device=seq.device)  # (L,)
        # Scaled as in SASRec so that positions do not drown the item signal.
        x = embed_history(self.item_embedding, seq, len_seq) * math.sqrt(self.hidden_size)  # (B, L, d)
        x = self.emb_dropout(x + self.position_embedding(positions)[None])  # (B, L, d)
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()  # (L, L)
        # Padding keys are hidden too; every query still sees position 0, which is always real.
        allowed = (causal[None] & real_mask(seq, len_seq)[:, None, :])[:, None]  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, allowed)  # (B, L, d)
        return last_position(self.ln_f(x), len_seq)  # (B, d)
