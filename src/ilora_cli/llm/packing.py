"""The layout of packed title scoring: where each candidate's answer tokens go behind its prompt.

Every row carries its C answers packed end to end after the prompt (:meth:`ILoraModel._score`); token j of
an answer predicts token j+1, and the prompt's last position predicts every answer's first token. The layout
depends on the answers' lengths only, so it is computed where the answers are tokenized -- on the host, while
the batch is built -- and the forward pass then needs no size read back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class PackedAnswers:
    """Index tensors of one batch's packed answers, in (b, c, j) order: N tokens that have a successor."""

    first: torch.Tensor  # (B, C) each answer's first token, predicted by the prompt's last position
    inputs: torch.Tensor  # (N,) answer tokens that have a successor, fed behind the prompt
    targets: torch.Tensor  # (N,) the token each of them predicts
    owner: torch.Tensor  # (N,) its answer, b·C + c
    row: torch.Tensor  # (N,) its prompt b
    col: torch.Tensor  # (N,) its slot in the row's packed region
    offset: torch.Tensor  # (N,) its index j within the answer
    block: torch.Tensor  # (B, W) the answer of each packed slot, -1 for padding
    lengths: torch.Tensor  # (B·C,) tokens per answer (title and end token): the mean normalisation's divisor
    width: int  # W: the longest row's packed length

    @classmethod
    def from_padded(cls, answers: torch.Tensor, answer_mask: torch.Tensor, n_rows: int) -> PackedAnswers:
        """The layout of (B·C, La) right-padded ``answers`` and their mask, C answers per row, row-major."""
        n_cands = answers.shape[0] // n_rows
        device = answers.device
        has_next = answer_mask[:, 1:].bool()  # (B·C, La-1)
        owner = torch.arange(answers.shape[0], device=device)[:, None].expand_as(has_next)[has_next]  # (N,)
        offset = torch.arange(has_next.shape[1], device=device).expand_as(has_next)[has_next]  # (N,)
        row = owner // n_cands
        per_row = torch.bincount(row, minlength=n_rows)  # (B,) packed length of each row
        width = int(per_row.max()) if row.numel() else 0
        col = torch.arange(len(row), device=device) - (torch.cumsum(per_row, 0) - per_row)[row]  # (N,)
        block = answers.new_full((n_rows, width), -1)  # (B, W)
        block[row, col] = owner
        return cls(
            first=answers[:, 0].reshape(n_rows, n_cands),
            inputs=answers[:, :-1][has_next],
            targets=answers[:, 1:][has_next],
            owner=owner,
            row=row,
            col=col,
            offset=offset,
            block=block,
            lengths=answer_mask.sum(-1),
            width=width,
        )

    def to(self, device, non_blocking: bool = False) -> PackedAnswers:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedAnswers:
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> PackedAnswers:
        return PackedAnswers(
            **{f.name: fn(v) if torch.is_tensor(v) else v for f in fields(self) for v in [getattr(self, f.name)]}
        )
