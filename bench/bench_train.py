"""Training benchmarks, each measured side by side in one run:

1. cost of the mixture: step time of iLoRA (K=4) / plain LoRA (K=1) at equal total rank (target ≤ 1.05);
2. loop overhead: samples/s of ``ilora train`` / a bare forward+backward+step on the same batches (≥ 0.90);
3. memory: peak RSS of a few training steps with the backbone in 4-bit vs fp32 (report the ratio).

Usage: python bench/bench_train.py [--dataset synthetic] [--steps 6] [--only mixture loop memory]
           [--memory-objective generate] [--memory-steps 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
from common import ensure_dataset, median_time, write_result


def build(dataset, experts, rank=16, objective="generate", load_in_4bit=False):
    from ilora_cli.llm.backbone import BackboneSpec, load_backbone, prepare_for_training
    from ilora_cli.llm.model import ExpertConfig, ILoraModel, attach_lora
    from ilora_cli.llm.prompt import PromptBuilder
    from ilora_cli.training.loop import TrainConfig, ensure_encoder

    encoder, _ = ensure_encoder(TrainConfig(dataset=dataset.name), dataset)
    base, tok = load_backbone(BackboneSpec(load_in_4bit=load_in_4bit))
    base = prepare_for_training(base)
    cfg = ExpertConfig(experts=experts, rank=rank, dropout=0.05)
    torch.manual_seed(0)
    model = ILoraModel(attach_lora(base, cfg), tok, encoder, cfg)
    return model, PromptBuilder(tok, dataset.titles, dataset.domain)


def batches(dataset, builder, n, batch_size, objective):
    from ilora_cli.training.loop import build_batch
    from ilora_cli.training.samples import TrainSamples

    samples = TrainSamples(dataset.split("train"), dataset.n_items, 20, seed=42)
    order = samples.order(0)
    out = []
    for b in range(n):
        rows = [samples.sample(r, 0) for r in order[b * batch_size : (b + 1) * batch_size]]
        out.append(build_batch(builder, rows, objective, dataset.pad_id, dataset.max_history))
    return out


def step_fn(model, optimizer, batch, objective, builder):
    from ilora_cli.llm.scoring import pad_answers

    prompt, target = batch

    def run():
        if objective == "generate":
            loss = model(prompt)[0].loss
        else:
            answers, mask = pad_answers(builder, prompt.candidates.tolist())
            scores, _ = model(prompt, answers=answers, answer_mask=mask)
            loss = torch.nn.functional.cross_entropy(scores, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return run


def mixture_cost(dataset, steps: int, batch_size: int) -> dict:
    """K=4 and K=1 models built once, steps interleaved (ABAB...) on identical batches."""
    models = {}
    for k in (1, 4):
        model, builder = build(dataset, k)
        model.train()
        opt = torch.optim.AdamW([p for ps in model.trainable_parameters().values() for p in ps], lr=1e-5)
        models[k] = (model, opt, builder)
    data = batches(dataset, models[1][2], 2, batch_size, "generate")
    for k in (1, 4):  # warm-up
        step_fn(models[k][0], models[k][1], data[0], "generate", models[k][2])()
    times = {1: [], 4: []}
    for i in range(steps):
        for k in (1, 4) if i % 2 == 0 else (4, 1):
            model, opt, builder = models[k]
            times[k].append(median_time(step_fn(model, opt, data[i % 2], "generate", builder), 1))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    tokens = int(data[0][0].attention_mask.sum())
    return {
        "k1_step_seconds": med[1],
        "k4_step_seconds": med[4],
        "ratio_k4_over_k1": med[4] / med[1],
        "batch": batch_size,
        "tokens_per_batch": tokens,
        "steps_each": steps,
        "target": "<= 1.05",
    }


def loop_overhead(dataset, steps: int, batch_size: int, objective: str) -> dict:
    """``train()`` against a bare forward+backward+step on the same batches and model build.

    Order: bare, loop, bare again (machine load drifts); the first step of each block is a warm-up and
    is left out. The loop's per-step seconds come from its own JSONL log (optimisation steps only).
    """
    import json
    import statistics
    import tempfile

    from ilora_cli.training.loop import TrainConfig, train

    def bare_block() -> list[float]:
        model, builder = build(dataset, 4, objective=objective)
        model.train()
        opt = torch.optim.AdamW([p for ps in model.trainable_parameters().values() for p in ps], lr=1e-5)
        times = []
        for b in batches(dataset, builder, steps, batch_size, objective):
            t = time.perf_counter()
            step_fn(model, opt, b, objective, builder)()
            times.append(time.perf_counter() - t)
        return times[1:]

    bare = bare_block()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            dataset=dataset.name,
            output=f"{tmp}/run",
            max_steps=steps,
            batch_size=batch_size,
            objective=objective,
            quiet=True,
            checkpoint_every=10**6,
            warmup_ratio=0.0,
        )
        train(cfg)
        logged = [json.loads(x) for x in open(f"{tmp}/run/logs/train.jsonl", encoding="utf-8")]
    loop = [r["seconds"] for r in logged][1:]
    bare += bare_block()
    loop_s, bare_s = statistics.median(loop), statistics.median(bare)
    return {
        "loop_step_seconds_median": loop_s,
        "bare_step_seconds_median": bare_s,
        "loop_samples_per_second": batch_size / loop_s,
        "bare_samples_per_second": batch_size / bare_s,
        "ratio_loop_over_bare": bare_s / loop_s,
        "loop_step_seconds": loop,
        "bare_step_seconds": bare,
        "objective": objective,
        "target": ">= 0.90",
    }


# Peak resident memory of the child itself: VmHWM belongs to the process's own address space, unlike
# ru_maxrss, which Linux carries over from the parent across fork + exec.
MEM = r"""
import re, sys, tempfile
from ilora_cli.training.loop import TrainConfig, train
with tempfile.TemporaryDirectory() as tmp:
    train(TrainConfig(dataset=sys.argv[1], output=tmp + "/run", max_steps=int(sys.argv[4]), batch_size=8, quiet=True,
                      objective=sys.argv[3], load_in_4bit=sys.argv[2] == "4bit"))
