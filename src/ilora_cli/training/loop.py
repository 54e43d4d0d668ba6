"""``ilora train``: setup → train → save, on HF accelerate (one process, or DDP under a launcher)."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .. import __version__
from ..config import check_minimums, to_dict
from ..console import err, progress
from ..errors import UserError
from ..home import check_name
from ..home import run_dir as named_run_dir
from ..llm.experts import GATE_TYPES

OBJECTIVES = ("rank", "generate")
PROMPTS = ("hybrid", "text")


@dataclass
class TrainConfig:
    dataset: str = "synthetic"  # prepared dataset name (or path)
    name: str | None = None  # run name under $ILORA_HOME/runs (default <dataset>-k<experts>)
    output: Path | None = None  # the run directory, instead of $ILORA_HOME/runs/<name>
    overwrite: bool = False  # replace an existing run directory
    resume: bool = False  # continue the run in the run directory from its newest checkpoint
    encoder: str | None = None  # encoder name or path (default <dataset>-sasrec, trained first if missing)
    backbone: str | None = None  # HF directory or hub id; default: the built-in SmolLM2-135M-Instruct
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16
    load_in_4bit: bool = False  # bitsandbytes NF4 backbone (QLoRA)
    device: str = "auto"  # auto, cpu, cuda
    experts: int = 4  # K LoRA experts (1 = plain LoRA: LLaRA with the hybrid prompt)
    rank: int = 16  # total LoRA rank, split into K experts of rank/K
    alpha: float = 32.0  # LoRA alpha
    lora_dropout: float = 0.05  # dropout on the LoRA input
    gate: str = "user"  # user (softmax(Linear(u))), mlp, prompt, token, uniform
    target_modules: str = "all-linear"  # which linear layers get LoRA (peft syntax; comma list allowed)
    prompt: str = "hybrid"  # hybrid (projected item embeddings in the prompt) or text (TALLRec-style)
    objective: str = "rank"  # rank (listwise over candidate titles) or generate (answer cross-entropy)
    normalize: str = "mean"  # candidate score: mean or sum of title token log-probs (rank objective, eval)
    candidates: int = 20  # candidates in each training prompt
    lr: float = 5e-4  # LoRA learning rate
    projector_lr: float = 2e-3  # projector learning rate (high enough that it moves in short runs)
    gate_lr: float | None = None  # gate learning rate (default 0.3 x lr, as in the reference)
    weight_decay: float = 1e-5  # AdamW weight decay of projector and gate (LoRA: none)
    warmup_ratio: float = 0.05  # linear warm-up over this fraction of steps, then cosine
    min_lr_ratio: float = 0.01  # the cosine ends at lr x this
    batch_size: int = 8  # samples per process per micro-step
    grad_accum: int = 1  # micro-steps per optimisation step
    max_grad_norm: float = 1.0  # gradient clipping
    epochs: float = 1.0  # passes over the (possibly limited) training rows
    max_steps: int | None = None  # exact number of optimisation steps (overrides epochs)
    max_train_samples: int | None = None  # train on a fixed, seeded subset of this many rows
    stop_after: int | None = None  # stop after this many steps with a checkpoint, to --resume later
    gradient_checkpointing: bool = False  # trade compute for memory
    checkpoint_every: int = 50  # checkpoint every N optimisation steps (and at the end)
    log_every: int = 1  # log every N optimisation steps
    seed: int = 42  # data order, candidates, templates, initialisation, dropout
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    quiet: bool = False  # no progress bar

    def validate(self) -> None:
        if self.gate not in GATE_TYPES:
            raise UserError(f"Unknown gate {self.gate!r}; choose one of: {', '.join(GATE_TYPES)}.")
        if self.objective not in OBJECTIVES:
            raise UserError(f"Unknown objective {self.objective!r}; choose rank or generate.")
        if self.normalize not in ("sum", "mean"):
            raise UserError(f"normalize must be sum or mean; got {self.normalize!r}.")
        if self.prompt not in PROMPTS:
            raise UserError(f"Unknown prompt {self.prompt!r}; choose hybrid or text.")
        if self.experts < 1 or self.rank < 1 or self.rank % self.experts:
            raise UserError(f"rank ({self.rank}) must be a positive multiple of experts ({self.experts}).")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}.")
        check_minimums(
            self,
            {
                "batch_size": 1,
                "grad_accum": 1,
                "candidates": 2,
                "checkpoint_every": 1,
                "log_every": 1,
                "max_steps": 1,
                "max_train_samples": 1,
                "stop_after": 1,
            },
        )
        if self.epochs <= 0:
            raise UserError(f"epochs must be positive; got {self.epochs}.")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one.")
        if self.name is not None:
            check_name(self.name, "run name")

    def run_directory(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        return named_run_dir(self.name or f"{Path(self.dataset).name}-k{self.experts}")


def lr_lambda(total_steps: int, warmup_ratio: float, min_ratio: float):
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak learning rate."""
    warmup = max(1, int(round(warmup_ratio * total_steps))) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    return f


