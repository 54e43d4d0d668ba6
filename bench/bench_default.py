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


def reference_rr(encoder_name: str, predictions: Path) -> tuple[list[int], np.ndarray, dict]:
    """Another encoder (e.g. one fitted on every training row) on the very rows and candidate draws of an
    evaluation's predictions file: each user's reciprocal rank (mean over the draws) and its metrics."""
    from ilora_cli import metrics
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.encoders.io import load_encoder
    from ilora_cli.evaluation.evaluate import encoder_candidate_scores

    encoder, info = load_encoder(encoder_name)
    val = PreparedDataset.open(info["dataset"]["path"]).split("val")
    index = {int(i): k for k, i in enumerate(val.sample_id)}
    lines = [json.loads(x) for x in predictions.read_text().splitlines()]
    rr: dict[int, list[float]] = {}
    by_draw: dict[int, list[int]] = {}
    for d in sorted({x["draw"] for x in lines}):
        rows = [x for x in lines if x["draw"] == d]
        k = np.array([index[x["sample_id"]] for x in rows])
        cands = np.array([x["candidates"] for x in rows])  # (N, C)
        scores = encoder_candidate_scores(encoder, val.select(k), cands)  # (N, C)
        ranks = metrics.rank_of_target(scores, np.array([x["candidates"].index(x["target"]) for x in rows]))
        by_draw[d] = ranks
        for x, r in zip(rows, ranks):
            rr.setdefault(x["sample_id"], []).append(1.0 / (r + 1.0))
    ids = sorted(rr)
    agg = metrics.aggregate([metrics.ranking_metrics(r) for r in by_draw.values()])
    return ids, np.array([np.mean(rr[i]) for i in ids]), {m: agg[m] for m in ("hr@1", "hr@5", "ndcg@5", "mrr")}


def summarise_run(run_dir: Path, reference: str | None = None) -> tuple[dict, dict]:
    """The per-user reciprocal ranks (``per_user_rr``) and the run's summary; with ``reference`` (an encoder
    name or path), that encoder on the same rows and draws, and the run's rankings tested against it too."""
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
    extra = {}
    if reference is not None:
        import yaml

        seed = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("seed")
        reference = reference.replace("{seed}", str(seed))  # an encoder per seed: the same seed as the run's
        ids, ref_rr, ref_metrics = reference_rr(reference, predictions)
        assert ids == rr["sample_id"]
        rr["reference"] = list(ref_rr)
        extra = {
            "reference_encoder": {"name": reference, "metrics": ref_metrics},
            "fused_vs_reference": metrics.paired_permutation_test(rr["default"], ref_rr),
            "llm_vs_reference": metrics.paired_permutation_test(rr["llm"], ref_rr),
        }
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
        "holdout": info.get("holdout"),
        "head": info.get("experts", {}).get("head", "title"),
        **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run names (under $ILORA_HOME/runs) or directories")
    ap.add_argument("--out", default="default-lastfm-cpu")
    ap.add_argument(
        "--reference-encoder",
        default=None,
        help="also test every ranking against this encoder (e.g. one fitted on every training row) on the same draws; "
        "{seed} in it stands for each run's seed",
    )
    args = ap.parse_args()
    from ilora_cli import metrics
    from ilora_cli.evaluation.evaluate import resolve_run

    rrs, rows = zip(*(summarise_run(resolve_run(r), args.reference_encoder) for r in args.runs))
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
        if "reference_encoder" in r:
            ref, fr, lr = r["reference_encoder"]["metrics"], r["fused_vs_reference"], r["llm_vs_reference"]
            print(
                f"{'':<18}reference {r['reference_encoder']['name']}: {ref['hr@1']['mean']:.3f}"
                f"±{ref['hr@1']['std']:.3f} / {ref['mrr']['mean']:.3f}; "
                f"fused − reference MRR {fr['mean_difference']:+.4f} (p = "
                f"{fr['p_value']:.3g}), LLM − reference {lr['mean_difference']:+.4f} (p = {lr['p_value']:.3g})"
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
        if args.reference_encoder:
            ref = np.mean([rr["reference"] for rr in rrs], axis=0)
            pooled["fused_vs_reference"] = metrics.paired_permutation_test(mean_rr["default"], ref)
            pooled["llm_vs_reference"] = metrics.paired_permutation_test(mean_rr["llm"], ref)
            fr, lr = pooled["fused_vs_reference"], pooled["llm_vs_reference"]
            print(
                f"pooled, against {args.reference_encoder}: fused − reference {fr['mean_difference']:+.4f} "
                f"(p = {fr['p_value']:.3g}), LLM − reference {lr['mean_difference']:+.4f} (p = {lr['p_value']:.3g})"
            )
        fused, llm = pooled["fused_vs_encoder"], pooled["llm_vs_encoder"]
        print(
            f"pooled over the runs, per-user MRR: fused − encoder {fused['mean_difference']:+.4f} "
            f"(p = {fused['p_value']:.3f}), LLM − encoder {llm['mean_difference']:+.4f} (p = {llm['p_value']:.2g})"
        )
    popularity = popularity_baseline(dataset, "val", draws, n_rows)
    write_result(args.out, {"runs": list(rows), "mean_over_runs": means, "pooled": pooled, "popularity": popularity})


if __name__ == "__main__":
    main()