print(int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)))
"""


def memory(dataset_name: str, objective: str, steps: int) -> dict:
    """Peak RSS of a fresh process that loads the backbone and trains ``steps`` steps, fp32 and NF4."""
    out = {"objective": objective, "steps": steps, "batch": 8}
    for mode in ("fp32", "4bit"):
        r = subprocess.run(
            [sys.executable, "-c", MEM, dataset_name, mode, objective, str(steps)], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        out[f"{mode}_peak_rss_mib"] = int(r.stdout.strip().splitlines()[-1]) / 1024
    out["ratio_4bit_over_fp32"] = out["4bit_peak_rss_mib"] / out["fp32_peak_rss_mib"]
    return out


PARTS = ("mixture", "loop", "memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--objective", default="rank")
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    ap.add_argument("--memory-objective", default="generate")
    ap.add_argument("--memory-steps", type=int, default=2)
    args = ap.parse_args()
    from ilora_cli.data.prepared import PreparedDataset

    if not ensure_dataset(args.dataset):
        print(f"dataset {args.dataset} not available; skipping")
        return
    dataset = PreparedDataset.open(args.dataset)
    doc = {"dataset": args.dataset, "backbone": "SmolLM2-135M-Instruct (default)"}
    if "mixture" in args.only:
        doc["mixture_cost"] = mixture_cost(dataset, args.steps, args.batch_size)
    if "loop" in args.only:
        doc["loop_overhead"] = loop_overhead(dataset, args.steps, args.batch_size, args.objective)
    if "memory" in args.only:
        doc["memory"] = memory(args.dataset, args.memory_objective, args.memory_steps)
    # the full run keeps the name "train"; a partial one gets its own file
    write_result("train" if set(args.only) == set(PARTS) else f"train-{args.dataset}-{'-'.join(args.only)}", doc)


if __name__ == "__main__":
    main()
