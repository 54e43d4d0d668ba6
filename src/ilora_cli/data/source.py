"""What every source format produces, and the LLaRA way of turning user sequences into samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError

MAX_HISTORY = 10  # items of history per sample (METHOD.md §1)
MIN_HISTORY = 3  # samples with fewer history items are dropped (METHOD.md §1)
DOMAINS = ("music", "movies", "games", "generic")


@dataclass
class Rows:
    """Samples of one split: right-padded histories (oldest first) and the next item."""

    seq: np.ndarray  # (N, max_history) int64, padded with pad_id
    len_seq: np.ndarray  # (N,) int64, real items in seq
    next: np.ndarray  # (N,) int64, target item id
    user: np.ndarray | None = None  # (N,) int64 user index, or None where the format has no users

    def __len__(self) -> int:
        return int(self.next.shape[0])

    def select(self, mask: np.ndarray) -> Rows:
        return Rows(self.seq[mask], self.len_seq[mask], self.next[mask], None if self.user is None else self.user[mask])


@dataclass
class SourceData:
    """A dataset as read from its source, before filtering, candidate draws and storage."""

    titles: list[str]  # index = item id 0..N-1, already cleaned (not yet made unique)
    splits: dict[str, Rows]  # subset of train/val/test
    domain: str = "generic"  # prompt template family: music, movies, games, generic
    n_users: int | None = None
    title_hints: list[str | None] | None = None  # e.g. release years, to tell duplicate titles apart
    source_ids: list[str] | None = None  # the source's own item ids, by item id
    metadata: list[dict[str, Any]] | None = None  # optional per-item metadata (genres, ...)
    source: dict[str, Any] = field(default_factory=dict)  # format, input files, checksums, split seed
    notes: list[str] = field(default_factory=list)  # things to tell the user (a missing split, ...)


def pad_history(
    histories: list[np.ndarray], pad_id: int, max_history: int = MAX_HISTORY
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad the last ``max_history`` items of each history: (N, max_history) ids and (N,) lengths."""
    n = len(histories)
    seq = np.full((n, max_history), pad_id, dtype=np.int64)
    lens = np.zeros(n, dtype=np.int64)
    for i, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-max_history:]
        seq[i, : len(h)] = h
        lens[i] = len(h)
    return seq, lens


def splits_from_sequences(
    sequences: list[np.ndarray],
    n_items: int,
    seed: int,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    max_history: int = MAX_HISTORY,
) -> dict[str, Rows]:
    """Split users 8:1:1 (seeded) and build samples the LLaRA way.

    Train users give one sample per prefix: history = the ≤ ``max_history`` items before position t,
    target = item t. Validation and test users give one sample: their last item after the items before it.
    """
    n_users = len(sequences)
    # No wider than the longest history the data holds: a huge max_history must not allocate for nothing.
    max_history = max(1, min(max_history, max((len(s) - 1 for s in sequences), default=1)))
    order = np.random.default_rng(seed).permutation(n_users)
    n_train = int(round(fractions[0] * n_users))
    n_val = int(round(fractions[1] * n_users))
    groups = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    out: dict[str, Rows] = {}
    for split, users in groups.items():
        histories, targets, owners = [], [], []
        for u in np.sort(users):
            s = np.asarray(sequences[u], dtype=np.int64)
            if len(s) < 2:
                continue
            positions = range(1, len(s)) if split == "train" else [len(s) - 1]
            for t in positions:
                histories.append(s[max(0, t - max_history) : t])
                targets.append(s[t])
                owners.append(u)
        seq, lens = pad_history(histories, n_items, max_history)
        out[split] = Rows(seq, lens, np.asarray(targets, dtype=np.int64), np.asarray(owners, dtype=np.int64))
    return out


def validate_rows(rows: Rows, n_items: int, split: str, pad_id: int) -> None:
    """Refuse ids out of range or malformed padding with one clear sentence."""
    if rows.seq.ndim != 2:
        raise UserError(f"The {split} split's histories are not a table of item ids.")
    if len(rows) and (rows.next.min() < 0 or rows.next.max() >= n_items):
        bad = int(rows.next[(rows.next < 0) | (rows.next >= n_items)][0])
        raise UserError(f"The {split} split has a target item id {bad} outside 0..{n_items - 1}.")
    if len(rows) and (rows.len_seq.min() < 0 or rows.len_seq.max() > rows.seq.shape[1]):
        raise UserError(f"The {split} split has a history length outside 0..{rows.seq.shape[1]}.")
    real = np.arange(rows.seq.shape[1])[None, :] < rows.len_seq[:, None]  # (N, L)
    if real.any():
        ids = rows.seq[real]
        if ids.min() < 0 or ids.max() >= n_items:
            bad = int(ids[(ids < 0) | (ids >= n_items)][0])
            raise UserError(f"The {split} split has a history item id {bad} outside 0..{n_items - 1}.")
    if (~real).any() and not np.all(rows.seq[~real] == pad_id):
        raise UserError(f"The {split} split's histories are not right-padded with the padding id {pad_id}.")
