"""Which CPU defaults buy the most in a small budget: {rank, generate} objective × {hybrid, text} prompt.

Each of the four runs trains the default backbone (K=4, user gate) on the same seeded subset of LastFM train
rows, then is evaluated in score mode on the validation rows (stored 20-candidate draws). Random ranking
gives HR@1 = 0.05. Usage:

    python bench/bench_objectives.py [--samples 256] [--draws 2] [--dataset lastfm]
"""

from __future__ import annotations

import argparse
import time

from common import ensure_dataset, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="lastfm")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    from ilora_cli.evaluation.evaluate import EvalConfig, evaluate
    from ilora_cli.home import run_dir
    from ilora_cli.training.loop import TrainConfig, train

    if not ensure_dataset(args.dataset):
        print(f"dataset {args.dataset} not available; skipping")
        return
    rows = {}
    for objective, prompt in (("rank", "hybrid"), ("generate", "hybrid"), ("rank", "text"), ("generate", "text")):
        name = f"bench-{args.dataset}-{objective}-{prompt}-{args.samples}"
        t = time.perf_counter()
        result = train(TrainConfig(dataset=args.dataset, name=name, objective=objective, prompt=prompt,
                                   max_train_samples=args.samples, batch_size=args.batch_size, overwrite=True,
                                   quiet=True))
        train_min = (time.perf_counter() - t) / 60
        t = time.perf_counter()
        ev = evaluate(EvalConfig(runs=[str(run_dir(name))], draws=args.draws, quiet=True))
        m = ev["metrics"]
        rows[f"{objective}+{prompt}"] = {
            "hr@1": m["hr@1"], "hr@5": m["hr@5"], "ndcg@5": m["ndcg@5"], "mrr": m["mrr"],
            "train_minutes": round(train_min, 1), "eval_minutes": round((time.perf_counter() - t) / 60, 1),
            "train_samples_per_second": result["train_samples_per_second"], "final_loss": result["final_loss"],
        }
        print(objective, prompt, {k: round(v["mean"], 4) for k, v in m.items()}, flush=True)
    write_result(f"objectives-{args.dataset}", {
        "dataset": args.dataset, "train_samples": args.samples, "val_rows": ev["n_rows"], "draws": ev["draws"],
        "protocol": ev["protocol"], "random_hr@1": 0.05, "results": rows,
    })


if __name__ == "__main__":
    main()
