import math

import numpy as np
import pytest

from ilora_cli import metrics as M


def test_hit_ratio_closed_form():
    ranks = [0, 1, 2, 5, 19, M.MISSING]
    assert M.hit_ratio(ranks, 1) == pytest.approx(1 / 6)
    assert M.hit_ratio(ranks, 3) == pytest.approx(3 / 6)
    assert M.hit_ratio(ranks, 10) == pytest.approx(4 / 6)
    assert M.hit_ratio(ranks, 20) == pytest.approx(5 / 6)


def test_ndcg_closed_form():
    ranks = [0, 1, 2, M.MISSING]
    expected3 = (1 + 1 / math.log2(3) + 1 / math.log2(4) + 0) / 4
    assert M.ndcg(ranks, 3) == pytest.approx(expected3)
    assert M.ndcg(ranks, 2) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert M.ndcg([0, 0], 1) == 1.0


def test_mrr_closed_form():
    assert M.mrr([0, 1, 3, M.MISSING]) == pytest.approx((1 + 1 / 2 + 1 / 4 + 0) / 4)


def test_valid_ratio():
    assert M.valid_ratio([True, False, True, True]) == 0.75


def test_rank_of_target_with_pessimistic_ties():
    scores = np.array([[0.1, 0.9, 0.5], [1.0, 1.0, 1.0], [3.0, 2.0, -np.inf]])
    ranks = M.rank_of_target(scores, np.array([2, 0, 1]))
    # row 0: one better; row 1: all tied → last; row 2: one better, -inf never outranks
    assert ranks.tolist() == [1, 2, 1]


def test_full_ranking_excludes_history_but_not_target():
    scores = np.array([[5.0, 4.0, 3.0, 2.0]])
    assert M.full_ranking_ranks(scores, np.array([2])).tolist() == [2]
    assert M.full_ranking_ranks(scores, np.array([2]), exclude=[[0, 1]]).tolist() == [0]
    assert M.full_ranking_ranks(scores, np.array([2]), exclude=[[2, 0]]).tolist() == [1]


def test_ranking_metrics_keys_and_aggregate():
    a = M.ranking_metrics([0, 4])
    b = M.ranking_metrics([1, 4])
    assert set(a) == {"hr@1", "hr@3", "hr@5", "hr@10", "ndcg@3", "ndcg@5", "ndcg@10", "mrr"}
    agg = M.aggregate([a, b])
    assert agg["hr@1"]["mean"] == pytest.approx(0.25)
    assert agg["hr@1"]["std"] == pytest.approx(0.25)  # population std of [0.5, 0.0]
    assert agg["hr@5"] == {"mean": 1.0, "std": 0.0, "n_draws": 2}


def test_labels():
    assert M.label(20) == "sampled, 20 candidates"
    assert M.label(None) == "full ranking"
