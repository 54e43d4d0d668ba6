"""The baselines the benchmarks report beside every LLM-alone number, on hand-computed cases; a benchmark whose
data is absent skips cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


class _Split:
    def __init__(self, nxt, candidates=None):
        self.next = np.array(nxt)
        self.candidates = None if candidates is None else np.array(candidates)

    def __len__(self):
        return len(self.next)


class _Dataset:
    """Training next items giving popularity [5, 3, 3, 1, 0], and three val rows of one draw of 3 candidates."""

    n_items = 5

    def split(self, name):
        if name == "train":
            return _Split([0] * 5 + [1] * 3 + [2] * 3 + [3])
        return _Split([1, 2, 4], [[[0, 1, 2]], [[1, 2, 3]], [[3, 4, 0]]])


def test_popularity_baseline_by_hand():
    """Row 1: the target (3) has one candidate ahead (5) and one tie (3); row 2: a tie for first; row 3: two
    ahead. Pessimistic ranks 2, 1, 2 -> HR@1 0, MRR (1/3 + 1/2 + 1/3) / 3. Ties at random: HR@1 (0 + 1/2 + 0) / 3,
    MRR ((1/2 + 1/3) / 2 + (1 + 1/2) / 2 + 1/3) / 3 = 0.5."""
    from common import popularity_baseline, random_baseline

    out = popularity_baseline(_Dataset(), "val")
    assert out["rows"] == 3 and out["draws"] == 1 and out["candidates"] == 3
    assert out["pessimistic"]["hr@1"]["mean"] == 0.0
    assert out["pessimistic"]["mrr"]["mean"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert out["random_ties"]["hr@1"]["mean"] == pytest.approx(1 / 6)
    assert out["random_ties"]["mrr"]["mean"] == pytest.approx(0.5)
    assert popularity_baseline(_Dataset(), "val", rows=1)["pessimistic"]["mrr"]["mean"] == pytest.approx(1 / 3)
    rnd = random_baseline(20)
    assert rnd["hr@1"] == 0.05 and rnd["mrr"] == pytest.approx(sum(1 / k for k in range(1, 21)) / 20)


def test_a_benchmark_without_its_data_skips_cleanly(tmp_path):
    env = dict(os.environ, ILORA_HOME=str(tmp_path / "home"), ILORA_SHARED=str(tmp_path / "shared"))
    r = subprocess.run(
        [sys.executable, str(BENCH / "bench_baselines.py"), "--dataset", "lastfm"],
        capture_output=True, text=True, env=env, cwd=BENCH, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0 and "not available; skipping" in r.stdout, r.stderr
    assert not (tmp_path / "home").exists()
