"""Two groups of evaluated runs on the same val rows (e.g. K = 4 against K = 1, one run per seed): paired tests.

    for s in 1 2 3 4 5; do
      ilora train --dataset lastfm --name k4-s$s --seed $s experts=4 gate=user
      ilora train --dataset lastfm --name k1-s$s --seed $s experts=1
      ilora eval --run k4-s$s; ilora eval --run k1-s$s
    done
    python bench/bench_pair.py --a k4-s1 ... k4-s5 --b k1-s1 ... k1-s5 --out k4-vs-k1-lastfm

For each ranking (the LLM alone and the default, fused one) it reads every run's score-mode predictions on val
(``predictions-val-score.jsonl``: all stored draws), takes each user's reciprocal rank of the target averaged
over the draws, and reports: HR@1 and MRR of every run; per seed pair (``--a`` and ``--b`` in the same order),
the paired sign-flip permutation test over users of A − B; and pooled, the same test on each user's reciprocal
rank averaged over the runs of each group.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import write_result

RANKINGS = ("llm", "default")


def load(run: str) -> dict:
    """A run's per-user reciprocal ranks (``per_user_rr``) and its HR@1 / MRR per ranking, mean over the draws."""
    from ilora_cli import metrics
    from ilora_cli.ablation.significance import per_user_rr
    from ilora_cli.evaluation.evaluate import resolve_run

    path = resolve_run(run) / "predictions-val-score.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run} has no score-mode predictions on val; run `ilora eval --run {run}` first.")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    out = {"run": run, "rr": per_user_rr(path), "metrics": {}}
    for ranking, field in (("llm", "llm_scores"), ("default", "scores")):
        per_draw = []
        for d in sorted({x["draw"] for x in lines}):
            rows = [x for x in lines if x["draw"] == d]
            cols = np.array([x["candidates"].index(x["target"]) for x in rows])
            per_draw.append(metrics.ranking_metrics(metrics.rank_of_target(np.array([x[field] for x in rows]), cols)))
        agg = metrics.aggregate(per_draw)
        out["metrics"][ranking] = {m: agg[m]["mean"] for m in ("hr@1", "mrr")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", nargs="+", required=True, help="the first group's runs (one per seed)")
    ap.add_argument("--b", nargs="+", required=True, help="the second group's runs, in the same seed order")
    ap.add_argument("--out", default="pair")
    args = ap.parse_args()
    from ilora_cli import metrics

    a, b = [load(r) for r in args.a], [load(r) for r in args.b]
    ids = {tuple(r["rr"]["sample_id"]) for r in a + b}
    if len(ids) != 1:
        raise SystemExit("the runs were evaluated on different rows; they cannot be paired")
    print(f"{'run':<28}{'LLM HR@1':>10}{'LLM MRR':>10}{'fused HR@1':>12}{'fused MRR':>11}")
    for r in a + b:
        m = r["metrics"]
        print(
            f"{r['run']:<28}{m['llm']['hr@1']:>10.3f}{m['llm']['mrr']:>10.3f}"
            f"{m['default']['hr@1']:>12.3f}{m['default']['mrr']:>11.3f}"
        )
    pairs = []
    for ra, rb in zip(a, b):
        tests = {k: metrics.paired_permutation_test(ra["rr"][k], rb["rr"][k]) for k in RANKINGS}
        pairs.append({"a": ra["run"], "b": rb["run"], **tests})
        print(
            f"{ra['run']} − {rb['run']}: "
            + ", ".join(f"{k} MRR {t['mean_difference']:+.4f} (p = {t['p_value']:.3g})" for k, t in tests.items())
        )
    pooled = {
        k: metrics.paired_permutation_test(
            np.mean([r["rr"][k] for r in a], axis=0), np.mean([r["rr"][k] for r in b], axis=0)
        )
        for k in RANKINGS
    }
    means = {
        g: {k: {m: float(np.mean([r["metrics"][k][m] for r in runs])) for m in ("hr@1", "mrr")} for k in RANKINGS}
        for g, runs in (("a", a), ("b", b))
    }
    for k, t in pooled.items():
        print(
            f"pooled {k}: A {means['a'][k]['hr@1']:.3f} / {means['a'][k]['mrr']:.3f}, "
            f"B {means['b'][k]['hr@1']:.3f} / {means['b'][k]['mrr']:.3f}; "
            f"A − B MRR {t['mean_difference']:+.4f} (p = {t['p_value']:.3g}, {t['n']} users)"
        )
    write_result(
        args.out,
        {
            "a": [{"run": r["run"], "metrics": r["metrics"]} for r in a],
            "b": [{"run": r["run"], "metrics": r["metrics"]} for r in b],
            "pairs": pairs,
            "pooled": pooled,
            "means": means,
        },
    )


if __name__ == "__main__":
    main()