def ensure_encoder(config: TrainConfig, dataset) -> tuple[Any, dict[str, Any]]:
    """Load the run's encoder; train the default one first when it does not exist yet."""
    from ..encoders.io import check_compatible, load_encoder
    from ..home import encoder_dir

    name = config.encoder or f"{dataset.name}-sasrec"
    if config.encoder is None and not (encoder_dir(name) / "encoder.json").is_file():
        from ..encoders.train import EncodeConfig, encode

        err.print(f"No encoder {name!r} yet: training SASRec on {dataset.name!r} first (ilora encode).")
        encode(EncodeConfig(dataset=str(dataset.path), name=name, seed=config.seed, quiet=config.quiet))
    encoder, info = load_encoder(name)
    check_compatible(info, dataset)
    return encoder, info


def build_batch(builder, samples, objective: str, pad_id: int, max_history: int):
    """The PromptBatch (and targets) of a list of samples for one objective."""
    hist = [s.history for s in samples]
    cands = [s.candidates for s in samples]
    templates = [s.template for s in samples]
    if objective == "generate":
        return builder.batch(hist, cands, [s.target for s in samples], templates, pad_id, max_history), None
    prefix = builder.batch(hist, cands, None, templates, pad_id, max_history, padding_side="left")
    return prefix, torch.tensor([s.target_index for s in samples])


