"""Where a training step goes: torch.profiler over a few steps of each head, plus score-mode evaluation speed.

    python bench/profile_step.py --device cuda --out bench/results/gpu/profile-step.json      # default backbone, bf16
    python bench/profile_step.py --dataset cyc --backbone DIR --batch-size 4 --candidates 6   # in miniature (tests)

For each head (``title``, ``item``; K = 4, otherwise the defaults, on every row of the training split): one
``Trainer`` (the loop of ``ilora train``), ``--warmup`` steps, then ``--steps`` steps timed and profiled. Then
score-mode evaluation of ``--eval-rows`` validation rows (first candidate draw) with the title run's model, as
``ilora eval`` scores them, timed. The JSON holds, per head: samples/s, the operators with the most time on the
device (on a GPU) and on the host, the fraction of the wall time the device was busy, and the model FLOP
utilisation: model FLOPs = 4·N·tokens (the forward pass and the input gradients of the N frozen decoder
weights, padding not counted) + 4·V·H per scored title position (its logits and expected output embedding),
over the seconds and the device's dense bf16 peak (``--peak-tflops``; known for A100, H100 and H200).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, per GPU (vendor datasheets)


def step_work(trainer, step: int) -> tuple[int, int, int]:
    """(samples, real tokens, scored title positions) of one optimisation step, counted on the host batches."""
    samples = tokens = scored = 0
    for batch, _ in trainer.step_batches(step):
        samples += len(batch.input_ids)
        tokens += int(batch.attention_mask.sum())
        if batch.packed is not None:
            tokens += len(batch.packed.inputs)
            scored += len(batch.input_ids) + len(batch.packed.inputs)
    return samples, tokens, scored


def decoder_weights(model) -> int:
    """N: the weights of the language model's layers (embeddings, output layer and LoRA excluded)."""
    llm = model.llm
    skip = {id(llm.get_input_embeddings().weight), id(llm.get_output_embeddings().weight)}
    return sum(p.numel() for n, p in llm.named_parameters() if id(p) not in skip and "lora_" not in n)


def summary(prof, steps: int, wall: float, on_gpu: bool, top: int = 15) -> dict:
    events = list(prof.key_averages())
    device_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    out = {}
    for side, key in (("host", "self_cpu_time_total"), ("device", device_key if on_gpu else None)):
        if key is None:
            continue
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events)
        out[side] = [
            {
                "op": e.key,
                "self_seconds_per_step": getattr(e, key) / 1e6 / steps,
                "share": getattr(e, key) / total if total else 0.0,
                "calls_per_step": e.count / steps,
            }
            for e in ranked[:top]
        ]
        if side == "device":
            out["device_busy_fraction"] = total / 1e6 / wall
    return out


def profile_head(config: dict, head: str, args) -> tuple[dict, object]:
    from torch.profiler import ProfilerActivity, profile

    from ilora_cli.training.loop import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(**config, head=head))
    trainer.model.train()
    on_gpu = trainer.accelerator.device.type == "cuda"
    for _ in range(args.warmup):
        trainer.step()
    first = trainer.step_count
    work = [step_work(trainer, first + i) for i in range(args.steps)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        losses = [trainer.step()[0] for _ in range(args.steps)]
        wall = time.perf_counter() - t0
    samples, tokens, scored = (sum(w[i] for w in work) for i in range(3))
    model = trainer.unwrapped
    hidden = model.llm.get_input_embeddings().embedding_dim
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    flops = 4 * decoder_weights(model) * tokens + 4 * vocab * hidden * scored
    result = {
        "steps": args.steps,
        "seconds_per_step": wall / args.steps,
        "samples_per_second": samples / wall,
        "tokens_per_step": tokens / args.steps,
        "scored_positions_per_step": scored / args.steps,
        "model_tflops_per_second": flops / wall / 1e12,
        "losses": losses,
        **summary(prof, args.steps, wall, on_gpu),
    }
    return result, trainer


def eval_speed(trainer, args) -> dict:
    from ilora_cli.evaluation.llm import score_candidates
    from ilora_cli.training.run import LoadedRun

    config, model, dataset = trainer.config, trainer.unwrapped, trainer.dataset
    split = dataset.split("val")
    rows = min(args.eval_rows, len(split))
    info = {
        "experts": {"head": config.head},
        "dataset": {"pad_id": dataset.pad_id, "max_history": dataset.max_history},
        "normalize": config.normalize,
        "fusion": None,
    }
    run = LoadedRun(model, trainer.builder.tokenizer, trainer.builder, info, dataset.titles)
    histories, candidates = split.histories()[:rows], split.candidates[:rows, 0]
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(args.eval_repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            score_candidates(run, histories, candidates, args.eval_batch, run.normalize)
            times.append(time.perf_counter() - t0)
    best = min(times[1:])
    return {"rows": rows, "batch_size": args.eval_batch, "seconds": times[1:], "rows_per_second": rows / best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="lastfm")
    ap.add_argument("--backbone", default=None, help="default: the built-in SmolLM2-135M-Instruct")
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--eval-rows", type=int, default=122)
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--eval-repeats", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--output", type=Path, required=True, help="scratch folder for the runs")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    config = {
        "dataset": args.dataset,
        "backbone": args.backbone,
        "encoder": args.encoder,
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "candidates": args.candidates,
        "holdout": "none",
        "overwrite": True,
        "quiet": True,
        "checkpoint_every": 10**6,
        "max_steps": 10**6,
    }
    doc: dict = {"config": {k: v for k, v in config.items() if k not in ("overwrite", "quiet")}, "heads": {}}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else None
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if gpu and k in gpu), None)
    doc["device"], doc["peak_bf16_tflops"] = gpu or "cpu", peak
    for head in ("title", "item"):
        result, trainer = profile_head({**config, "output": str(args.output / head)}, head, args)
        if peak:
            result["model_flop_utilisation"] = result["model_tflops_per_second"] / peak
        doc["heads"][head] = result
        if head == "title":
            doc["eval"] = eval_speed(trainer, args)
        print(f"{head}: {result['samples_per_second']:.1f} samples/s, {result['seconds_per_step']:.3f} s/step")
        trainer.prefetcher.close()
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"score-mode eval: {doc['eval']['rows_per_second']:.1f} rows/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
