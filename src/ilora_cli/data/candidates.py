"""Frozen candidate sets for evaluation: the target plus negatives, drawn once and stored."""

from __future__ import annotations

import numpy as np

from ..errors import UserError

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def row_rng(seed: int, split: str, sample_id: int) -> np.random.Generator:
    """The generator of one row: depends only on (seed, split, sample id), never on row order or batch."""
    return np.random.default_rng([seed, SPLIT_CODES.get(split, 9), int(sample_id)])


def draw_candidates(
    seq: np.ndarray,
    len_seq: np.ndarray,
    target: np.ndarray,
    sample_id: np.ndarray,
    n_items: int,
    n_candidates: int,
    draws: int,
    seed: int,
    split: str,
) -> np.ndarray:
    """(N, draws, n_candidates) item ids: per draw, the target and ``n_candidates - 1`` uniform negatives.

    Negatives exclude the row's history and target; each draw is shuffled independently.
    """
    n = len(target)
    out = np.empty((n, draws, n_candidates), dtype=np.int64)
    for i in range(n):
        excluded = set(seq[i, : len_seq[i]].tolist()) | {int(target[i])}
        if n_items - len(excluded) < n_candidates - 1:
            raise UserError(
                f"The catalogue has {n_items} items: too few to draw {n_candidates - 1} negatives "
                f"outside a history of {len(excluded) - 1} items; lower --candidates."
            )
        rng = row_rng(seed, split, sample_id[i])
        for d in range(draws):
            out[i, d] = candidate_set(rng, excluded, int(target[i]), n_items, n_candidates)
    return out


def candidate_set(rng: np.random.Generator, excluded: set[int], target: int, n_items: int, size: int) -> np.ndarray:
    """The target and ``size - 1`` uniform negatives outside ``excluded``, shuffled."""
    # A random prefix of a permutation, with the excluded ids filtered out, is a uniform subset.
    pool = rng.choice(n_items, size=min(n_items, size - 1 + len(excluded)), replace=False)
    negatives = [x for x in pool.tolist() if x not in excluded][: size - 1]
    return rng.permutation(np.array(negatives + [target], dtype=np.int64))
