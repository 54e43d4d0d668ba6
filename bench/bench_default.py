"""The default `ilora train` at a CPU budget, several seeds: the run's ranking against its encoder, with tests.

    for s in 1 2 3; do
      ilora train --dataset lastfm --name cpu-768-s$s --seed $s --max-train-samples 768 --json
      ilora eval --run cpu-768-s$s --json
    done
    python bench/bench_default.py cpu-768-s1 cpu-768-s2 cpu-768-s3

For each run it reads the training summary (``ilora.json``, ``logs/train.jsonl``) and the score-mode
predictions that ``ilora eval`` wrote on val (all stored draws), and reports HR@1 and MRR of the default
ranking (fused), the LLM alone and the encoder alone, each mean ± std over the draws, plus a paired sign-flip
permutation test over users of the per-user reciprocal rank (mean over the draws): fused against the
encoder, and the LLM alone against the encoder. With several runs on the same rows, the same tests on each
user's reciprocal rank averaged over the runs too (``pooled``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import baseline_line, popularity_baseline, write_result


def summarise_run(run_dir: Path) -> tuple[dict, dict]:
    """The per-user reciprocal ranks (``per_user_rr``) and the run's summary."""
    from ilora_cli import metrics
    from ilora_cli.ablation.significance import per_user_rr

    info = json.loads((run_dir / "ilora.json").read_text())
    log = [json.loads(x) for x in (run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    predictions = run_dir / "predictions-val-score.jsonl"
    lines = [json.loads(x) for x in predictions.read_text().splitlines()]
    by_draw: dict[str, list[dict]] = {"default": [], "llm": [], "encoder": []}
    for d in sorted({x["draw"] for x in lines}):
        rows = [x for x in lines if x["draw"] == d]
        cols = np.array([x["candidates"].index(x["target"]) for x in rows])
        for name, field in (("default", "scores"), ("llm", "llm_scores"), ("encoder", "encoder_scores")):
            ranks = metrics.rank_of_target(np.array([x[field] for x in rows]), cols)
            by_draw[name].append(metrics.ranking_metrics(ranks))
    agg = {k: metrics.aggregate(v) for k, v in by_draw.items()}
    rr = per_user_rr(predictions)
    return rr, {
        "run": run_dir.name,
        "steps": info["training"]["steps"],
        "samples": info["training"]["samples_seen"],
        "train_minutes": round(sum(r["seconds"] for r in log) / 60, 1),
        "fusion": info.get("fusion"),
        "templates": info.get("templates"),
        "metrics": {k: {m: agg[k][m] for m in ("hr@1", "hr@5", "ndcg@5", "mrr")} for k in agg},
        "fused_vs_encoder": metrics.paired_permutation_test(rr["default"], rr["encoder"]),
        "llm_vs_encoder": metrics.paired_permutation_test(rr["llm"], rr["encoder"]),
        "n_users": len(rr["default"]),
        "draws": len(by_draw["default"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run names (under $ILORA_HOME/runs) or directories")
    ap.add_argument("--out", default="default-lastfm-cpu")
    args = ap.parse_args()
    from ilora_cli import metrics
    from ilora_cli.evaluation.evaluate import resolve_run

    rrs, rows = zip(*(summarise_run(resolve_run(r)) for r in args.runs))
    print(
        f"{'run':<18}{'rows':>6}{'min':>6}  {'default HR@1 / MRR':>22}  {'LLM HR@1 / MRR':>22}  "
        f"{'encoder HR@1 / MRR':>22}  p(fused=enc)  p(LLM=enc)"
    )
    for r in rows:
        m = r["metrics"]
        cell = {k: f"{m[k]['hr@1']['mean']:.3f}±{m[k]['hr@1']['std']:.3f} / {m[k]['mrr']['mean']:.3f}" for k in m}
        print(
            f"{r['run']:<18}{r['samples']:>6}{r['train_minutes']:>6}  {cell['default']:>22}  {cell['llm']:>22}  "
            f"{cell['encoder']:>22}  {r['fused_vs_encoder']['p_value']:>11.3f}  {r['llm_vs_encoder']['p_value']:>9.3g}"
        )
    means = {
        k: {m: float(np.mean([r["metrics"][k][m]["mean"] for r in rows])) for m in ("hr@1", "mrr")}
        for k in ("default", "llm", "encoder")
    }
    print("mean over runs:", json.dumps({k: {m: round(v, 4) for m, v in d.items()} for k, d in means.items()}))
    from ilora_cli.data.prepared import PreparedDataset

    dataset = PreparedDataset.open(
        json.loads((resolve_run(args.runs[0]) / "ilora.json").read_text())["dataset"]["name"]
    )
    draws, n_rows = rows[0]["draws"], rows[0]["n_users"]
    print("beside the LLM alone, on the same rows and draws:", baseline_line(dataset, "val", draws, n_rows))
    pooled = None
    if len(rows) > 1:
        if len({tuple(rr["sample_id"]) for rr in rrs}) != 1:
            raise SystemExit("the runs were evaluated on different rows; they cannot be pooled")
        mean_rr = {k: np.mean([rr[k] for rr in rrs], axis=0) for k in ("default", "llm", "encoder")}
        pooled = {
            "fused_vs_encoder": metrics.paired_permutation_test(mean_rr["default"], mean_rr["encoder"]),
            "llm_vs_encoder": metrics.paired_permutation_test(mean_rr["llm"], mean_rr["encoder"]),
        }
        fused, llm = pooled["fused_vs_encoder"], pooled["llm_vs_encoder"]
        print(
            f"pooled over the runs, per-user MRR: fused − encoder {fused['mean_difference']:+.4f} "
            f"(p = {fused['p_value']:.3f}), LLM − encoder {llm['mean_difference']:+.4f} (p = {llm['p_value']:.2g})"
        )
    popularity = popularity_baseline(dataset, "val", draws, n_rows)
    write_result(args.out, {"runs": list(rows), "mean_over_runs": means, "pooled": pooled, "popularity": popularity})


if __name__ == "__main__":
    main()