def train(config: TrainConfig) -> dict[str, Any]:
    """Train an iLoRA run; returns the summary document of ``ilora train --json``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..data.prepared import PreparedDataset
    from ..llm.backbone import BackboneSpec, load_backbone, prepare_for_training
    from ..llm.model import ExpertConfig, ILoraModel, attach_lora
    from ..llm.prompt import PromptBuilder
    from ..llm.scoring import normalise_scores, pad_answers
    from .checkpoint import list_checkpoints, load_checkpoint, restore_rng, save_checkpoint
    from .run import file_sha256, write_final
    from .samples import TrainSamples

    if config.threads:
        torch.set_num_threads(config.threads)
    run_dir = config.run_directory()
    if config.resume:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"There is no run to resume in {run_dir}.")
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not config.overwrite:
            raise UserError(f"The run directory {run_dir} already exists; pass --resume or --overwrite.")
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = BackboneSpec(config.backbone, config.dtype, config.load_in_4bit, device)
    spec.validate()
    mixed = "bf16" if device.startswith("cuda") and spec.torch_dtype() == torch.bfloat16 else "no"
    accelerator = Accelerator(
        cpu=not device.startswith("cuda"), mixed_precision=mixed, gradient_accumulation_steps=config.grad_accum
    )
    main = accelerator.is_main_process
    spec.device = str(accelerator.device)
    set_seed(config.seed)

    dataset = PreparedDataset.open(config.dataset)
    encoder, enc_info = ensure_encoder(config, dataset) if main else (None, None)
    accelerator.wait_for_everyone()
    if not main:
        encoder, enc_info = ensure_encoder(config, dataset)
    split = dataset.split("train")
    samples = TrainSamples(split, dataset.n_items, config.candidates, config.seed, config.max_train_samples)

    t_load = time.perf_counter()
    base, tokenizer = load_backbone(spec)
    base = prepare_for_training(base, config.gradient_checkpointing)
    experts = ExpertConfig(
        experts=config.experts,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.lora_dropout,
        gate=config.gate,
        target_modules=_targets(config.target_modules),
        hybrid=config.prompt == "hybrid",
    )
    torch.manual_seed(config.seed)
    model = ILoraModel(attach_lora(base, experts), tokenizer, encoder, experts).to(accelerator.device)
    builder = PromptBuilder(tokenizer, dataset.titles, dataset.domain, hybrid=experts.hybrid)
    load_seconds = time.perf_counter() - t_load

    groups = model.trainable_parameters()
    gate_lr = config.gate_lr if config.gate_lr is not None else 0.3 * config.lr
    optimizer = torch.optim.AdamW(
        [
            g
            for g in (
                {"params": groups["lora"], "lr": config.lr, "weight_decay": 0.0, "name": "lora"},
                {
                    "params": groups["projector"],
                    "lr": config.projector_lr,
                    "weight_decay": config.weight_decay,
                    "name": "projector",
                },
                {"params": groups["gate"], "lr": gate_lr, "weight_decay": config.weight_decay, "name": "gate"},
            )
            if g["params"]
        ]
    )
    world = accelerator.num_processes
    per_step = config.batch_size * world * config.grad_accum  # samples per optimisation step
    micro_per_epoch = len(samples) // (config.batch_size * world)
    if micro_per_epoch < config.grad_accum:
        raise UserError(
            f"{len(samples)} training rows are fewer than one optimisation step ({per_step} samples); "
            "lower --batch-size or grad_accum."
        )
    steps_per_epoch = micro_per_epoch // config.grad_accum
    total_steps = config.max_steps or max(1, int(steps_per_epoch * config.epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, config.warmup_ratio, config.min_lr_ratio)
    )

    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    step, losses, resumed_from = 0, [], None
    if config.resume:
        ckpts = list_checkpoints(run_dir / "checkpoints")
        if not ckpts:
            raise UserError(f"{run_dir} has no checkpoint to resume from.")
        ck = load_checkpoint(ckpts[-1])
        missing = set(trainable_names) - set(ck["trainable"])
        if missing:
            raise UserError(f"The checkpoint {ckpts[-1]} does not match this configuration (missing weights).")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in trainable_names:
                params[n].copy_(ck["trainable"][n])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["state"]["scheduler"])
        restore_rng(ck["rng"])
        step = int(ck["state"]["step"])
        losses = list(ck["state"].get("losses", []))
        resumed_from = str(ckpts[-1])
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    if main:
        if not config.resume:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            (run_dir / "logs").mkdir(parents=True)
            shutil.copytree(enc_info["path"], run_dir / "encoder")
            (run_dir / "items.json").write_text(json.dumps({"titles": dataset.titles}, ensure_ascii=False) + "\n")
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    accelerator.wait_for_everyone()

    sample_tokens = [
        len(builder.prompt_ids(s.history, s.candidates, s.template)) + len(builder.answer_ids(s.target))
        for s in (samples.sample(r, 0) for r in samples.order(0)[:32])
    ]
    mean_tokens = float(np.mean(sample_tokens))
    if main:
        err.print(
            f"Run {run_dir.name}: {len(samples):,} training rows, {total_steps:,} steps of {per_step} samples "
            f"({total_steps * per_step:,} samples, ≈{total_steps * per_step * mean_tokens:,.0f} prompt tokens, "
            f"{mean_tokens:.0f} per prompt), objective {config.objective}, prompt {config.prompt}, "
            f"K={config.experts} gate={config.gate}, {world} process(es) on {accelerator.device}."
        )
        if resumed_from:
            err.print(f"Resuming from {resumed_from} at step {step}.")

    log_file = run_dir / "logs" / "train.jsonl"
    if main and resumed_from:
        _truncate_log(log_file, step)  # steps logged after the checkpoint (before a kill) are run again
    tb = _tensorboard(run_dir / "logs") if main else None
    model.train()
    rank_ = accelerator.process_index
    t_train, train_seconds, done_samples = None, 0.0, 0
    estimate_printed = False
    bar = progress(disable=config.quiet or not main)
    with bar:
        task = bar.add_task("train", total=total_steps, completed=step, info="")
        while step < total_steps:
            if config.stop_after is not None and step >= config.stop_after:
                break
            t0 = time.perf_counter()
            step_loss = 0.0
            for micro in range(config.grad_accum):
                global_micro = step * config.grad_accum + micro
                epoch, pos = divmod(global_micro, micro_per_epoch)
                order = samples.order(epoch)
                start = (pos * world + rank_) * config.batch_size
                batch_samples = [samples.sample(r, epoch) for r in order[start : start + config.batch_size]]
                batch, target_index = build_batch(
                    builder, batch_samples, config.objective, dataset.pad_id, dataset.max_history
                )
                batch = batch.to(accelerator.device)
                with accelerator.accumulate(model):
                    if config.objective == "generate":
                        out, _ = model(batch)
                        loss = out.loss
                    else:
                        answers, answer_mask = pad_answers(builder, batch.candidates.tolist())
                        answer_mask = answer_mask.to(accelerator.device)
                        scores, _ = model(batch, answers=answers.to(accelerator.device), answer_mask=answer_mask)
                        scores = normalise_scores(scores, answer_mask, config.normalize)
                        loss = torch.nn.functional.cross_entropy(scores, target_index.to(accelerator.device))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                step_loss += loss.detach().float().item() / config.grad_accum
            scheduler.step()
            step += 1
            step_loss = accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "mean").item()
            losses.append(step_loss)
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            done_samples += per_step
            if t_train is None:
                t_train = t0
            sps = done_samples / train_seconds
            lr_now = scheduler.get_last_lr()[0]
            bar.update(task, completed=step, info=f"loss {step_loss:.4f}  lr {lr_now:.2e}  {sps:.2f} samples/s")
            if main and not estimate_printed and (done_samples >= 2 * per_step or step == total_steps):
                remaining = (total_steps - step) * train_seconds / (done_samples / per_step)
                err.print(
                    f"≈{train_seconds / (done_samples / per_step):.1f} s/step: about {remaining / 60:.1f} min left "
                    f"for this run (a full epoch of {len(split):,} rows would take "
                    f"≈{len(split) / sps / 3600:.1f} h at this speed)."
                )
                estimate_printed = True
            if main and (step % config.log_every == 0 or step == total_steps):
                record = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    "loss": step_loss,
                    "lr": lr_now,
                    "samples_per_second": sps,
                    "seconds": round(seconds, 4),
                }
                with open(log_file, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
                if tb is not None:
                    tb.add_scalar("train/loss", step_loss, step)
                    tb.add_scalar("train/lr", lr_now, step)
            stopping = config.stop_after is not None and step >= config.stop_after
            if step % config.checkpoint_every == 0 or step == total_steps or stopping:
                accelerator.wait_for_everyone()
                if main:
                    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
                    save_checkpoint(
                        run_dir / "checkpoints",
                        trainable,
                        optimizer,
                        scheduler,
                        {"step": step, "total_steps": total_steps, "losses": losses},
                    )
    accelerator.wait_for_everyone()
    finished = step >= total_steps
    # Every process records a digest of its trainable weights: under DDP they must all agree.
    digest = weights_digest(unwrapped)
    (run_dir / "logs" / f"weights-rank{rank_}.sha256").write_text(digest + "\n")
    summary = {
        "run_dir": str(run_dir),
        "steps": step,
        "total_steps": total_steps,
        "complete": finished,
        "final_loss": losses[-1] if losses else None,
        "train_samples_per_second": done_samples / train_seconds if train_seconds else None,
        "train_seconds": round(train_seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "samples_seen": step * per_step,
        "processes": world,
        "resumed_from": resumed_from,
        "weights_sha256": digest,
    }
    if main and finished:
        info = {
            "tool_version": __version__,
            "backbone": spec.describe(),
            "experts": {
                "experts": experts.experts,
                "rank": experts.rank,
                "alpha": experts.alpha,
                "dropout": experts.dropout,
                "gate": experts.gate,
                "target_modules": experts.target_modules,
                "hybrid": experts.hybrid,
            },
            "prompt": config.prompt,
            "objective": config.objective,
            "normalize": config.normalize,
            "templates": "ilora-v1",
            "encoder": {
                "type": enc_info["type"],
                "name": Path(enc_info["path"]).name,
                "sha256": file_sha256(run_dir / "encoder" / "encoder.safetensors"),
            },
            "dataset": {
                "name": dataset.name,
                "checksum": dataset.checksum,
                "n_items": dataset.n_items,
                "domain": dataset.domain,
                "max_history": dataset.max_history,
                "pad_id": dataset.pad_id,
            },
            "training": {k: summary[k] for k in ("steps", "final_loss", "samples_seen", "processes")},
        }
        write_final(run_dir, unwrapped, info)
        err.print(f"Saved the run to {run_dir}.")
    elif main:
        err.print(f"Stopped after step {step} of {total_steps}; continue with --resume.")
    if tb is not None:
        tb.close()
    accelerator.end_training()
    return summary


def is_trained_weight(name: str) -> bool:
    """Whether an :class:`ILoraModel` parameter is one that training changes (and a run saves)."""
    return "lora_" in name or name.startswith(("projector.", "gate.", "token_routers."))


def weights_digest(model) -> str:
    """SHA-256 over the weights that training changes (LoRA, projector, gate, token routers; name order),
    to compare processes, runs, or a run with its reloaded copy bit for bit. Chosen by name, not by
    ``requires_grad``, so that a reloaded (frozen) run hashes the same set."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if is_trained_weight(name):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _truncate_log(log_file: Path, step: int) -> None:
    """Keep the log records up to ``step``, written atomically."""
    if not log_file.is_file():
        return
    kept = [x for x in log_file.read_text(encoding="utf-8").splitlines() if x and json.loads(x)["step"] <= step]
    tmp = log_file.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
    tmp.replace(log_file)


def _targets(spec: str):
    return spec if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]


def _tensorboard(logdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(logdir))
