"""The paired permutation test against hand-enumerated sign patterns, and per-user reciprocal ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ilora_cli import metrics as M
from ilora_cli.ablation.significance import compare, per_user_rr


@pytest.mark.parametrize(
    "diffs, p",
    [
        # T = 3; the 8 sign patterns of (1, 1, 1) give |T*| = 3 twice (all +, all -): p = 2/8.
        ([1, 1, 1], 2 / 8),
        # T = 2; ±2 ±1 ±1 gives 4, 2, 2, 0, 0, -2, -2, -4: six of eight have |T*| >= 2.
        ([2, 1, -1], 6 / 8),
        # T = 10; among the 16 patterns of ±1 ±2 ±3 ±4 only all + and all - reach |T*| = 10.
        ([1, 2, 3, 4], 2 / 16),
        # six equal differences: 2 of 64 patterns, p = 0.03125 < 0.05.
        ([0.5] * 6, 2 / 64),
        # T = 0: every pattern is at least as extreme.
        ([3, -1, -1, -1], 1.0),
    ],
)
def test_exact_p_values_match_hand_enumeration(diffs, p):
    out = M.paired_permutation_test(np.array(diffs, dtype=float), np.zeros(len(diffs)))
    assert out["method"] == "exact"
    assert out["p_value"] == pytest.approx(p)
    assert out["mean_difference"] == pytest.approx(np.mean(diffs))


def test_zero_differences_do_not_count_and_no_difference_gives_one():
    a = np.array([0.5, 0.25, 1.0, 0.2, 0.2])
    b = np.array([0.25, 0.0, 0.75, 0.2, 0.2])  # differences 0.25, 0.25, 0.25, 0, 0
    out = M.paired_permutation_test(a, b)
    assert out["n"] == 5 and out["n_nonzero"] == 3 and out["p_value"] == pytest.approx(2 / 8)
    same = M.paired_permutation_test(a, a)
    assert same["p_value"] == 1.0 and same["n_nonzero"] == 0


def test_sampled_p_value_agrees_with_the_exact_one_and_is_never_zero():
    rng = np.random.default_rng(0)
    d = rng.normal(0.1, 1.0, size=16)
    exact = M.paired_permutation_test(d, np.zeros(16), exact_max=16)
    sampled = M.paired_permutation_test(d, np.zeros(16), exact_max=0, n_resamples=20_000, seed=1)
    assert exact["method"] == "exact" and exact["resamples"] == 2**16
    assert sampled["method"] == "sampled"
    assert abs(exact["p_value"] - sampled["p_value"]) < 0.015
    # 30 equal differences: exactly p = 2 / 2^30; 20,000 random sign vectors essentially never reach |T|
    ones = M.paired_permutation_test(np.ones(30), np.zeros(30), n_resamples=20_000)
    assert ones["method"] == "sampled" and ones["p_value"] == pytest.approx(1 / 20_001)


def test_per_user_reciprocal_ranks_from_predictions(tmp_path):
    lines = [
        # user 7, draw 0: target 3 ranked 2nd by the default scores, 1st by the LLM, 3rd by the encoder
        {"sample_id": 7, "draw": 0, "candidates": [1, 3, 5], "target": 3, "scores": [0.9, 0.5, 0.1],
         "llm_scores": [0.1, 0.5, 0.2], "encoder_scores": [2.0, 0.0, 1.0]},
        # user 7, draw 1: target first everywhere
        {"sample_id": 7, "draw": 1, "candidates": [3, 2, 4], "target": 3, "scores": [1.0, 0.0, 0.0],
         "llm_scores": [1.0, 0.0, 0.0], "encoder_scores": [1.0, 0.0, 0.0]},
        # user 2: a tie with the target counts against it (pessimistic): rank 2 of 3
        {"sample_id": 2, "draw": 0, "candidates": [8, 9, 6], "target": 9, "scores": [0.3, 0.3, 0.0],
         "llm_scores": [0.0, 0.0, 0.0], "encoder_scores": [0.0, 1.0, 0.0]},
        {"sample_id": 2, "draw": 1, "candidates": [9, 8, 6], "target": 9, "scores": [0.0, 0.1, 0.2],
         "llm_scores": [0.0, 0.0, 1.0], "encoder_scores": [5.0, 0.0, 0.0]},
    ]  # fmt: skip
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rr = per_user_rr(f)
    assert rr["sample_id"] == [2, 7]
    assert rr["default"] == pytest.approx([(1 / 2 + 1 / 3) / 2, (1 / 2 + 1) / 2])
    assert rr["llm"] == pytest.approx([(1 / 3 + 1 / 3) / 2, 1.0])
    assert rr["encoder"] == pytest.approx([1.0, (1 / 3 + 1) / 2])


def test_cells_on_different_rows_are_not_paired():
    a = {"per_user": {"sample_id": [1, 2], "default": [1.0, 0.5]}, "eval_rows_key": "x:val"}
    b = {"per_user": {"sample_id": [1, 3], "default": [0.5, 0.5]}, "eval_rows_key": "x:val"}
    assert compare(a, b, "default", 1000, 0)["p_value"] is None
    c = {"per_user": {"sample_id": [1, 2], "default": [0.5, 0.5]}, "eval_rows_key": "x:val"}
    out = compare(a, c, "default", 1000, 0)
    assert out["p_value"] == pytest.approx(1.0) and out["significant"] is False  # one differing user: p = 2/2


def test_cells_that_ranked_the_catalogue_are_tested_on_it():
    """Both cells carry per-user catalogue NDCG@10: the test uses it (and says so), not the reciprocal ranks."""
    a = {"per_user": {"sample_id": [1, 2, 3], "default": [1.0, 1.0, 1.0]}, "eval_rows_key": "x:val"}
    b = {"per_user": {"sample_id": [1, 2, 3], "default": [0.1, 0.1, 0.1]}, "eval_rows_key": "x:val"}
    assert compare(a, b, "default", 1000, 0)["metric"] == "mrr"
    a["per_user"]["catalogue"] = {"default": [0.3, 0.2, 0.1]}
    b["per_user"]["catalogue"] = {"default": [0.3, 0.2, 0.1]}
    out = compare(a, b, "default", 1000, 0)
    assert out["metric"] == "full_ndcg@10" and out["n_nonzero"] == 0 and out["p_value"] == 1.0
