"""Which CPU defaults buy the most in a small budget: {rank, generate} objective × {hybrid, text} prompt.

Each of the four runs trains the default backbone (K=4, user gate) on the same seeded subset of LastFM train
rows, then is evaluated in score mode on the validation rows (stored 20-candidate draws). Random ranking
gives HR@1 = 0.05. Usage:

    python bench/bench_objectives.py [--samples 256] [--draws 2] [--dataset lastfm] [--only rank+hybrid ...]
                                     [--normalize mean]   # the rank objective on mean scores: rows "rank+...+mean"

Results are written after each configuration, so an interrupted run keeps what it finished; ``--only``
runs a subset and merges it into the existing result file. Score mode uses the sum of the title's token
log-probabilities; the same predictions are also ranked by their mean (length-normalised) for comparison.

Like with like: every configuration is read by its language model's scores alone. A ``rank`` run's default
ranking fuses them with the encoder's (``fusion=learned``), which a ``generate`` run cannot do; the fused
metrics of the rank runs are recorded beside (``fused_hr@1``, ``fused_mrr``), never in the compared columns.
Candidates ranked by training popularity and at random, on the same rows and draws, are reported with them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, ensure_dataset, normalisation_metrics, popularity_baseline, random_baseline, write_result

CONFIGS = ("rank+hybrid", "generate+hybrid", "rank+text", "generate+text")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="lastfm")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--only", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--normalize", choices=("sum", "mean"), default="sum", help="the rank objective's scores")
    ap.add_argument("--templates", default="compact", help="prompt template set (the stored table: ilora-v1)")
    args = ap.parse_args()
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.evaluation.evaluate import EvalConfig, evaluate
    from ilora_cli.home import run_dir
    from ilora_cli.training.loop import TrainConfig, train
    from ilora_cli.training.run import load_run

    if not ensure_dataset(args.dataset):
        print(f"dataset {args.dataset} not available; skipping")
        return
    popularity = popularity_baseline(PreparedDataset.open(args.dataset), "val", args.draws)  # the same rows, draws
    out = f"objectives-{args.dataset}-{args.samples}"
    previous = RESULTS / f"{out}.json"
    rows = json.loads(previous.read_text())["results"] if previous.is_file() else {}
    for key in args.only:
        objective, prompt = key.split("+")
        suffix = "-mean" if args.normalize == "mean" and objective == "rank" else ""
        name = f"bench-{args.dataset}-{objective}-{prompt}-{args.samples}{suffix}"
        t = time.perf_counter()
        result = train(
            TrainConfig(
                dataset=args.dataset,
                name=name,
                objective=objective,
                prompt=prompt,
                normalize=args.normalize,
                templates=args.templates,
                max_train_samples=args.samples,
                batch_size=args.batch_size,
                overwrite=True,
                quiet=True,
            )
        )
        train_min = (time.perf_counter() - t) / 60
        t = time.perf_counter()
        ev = evaluate(EvalConfig(runs=[str(run_dir(name))], draws=args.draws, normalize="sum", quiet=True))
        eval_min = (time.perf_counter() - t) / 60
        run = ev["results"][name]
        m = run.get("llm", run)["metrics"]  # the LLM alone: a rank run's default ranking is fused with the encoder
        norm = normalisation_metrics(Path(run["predictions"]), load_run(run_dir(name)).builder)
        rows[key + suffix.replace("-", "+")] = {
            "ranking": "llm alone",
            "templates": args.templates,
            "hr@1": m["hr@1"],
            "hr@5": m["hr@5"],
            "ndcg@5": m["ndcg@5"],
            "mrr": m["mrr"],
            "hr@1_mean_normalised": norm["mean"]["hr@1"],
            "mrr_mean_normalised": norm["mean"]["mrr"],
            "train_minutes": round(train_min, 1),
            "eval_minutes": round(eval_min, 1),
            "train_samples_per_second": result["train_samples_per_second"],
            "final_loss": result["final_loss"],
            "steps": result["steps"],
        }
        if "llm" in run:
            rows[key + suffix.replace("-", "+")].update(
                fused_hr1=run["metrics"]["hr@1"], fused_mrr=run["metrics"]["mrr"]
            )
        print(key, {k: round(v["mean"], 4) for k, v in m.items()}, flush=True)
        write_result(
            out,
            {
                "dataset": args.dataset,
                "train_samples": args.samples,
                "batch": args.batch_size,
                "val_rows": ev["n_rows"],
                "draws": ev["draws"],
                "protocol": ev["protocol"],
                "popularity": popularity,
                "random": random_baseline(popularity["candidates"]),
                "results": rows,
            },
        )


if __name__ == "__main__":
    main()
