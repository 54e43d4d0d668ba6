"""Step time of the two training objectives on the default backbone (K=4, batch 8), alternated in one run.

Usage: python bench/bench_step.py [--dataset synthetic] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_train import batches, build, step_fn
from common import ensure_dataset, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from ilora_cli.data.prepared import PreparedDataset

    if not ensure_dataset(args.dataset):
        print(f"dataset {args.dataset} not available; skipping")
        return
    ds = PreparedDataset.open(args.dataset)
    model, builder = build(ds, 4)
    model.train()
    opt = torch.optim.AdamW([p for ps in model.trainable_parameters().values() for p in ps], lr=1e-5)
    times: dict[str, list[float]] = {"generate": [], "rank": []}
    for _ in range(args.repeats):
        for objective in ("generate", "rank"):
            data = batches(ds, builder, 1, 8, objective)
            t = time.perf_counter()
            step_fn(model, opt, data[0], objective, builder)()
            times[objective].append(time.perf_counter() - t)
            print(objective, round(times[objective][-1], 2), flush=True)
    write_result(
        f"step-{args.dataset}",
        {
            "dataset": args.dataset,
            "batch": 8,
            "experts": 4,
            "step_seconds": times,
            "ratio_rank_over_generate": min(times["rank"]) / min(times["generate"]),
        },
    )


if __name__ == "__main__":
    main()
