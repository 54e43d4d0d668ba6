"""What makes the language model learn to rank within a CPU budget: the levers side by side, same rows.

Every configuration trains the default backbone (K = 4, user gate unless it says otherwise) on the same
seeded subset of ``--rows`` training rows per seed (the seed also picks the rows), in steps of 8, and is
validated after the steps in ``--validate-at`` on the val rows (all stored draws, score mode): the LLM alone,
the fused ranking (LLM + β·encoder) and the encoder alone, all on the same candidates. The learning curve
of each configuration is read off those validations (mid-run points of one cosine schedule).

    python bench/bench_levers.py --suite levers --rows 1024 --seeds 1 2 3            # on this machine
    python bench/bench_levers.py --suite levers --device cuda --dtype float32 --workers 8 --deadline 300

The results of every (configuration, seed) are merged into ``bench/results/<suite>-<dataset>-<rows>.json``
(or ``--out``) as soon as they finish, so an interrupted sweep keeps what it did. ``--deadline`` (seconds)
starts no new run after that time: the configurations are listed by priority. On a GPU each worker is its
own process; the numbers do not depend on the device (fp32 on both), only the speed does — CPU minutes of
each configuration come from ``bench/bench_step.py --configs``, measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import RESULTS, baseline_line, ensure_dataset, ensure_encoder, machine, popularity_baseline

COMPACT_KD = {"templates": "compact", "distill_weight": 1.0}
SUITES: dict[str, dict[str, dict]] = {
    # priority order: a sweep cut short by its deadline still has the first ones
    "levers": {
        "today": {"templates": "ilora-v1", "distill_weight": 0.0},
        "compact+kd1": COMPACT_KD,
        "compact": {"templates": "compact", "distill_weight": 0.0},
        "v1+kd1": {"templates": "ilora-v1", "distill_weight": 1.0},
        "compact+kd1+lr2e-3": {**COMPACT_KD, "lr": 2e-3},
        "compact+kd3": {**COMPACT_KD, "distill_weight": 3.0},
        "compact+kd1+t2": {**COMPACT_KD, "distill_temperature": 2.0},
        "compact+kd1+hard": {**COMPACT_KD, "hard_negatives": 0.5},
        "compact+kd1+plr1e-2": {**COMPACT_KD, "projector_lr": 1e-2},
        "compact+kd1+attn": {**COMPACT_KD, "target_modules": "q_proj,k_proj,v_proj,o_proj"},
        "compact+kd1+r8": {**COMPACT_KD, "rank": 8},
        "compact+kd1+c10": {**COMPACT_KD, "candidates": 10},
        "compact+kd1+user": {**COMPACT_KD, "user_token": True},
        "compact+user": {"templates": "compact", "distill_weight": 0.0, "user_token": True},
    },
    # why the title head does not learn: {title, item} head x {the next item, the encoder's top-1} as the label,
    # compact templates with the user token (which carries the vectors the encoder's top-1 follows from)
    "heads": {
        "title-next": {"templates": "compact", "user_token": True, "head": "title"},
        "item-next": {"templates": "compact", "user_token": True, "head": "item"},
        "title-encoder": {"templates": "compact", "user_token": True, "head": "title", "label": "encoder"},
        "item-encoder": {"templates": "compact", "user_token": True, "head": "item", "label": "encoder"},
    },
    # the mechanism: K = 4 with the user gate against plain LoRA of the same total rank, LLM alone
    "mechanism": {
        "k4-user": {"experts": 4, "gate": "user", "templates": "compact", "distill_weight": 0.0},
        "k1": {"experts": 1, "templates": "compact", "distill_weight": 0.0},
    },
}


def run_one(task: dict) -> dict:
    """Train one (configuration, seed) and return its record: validation curve, timings, final metrics."""
    if task.get("threads"):
        import torch

        torch.set_num_threads(task["threads"])
    from ilora_cli.home import run_dir
    from ilora_cli.training.loop import TrainConfig, train

    name = f"{task['suite']}-{task['dataset']}-{task['config'].replace('+', '_')}-r{task['rows']}-s{task['seed']}"
    cfg = TrainConfig(
        dataset=task["dataset"],
        name=name,
        seed=task["seed"],
        max_train_samples=task["rows"],
        batch_size=task["batch_size"],
        overwrite=True,
        quiet=True,
        device=task["device"],
        dtype=task["dtype"],
        validate_at=task["validate_at"],
        checkpoint_every=10**6,
        **task["overrides"],
    )
    t = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - t
    logs = run_dir(name) / "logs"
    curve = [json.loads(x) for x in (logs / "validation.jsonl").read_text().splitlines()]
    steps = [json.loads(x) for x in (logs / "train.jsonl").read_text().splitlines()]
    last = steps[-max(1, len(steps) // 4) :]  # the last quarter of the steps: what the model does on its own batches
    train_batches = {
        m: sum(r[f"train_{m}"] for r in last) / len(last) for m in ("hr@1", "mrr") if f"train_{m}" in last[0]
    }
    return {
        "config": task["config"],
        "seed": task["seed"],
        "overrides": task["overrides"],
        "rows": task["rows"],
        "steps": summary["steps"],
        "final_loss": summary["final_loss"],
        "fusion": summary.get("fusion"),
        "train_seconds": summary["train_seconds"],
        "wall_seconds": round(seconds, 1),
        "curve": curve,
        "final": curve[-1]["val"] if curve else None,
        "agreement": curve[-1].get("llm_encoder_top1_agreement") if curve else None,
        "train_batches": train_batches,
    }


def summarise(records: dict[str, dict]) -> dict[str, dict]:
    """Per configuration: mean ± std over seeds of the final HR@1 and MRR of each ranking."""
    import numpy as np

    by_config: dict[str, list[dict]] = {}
    for r in records.values():
        if r.get("final"):
            by_config.setdefault(r["config"], []).append(r)
    out = {}
    for config, rs in by_config.items():
        row = {"seeds": sorted(r["seed"] for r in rs)}
        for ranking in ("llm", "fused", "encoder"):
            for m in ("hr@1", "mrr"):
                vals = np.array([r["final"][ranking][m] for r in rs if ranking in r["final"]])
                if vals.size:
                    row[f"{ranking}_{m}"] = {"mean": float(vals.mean()), "std": float(vals.std())}
        for key, values in (
            ("agreement", [r.get("agreement") for r in rs]),
            ("train_hr@1", [r.get("train_batches", {}).get("hr@1") for r in rs]),
            ("train_mrr", [r.get("train_batches", {}).get("mrr") for r in rs]),
        ):
            vals = np.array([v for v in values if v is not None])
            if vals.size:
                row[key] = {"mean": float(vals.mean()), "std": float(vals.std())}
        out[config] = row
    return out


def print_table(summary: dict[str, dict]) -> None:
    cols = [("llm", "hr@1"), ("llm", "mrr"), ("fused", "hr@1"), ("fused", "mrr"), ("encoder", "hr@1")]
    cols += [("train", "hr@1"), ("train", "mrr"), ("agreement", "")]
    head = "".join(f"{(r + ' ' + m).strip():>18}" for r, m in cols)
    print(f"{'configuration':<24}{'seeds':>8}{head}")
    for config, row in summary.items():
        cells = ""
        for r, m in cols:
            v = row.get(f"{r}_{m}" if m else r)
            cells += f"{v['mean']:>10.3f} ± {v['std']:.3f}" if v else f"{'-':>18}"
        print(f"{config:<24}{len(row['seeds']):>8}{cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=SUITES, default="levers")
    ap.add_argument("--dataset", default=None, help="default: lastfm (levers), synthetic-conflict (mechanism)")
    ap.add_argument("--configs", nargs="+", default=None, help="a subset of the suite's configurations")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--validate-at", default=None, help="steps, comma-separated (default: 64, 128, ... rows)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes (a GPU); 1 runs in this process")
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which no new run starts")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value settings for every run")
    args = ap.parse_args()
    t0 = time.perf_counter()
    dataset = args.dataset or ("lastfm" if args.suite == "levers" else "synthetic-conflict")
    if not ensure_dataset(dataset):
        print(f"dataset {dataset} not available; skipping")
        return
    ensure_encoder(dataset)
    from ilora_cli.config import parse_overrides

    extra = parse_overrides(args.set)
    configs = {k: v for k, v in SUITES[args.suite].items() if args.configs is None or k in args.configs}
    steps = args.rows // args.batch_size
    if args.validate_at:
        validate_at = [int(x) for x in args.validate_at.split(",")]
    else:
        validate_at = sorted({s for s in (8, 16, 32, 64, 128, 256, 512, 1024, steps) if s <= steps})
    out = args.out or RESULTS / f"{args.suite}-{dataset}-{args.rows}.json"
    doc = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    # each worker's share of the CPU cores (a GPU worker needs few)
    threads = max(1, (os.cpu_count() or 2) // args.workers) if args.workers > 1 else None
    tasks = [
        {
            "suite": args.suite,
            "dataset": dataset,
            "config": name,
            "overrides": {**overrides, **extra},
            "seed": seed,
            "rows": args.rows,
            "batch_size": args.batch_size,
            "validate_at": validate_at,
            "device": args.device,
            "dtype": args.dtype,
            "threads": threads,
        }
        for seed in args.seeds
        for name, overrides in configs.items()
    ]

    def record(result: dict) -> None:
        doc["runs"][f"{result['config']}/s{result['seed']}"] = result
        doc.update(
            {
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "suite": args.suite,
                "dataset": dataset,
                "rows": args.rows,
                "batch_size": args.batch_size,
                "device": args.device,
                "dtype": args.dtype,
                "summary": summarise(doc["runs"]),
            }
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(out)
        f = result.get("final") or {}
        print(
            f"[{time.perf_counter() - t0:6.0f} s] {result['config']} seed {result['seed']}: "
            + "  ".join(f"{k} HR@1 {v['hr@1']:.3f} MRR {v['mrr']:.3f}" for k, v in f.items())
            + f"  ({result['wall_seconds']:.0f} s)",
            flush=True,
        )

    def expired() -> bool:
        return args.deadline is not None and time.perf_counter() - t0 > args.deadline

    if args.workers <= 1:
        for task in tasks:
            if expired():
                print("deadline reached: no new runs", flush=True)
                break
            record(run_one(task))
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        pending = list(tasks)
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            running = set()
            while pending or running:
                while pending and len(running) < args.workers and not expired():
                    running.add(pool.submit(run_one, pending.pop(0)))
                if not running:
                    break
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        record(fut.result())
                    except Exception as exc:  # one failed run must not lose the others' results
                        print(f"a run failed: {type(exc).__name__}: {exc}", flush=True)
            if pending:
                print(f"deadline reached: {len(pending)} runs not started", flush=True)
    print_table(summarise(doc["runs"]))
    from ilora_cli.data.prepared import PreparedDataset

    ds = PreparedDataset.open(dataset)
    draws, rows = extra.get("validate_draws"), extra.get("validate_rows")
    print(f"{'baselines (same val rows)':<32}{baseline_line(ds, 'val', draws, rows)}")
    doc["popularity"] = popularity_baseline(ds, "val", draws, rows)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
