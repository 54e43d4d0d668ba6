"""Per-user reciprocal ranks from a run's predictions, and the paired test of one cell against another.

With about 120 users per split, differences of a few points of HR@1 are noise. The test pairs users: each
user's reciprocal rank of the target (averaged over the stored candidate draws) under one cell against
the same user's under the reference cell, and asks how often flipping the signs of the per-user
differences at random gives a total difference at least as large (:func:`metrics.paired_permutation_test`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics

ALPHA = 0.05
TEST_NAME = (
    "paired sign-flip permutation test over users of the catalogue NDCG@10 (item head: the whole catalogue, the "
    "history excluded) or of the reciprocal rank (mean over the candidate draws; title head), two-sided; exact when "
    "at most 20 users differ, else random sign flips"
)
RANKINGS = {"default": "scores", "llm": "llm_scores", "encoder": "encoder_scores"}


def per_user_rr(predictions: Path) -> dict[str, list]:
    """``sample_id`` and, for each ranking (default, llm, encoder), each user's reciprocal rank of the target
    averaged over the draws, from an evaluation's per-sample JSONL (ties ranked pessimistically)."""
    by_user: dict[int, dict[str, list[float]]] = {}
    with open(predictions, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            target_col = np.array([row["candidates"].index(row["target"])])
            user = by_user.setdefault(int(row["sample_id"]), {r: [] for r in RANKINGS})
            for ranking, key in RANKINGS.items():
                rank = metrics.rank_of_target(np.array([row[key]]), target_col)[0]
                user[ranking].append(1.0 / (rank + 1.0))
    ids = sorted(by_user)
    out: dict[str, list] = {"sample_id": ids}
    for ranking in RANKINGS:
        out[ranking] = [float(np.mean(by_user[i][ranking])) for i in ids]
    return out


def test_metric(out: dict[str, Any]) -> str:
    """What a cell is tested on: catalogue NDCG@10 where its head ranks the catalogue, else the sampled MRR."""
    return metrics.CATALOGUE_METRIC if "catalogue_ranks" in out.get("_per_user", {}) else "mrr"


def per_user_values(predictions: Path, out: dict[str, Any]) -> dict[str, Any]:
    """Each user's reciprocal rank per ranking (:func:`per_user_rr`) and, where the catalogue was ranked, each user's
    catalogue NDCG@10 per ranking (``catalogue``), in the same user order."""
    values = per_user_rr(predictions)
    ranks = out.get("_per_user", {}).get("catalogue_ranks")
    if ranks is not None:
        index = {int(i): k for k, i in enumerate(out["_per_user"]["sample_id"])}
        order = [index[i] for i in values["sample_id"]]  # the split's row order -> per_user_rr's user order
        values["catalogue"] = {r: metrics.per_user_ndcg(np.asarray(v)[order], 10).tolist() for r, v in ranks.items()}
    return values


def compare(
    cell: dict[str, Any],
    reference: dict[str, Any],
    ranking: str,
    permutations: int,
    seed: int,
    reference_ranking: str | None = None,
) -> dict[str, Any]:
    """The paired test of ``cell``'s ``ranking`` against ``reference``'s ``reference_ranking`` (the same ranking
    by default) on per-user catalogue NDCG@10 where both ranked the catalogue, else on per-user reciprocal ranks
    (``metric`` in the result says which), or a dict saying why the two cannot be paired."""
    a, b = cell["per_user"], reference["per_user"]
    if a["sample_id"] != b["sample_id"] or cell.get("eval_rows_key") != reference.get("eval_rows_key"):
        return {"p_value": None, "reason": "evaluated on different rows: not paired"}
    catalogue = "catalogue" in a and "catalogue" in b
    a, b = (a["catalogue"], b["catalogue"]) if catalogue else (a, b)
    test = metrics.paired_permutation_test(
        a[ranking], b[reference_ranking or ranking], n_resamples=permutations, seed=seed
    )
    test["significant"] = bool(test["p_value"] < ALPHA)
    test["metric"] = metrics.CATALOGUE_METRIC if catalogue else "mrr"
    return test
