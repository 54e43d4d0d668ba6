"""Ranking metrics shared by every evaluation.

Every function takes ``ranks``: the 0-based position of the target in a ranking (0 = first), one per
sample, with ``-1`` (or any negative number) meaning "the target is not in the ranked list at all"
(for example a retrieval stage that missed it). Sampled results (a target among N candidates) and
full-catalogue results use the same functions; callers label which is which via :func:`label`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

MISSING = -1


def _ranks(ranks: Sequence[int] | np.ndarray) -> np.ndarray:
    r = np.asarray(ranks, dtype=np.int64)
    if r.ndim != 1:
        raise ValueError("ranks must be one-dimensional")
    return r


def hit_ratio(ranks, k: int) -> float:
    """HR@K = (1/n) Σ_i [0 ≤ rank_i < K]."""
    r = _ranks(ranks)
    if r.size == 0:
        return float("nan")
    return float(np.mean((r >= 0) & (r < k)))


def ndcg(ranks, k: int) -> float:
    """NDCG@K with one relevant item = (1/n) Σ_i [0 ≤ rank_i < K] / log2(rank_i + 2)."""
    r = _ranks(ranks)
    if r.size == 0:
        return float("nan")
    hit = (r >= 0) & (r < k)
    gains = np.where(hit, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)
    return float(np.mean(gains))


def mrr(ranks) -> float:
    """MRR = (1/n) Σ_i 1 / (rank_i + 1), counting a missing target as 0."""
    r = _ranks(ranks)
    if r.size == 0:
        return float("nan")
    return float(np.mean(np.where(r >= 0, 1.0 / (np.maximum(r, 0) + 1.0), 0.0)))


def valid_ratio(valid) -> float:
    """ValidRatio = (1/n) Σ_i valid_i, where an output is valid iff exactly one candidate title occurs in it."""
    v = np.asarray(valid, dtype=bool)
    if v.size == 0:
        return float("nan")
    return float(np.mean(v))


def rank_of_target(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of ``scores[i, target[i]]`` in row ``i`` (higher score = better).

    Ties are broken pessimistically: every other candidate with an equal score is ranked ahead of the
    target, so a model that scores everything alike gets HR@1 = 0 rather than a lucky 1.

    Args:
        scores: (n, C) scores; ``-inf`` marks excluded entries (they never outrank anything).
        target: (n,) column index of the target in each row.
    """
    scores = np.asarray(scores, dtype=np.float64)
    target = np.asarray(target, dtype=np.int64)
    t = scores[np.arange(len(target)), target][:, None]  # (n, 1)
    better = (scores > t).sum(axis=1)
    ties = (scores == t).sum(axis=1) - 1
    return (better + ties).astype(np.int64)


def full_ranking_ranks(
    scores: np.ndarray, target: np.ndarray, exclude: Sequence[Sequence[int]] | None = None
) -> np.ndarray:
    """Rank of the target among the whole catalogue, with each row's ``exclude`` items (its history) removed.

    Args:
        scores: (n, n_items) scores over the catalogue.
        target: (n,) target item ids.
        exclude: per row, item ids to drop from the ranking (the target itself is never dropped).
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    target = np.asarray(target, dtype=np.int64)
    if exclude is not None:
        for i, items in enumerate(exclude):
            items = [j for j in items if 0 <= j < scores.shape[1] and j != target[i]]
            scores[i, items] = -np.inf
    return rank_of_target(scores, target)


def ranking_metrics(ranks, ks: Sequence[int] = (1, 3, 5, 10), ndcg_ks: Sequence[int] = (3, 5, 10)) -> dict[str, float]:
    """HR@K for ``ks``, NDCG@K for ``ndcg_ks`` and MRR of one set of ranks."""
    out = {f"hr@{k}": hit_ratio(ranks, k) for k in ks}
    out.update({f"ndcg@{k}": ndcg(ranks, k) for k in ndcg_ks})
    out["mrr"] = mrr(ranks)
    return out


def aggregate(per_draw: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean ± std over independent candidate draws: ``{metric: {"mean", "std", "n_draws"}}``.

    The std is the population standard deviation over draws (0 for a single draw): it describes how
    much the metric moves between candidate draws on the same users.
    """
    if not per_draw:
        return {}
    names = list(per_draw[0])
    out = {}
    for name in names:
        vals = np.array([d[name] for d in per_draw], dtype=np.float64)
        out[name] = {"mean": float(vals.mean()), "std": float(vals.std()), "n_draws": int(vals.size)}
    return out


