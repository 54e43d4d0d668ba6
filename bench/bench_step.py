"""Training step time on the default backbone (batch 8), configurations alternated in one run.

    python bench/bench_step.py [--dataset lastfm] [--repeats 3] [--configs today compact+kd1 ...]

Without ``--configs``: the two objectives (``rank``, ``generate``; K = 4, ilora-v1 templates). With
``--configs``: configurations of ``bench_levers.py`` by name, each a real ``Trainer`` (the same loop as
``ilora train``), stepped in turn so that machine noise falls on all of them alike; the first step of each
is left out (warm-up). The CPU minutes of a budget are steps × the median seconds per step measured here.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import ensure_dataset, write_result

OBJECTIVES = {
    "rank": {"objective": "rank", "templates": "ilora-v1", "distill_weight": 0.0},
    "generate": {"objective": "generate", "templates": "ilora-v1"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="lastfm")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from bench_levers import SUITES

    from ilora_cli.training.loop import TrainConfig, Trainer

    if not ensure_dataset(args.dataset):
        print(f"dataset {args.dataset} not available; skipping")
        return
    configs = {n: SUITES["levers"][n] for n in args.configs} if args.configs else OBJECTIVES
    trainers = {
        name: Trainer(
            TrainConfig(
                dataset=args.dataset,
                name=f"bench-step-{name.replace('+', '_')}",
                overwrite=True,
                quiet=True,
                max_train_samples=8 * (args.repeats + 1),
                checkpoint_every=10**6,
                **overrides,
            )
        )
        for name, overrides in configs.items()
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for t in trainers.values():
        t.model.train()
    for r in range(args.repeats + 1):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.step()
            seconds = time.perf_counter() - t0
            if r > 0:
                times[name].append(seconds)
            print(f"{name:<24} step {r}: {seconds:6.2f} s", flush=True)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    base = next(iter(median))
    for name, m in median.items():
        print(f"{name:<24} median {m:6.2f} s/step   ratio to {base}: {m / median[base]:.2f}")
    write_result(
        args.out or f"step-{args.dataset}" + ("-configs" if args.configs else ""),
        {
            "dataset": args.dataset,
            "batch": 8,
            "step_seconds": times,
            "median_seconds": median,
            "ratio_to_first": {name: m / median[base] for name, m in median.items()},
        },
    )


if __name__ == "__main__":
    main()
