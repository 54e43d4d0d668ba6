"""Evaluation benchmarks, measured side by side on the same users, candidates and backbone:

1. score mode (prompt encoded once, 20 titles packed behind it in the same forward) against naive scoring (one full
   prompt + title forward per candidate, batched per user): speed-up (target ≥ 5×) and max |Δ score|;
2. score mode against generate mode (greedy, stopped at the end token): time ratio (aim ≤ 1.5×);
3. single-user ``recommend`` latency (encoder retrieval of 20 + LLM rerank), after loading.

Sum vs mean length normalisation is compared on the validation predictions of every run of
``bench/bench_objectives.py``.

Usage: python bench/bench_eval.py [--run RUN] [--dataset lastfm] [--users 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch
from common import ensure_dataset, write_result


@torch.no_grad()
def naive_scores(run, histories, candidates) -> np.ndarray:
    """One full forward of prompt + title per candidate (the 20 of a user batched together)."""
    b = run.builder
    info = run.info["dataset"]
    out = []
    for hist, cands in zip(histories, candidates):
        cands = [int(c) for c in cands]
        batch = b.batch(
            [hist] * len(cands),
            [cands] * len(cands),
            cands,
            None,
            info["pad_id"],
            info["max_history"],
            padding_side="left",
        )
        answer_len = (batch.labels != -100).sum(-1)  # (C,)
        keep = int(answer_len.max()) + 1
        logits = run.model(dataclasses.replace(batch, labels=None), logits_to_keep=keep)[0].logits  # (C, keep, V)
        logp = torch.log_softmax(logits[:, :-1].float(), -1)  # predicts the last keep-1 tokens
        labels = batch.labels[:, -(keep - 1) :]
        mask = labels != -100
        tok = logp.gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        out.append(tok.sum(-1).numpy())
    return np.stack(out)


def timed_alternately(fns: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds of each function over ``repeats`` calls, the functions called in turn in every round so
    that every path gets the same number of repeats and machine noise falls on all alike; and the last results."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a trained run (default: train a 2-step one)")
    ap.add_argument("--dataset", default="lastfm")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.evaluation.llm import generate_answers, score_candidates
    from ilora_cli.evaluation.recommend import RecommendConfig, Recommender
    from ilora_cli.home import run_dir
    from ilora_cli.training.loop import TrainConfig, train
    from ilora_cli.training.run import load_run

    if not ensure_dataset(args.dataset):
        print(f"dataset {args.dataset} not available; skipping")
        return
    path = args.run
    if path is None:
        path = str(run_dir(f"bench-eval-{args.dataset}"))
        train(TrainConfig(dataset=args.dataset, output=path, max_steps=2, overwrite=True, quiet=True))
    run = load_run(path)
    val = PreparedDataset.open(run.info["dataset"]["name"]).split("val")
    n = min(args.users, len(val))
    hist = val.histories()[:n]
    cands = val.candidates[:n, 0]

    median, results = timed_alternately(
        {
            "score": lambda: score_candidates(run, hist, cands, batch_size=8),
            "naive": lambda: naive_scores(run, hist, cands),
            "generate": lambda: generate_answers(run, hist, cands, batch_size=8),
        },
        args.repeats,
    )
    t_score, t_naive, t_gen = median["score"], median["naive"], median["generate"]
    fast, slow = results["score"][0], results["naive"]
    doc = {
        "run": path,
        "users": n,
        "candidates": int(cands.shape[1]),
        "repeats": args.repeats,  # of every path, alternated; medians
        "score_seconds": t_score,
        "naive_seconds": t_naive,
        "generate_seconds": t_gen,
        "speedup_score_vs_naive": t_naive / t_score,
        "target_speedup": ">= 5",
        "max_abs_score_difference": float(np.abs(fast - slow).max()),
        "ratio_score_over_generate": t_score / t_gen,
        "aim_ratio": "<= 1.5",
    }

    t = time.perf_counter()
    rec = Recommender(RecommendConfig(run=path, user_history="-"))
    doc["recommend_load_seconds"] = time.perf_counter() - t
    lat = []
    for i in range(min(5, n)):
        t = time.perf_counter()
        rec.recommend(hist[i])
        lat.append(time.perf_counter() - t)
    doc["recommend_latency_seconds_median"] = statistics.median(lat)
    doc["recommend_latency_seconds_all"] = lat

    write_result(f"eval-{args.dataset}", doc)


if __name__ == "__main__":
    main()