CATALOGUE_HR_KS = (10, 20, 50)  # full-catalogue HR@K reported for every ranking
CATALOGUE_NDCG_KS = (10, 20)  # ... and NDCG@K
CATALOGUE_METRIC = "full_ndcg@10"  # the catalogue metric that tests, validation and --keep-best use


def catalogue_metrics(ranks) -> dict[str, dict[str, float]]:
    """Full-catalogue HR@10/20/50, NDCG@10/20 and MRR of one set of ranks (each row's history excluded by the
    caller), as ``full_*`` entries in :func:`aggregate`'s shape (one "draw": the catalogue is not sampled)."""
    values = {f"full_hr@{k}": hit_ratio(ranks, k) for k in CATALOGUE_HR_KS}
    values.update({f"full_ndcg@{k}": ndcg(ranks, k) for k in CATALOGUE_NDCG_KS})
    values["full_mrr"] = mrr(ranks)
    return {name: {"mean": v, "std": 0.0, "n_draws": 1} for name, v in values.items()}


def per_user_ndcg(ranks, k: int = 10) -> np.ndarray:
    """(n,) each row's NDCG@K contribution [0 ≤ rank < K] / log2(rank + 2): the per-user values whose mean is
    :func:`ndcg`, for paired tests over users."""
    r = _ranks(ranks)
    hit = (r >= 0) & (r < k)
    return np.where(hit, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)


def label(n_candidates: int | None) -> str:
    """How a result table names its protocol: sampled with N candidates, or full catalogue."""
    return f"sampled, {n_candidates} candidates" if n_candidates else "full ranking"


def paired_permutation_test(
    a, b, n_resamples: int = 20_000, exact_max: int = 20, seed: int = 0
) -> dict[str, float | int | str]:
    """Two-sided paired sign-flip permutation test of "a and b have the same mean" (one pair per user).

    With d_i = a_i − b_i and T = Σ_i d_i, under the null hypothesis each d_i is as likely to be −d_i, so T
    is compared with T* = Σ_i ε_i d_i over sign vectors ε ∈ {±1}^n:

        p = #{ε : |T*(ε)| ≥ |T|} / 2^m

    enumerated exactly over the 2^m sign vectors of the m non-zero differences when m ≤ ``exact_max``
    (zero differences do not change T*), else estimated from ``n_resamples`` random sign vectors as
    (1 + #{|T*| ≥ |T|}) / (1 + n_resamples), which never reports p = 0. Returns ``p_value``,
    ``mean_difference`` (mean of d), ``n`` pairs, ``n_nonzero``, ``method`` (exact or sampled) and
    ``resamples`` (the sign vectors used).
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError("a and b must be one-dimensional and of the same length")
    nonzero = d[d != 0]
    observed = abs(float(nonzero.sum()))
    tol = 1e-9 * max(1.0, observed)  # sums of floats in another order differ in the last bits
    out: dict[str, float | int | str] = {
        "mean_difference": float(d.mean()) if d.size else float("nan"),
        "n": int(d.size),
        "n_nonzero": int(nonzero.size),
    }
    if nonzero.size <= exact_max:
        sums = np.zeros(1)
        for x in nonzero:  # every sign vector's T*, doubling the list per difference: (2^m,)
            sums = np.concatenate([sums + x, sums - x])
        extreme = int((np.abs(sums) >= observed - tol).sum())
        out.update(p_value=extreme / sums.size, method="exact", resamples=int(sums.size))
        return out
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, n_resamples, 4096):
        signs = rng.choice([-1.0, 1.0], size=(min(4096, n_resamples - start), nonzero.size))  # (R, m)
        extreme += int((np.abs(signs @ nonzero) >= observed - tol).sum())
    out.update(p_value=(1 + extreme) / (1 + n_resamples), method="sampled", resamples=int(n_resamples))
    return out
