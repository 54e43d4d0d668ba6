"""Candidate scoring on a shared prompt: log p(title + end | prompt) for every candidate.

The prompt is encoded once and the C candidate titles are packed behind it in the same forward, each
seeing the prompt and its own earlier tokens only (a block attention mask, positions continuing the
prompt's) — not C full forwards, no per-candidate copy of the prompt's keys and values, and no padding
of every title to the longest one. Used by the listwise ``rank`` training objective (with gradients) and
by score-mode evaluation (without).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .packing import PackedAnswers
from .prompt import PromptBatch, PromptBuilder

if TYPE_CHECKING:  # the model module imports the heads, which score through this one
    from .model import ILoraModel


def pad_answers(builder: PromptBuilder, items: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*C, La) answer ids (`` title<eos>``), right-padded, and their mask, in row-major (b, c) order."""
    flat = [builder.answer_ids(int(i)) for row in items for i in row]
    lengths = np.fromiter((len(a) for a in flat), dtype=np.int64, count=len(flat))  # (B*C,)
    mask = np.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (B*C, La)
    ids = np.full(mask.shape, builder.pad_id, dtype=np.int64)
    ids[mask] = np.fromiter(itertools.chain.from_iterable(flat), dtype=np.int64)  # row-major: answer by answer
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def with_answers(builder: PromptBuilder, prefix: PromptBatch) -> PromptBatch:
    """``prefix`` (on the host) with the layout of its candidates' answers packed behind it (llm/packing.py):
    tokenized and laid out here, while the batch is built, so that scoring it reads nothing back from a GPU."""
    answers, answer_mask = pad_answers(builder, prefix.candidates.tolist())
    return dataclasses.replace(prefix, packed=PackedAnswers.from_padded(answers, answer_mask, len(prefix.candidates)))


def candidate_logprobs(
    model: ILoraModel,
    builder: PromptBuilder,
    prefix: PromptBatch,
    candidates: torch.Tensor,
    normalize: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B, C) of each candidate's title after the prompt, and the gates (B, K).

    ``prefix`` must be left-padded (every row ends at its last prompt token) and carry no labels. When it
    carries the layout of ``candidates``' answers (:func:`with_answers`), it is used; else it is made here.
    ``normalize``: ``sum`` of token log-probabilities, or their ``mean`` (length-normalised).
    ``model`` may be a DDP-wrapped :class:`ILoraModel`: the computation runs inside its ``forward``.
    """
    if prefix.labels is not None:
        raise ValueError("the prefix batch must not contain answers")
    packed = prefix.packed if candidates is prefix.candidates else None
    if packed is None:
        answers, answer_mask = pad_answers(builder, candidates.tolist())
        packed = PackedAnswers.from_padded(answers, answer_mask, len(candidates)).to(prefix.input_ids.device)
    scores, gates = model(prefix, packed=packed)  # (B, C)
    return normalise_scores(scores, packed.lengths, normalize), gates


def normalise_scores(scores: torch.Tensor, lengths: torch.Tensor, normalize: str) -> torch.Tensor:
    """(B, C) summed log-probabilities as they are (``sum``) or divided by each title's token count (``mean``);
    ``lengths`` (B*C,) those counts."""
    if normalize == "mean":
        return scores / lengths.view_as(scores)
    if normalize != "sum":
        raise ValueError(f"unknown normalisation {normalize!r}")
    return scores
