"""The training run: setup → the loop of steps (with checkpoints) → save, on HF accelerate (one process, or DDP under a
launcher)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .. import __version__
from ..config import to_dict
from ..console import err, labelled, progress
from ..devices import resolve_device
from ..errors import UserError
from ..home import append_json_line, check_replaceable
from . import gate_stats, validation
from .batches import Prefetcher, build_batch
from .checkpoint import truncate_log
from .config import TrainConfig, check_validate_at
from .fusion_fit import ApartRows
from .identity import check_resume, check_resume_data, data_identity
from .loss import batch_loss
from .notes import below_note, fusion_note, hours_or_minutes
from .weights import encoder_sha256, weights_digest

_RESUME_HINT = "the last checkpoint is intact: free some space and pass --resume."


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
        encode(
            EncodeConfig(
                dataset=str(dataset.path), name=name, seed=config.seed, quiet=config.quiet, holdout=config.holdout
            )
        )
    encoder, info = load_encoder(name)
    check_compatible(info, dataset)
    return encoder, info


def train(config: TrainConfig) -> dict[str, Any]:
    """Train an iLoRA run; returns the summary document of ``ilora train --json``."""
    return Trainer(config).run()


class Trainer:
    """One training run, in the order of a recipe: setup (``__init__``) → ``run`` (the loop of ``step`` calls,
    with checkpoints) → ``save``. One process, or one of several under DDP."""

    def __init__(self, config: TrainConfig):
        config.validate()  # also resolves the settings whose default depends on the objective
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.run_dir = config.run_directory()
        self._check_run_dir()
        self._setup_accelerator()
        self._setup_data()
        self._setup_model()
        self.gate_init = gate_stats.snapshot(self._gate_params()) if config.experts > 1 else None  # W(0)
        self._setup_optimizer()
        self.step_count, self.losses, self.resumed_from, self.kept = 0, [], None, None
        self.prefetcher, self._clip_groups = None, None  # made at the first step
        if config.resume:
            self._resume()
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self._init_run_dir()
        self._announce()

    # -- setup ---------------------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        run_dir, config = self.run_dir, self.config
        self.final_dir = run_dir  # where the finished run goes; self.run_dir is where it is written meanwhile
        self.fresh_start = not config.resume
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"The run directory {run_dir} is a file, not a folder; pass another --output or --name.")
        if (config.resume or config.overwrite) and run_dir.is_dir():
            check_replaceable(run_dir, "run")  # both may delete what the folder holds
        if config.resume:
            if not (run_dir / "config.yaml").is_file():
                raise UserError(
                    f"There is no run to resume in {run_dir}; start it without --resume "
                    "(with --overwrite if the folder exists)."
                )
            check_resume(run_dir, config)
        elif run_dir.exists() and any(run_dir.iterdir()):
            if not config.overwrite:
                raise UserError(
                    f"The run directory {run_dir} already exists; pass --resume to continue it "
                    "or --overwrite to replace it."
                )
            if (run_dir / "ilora.json").is_file():
                # A finished run is replaced only once the new one is finished: train beside it meanwhile.
                if config.stop_after is not None:
                    raise UserError(
                        f"--stop-after would leave an unfinished run, which cannot replace the finished one in "
                        f"{run_dir}; pass another --name."
                    )
                self.run_dir = run_dir.with_name(f".{run_dir.name}.tmp-overwrite")

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from ..llm.backbone import BackboneSpec, mixed_precision

        config = self.config
        device = resolve_device(config.device)
        self.spec = BackboneSpec(config.backbone, config.dtype, config.load_in_4bit, device)
        self.spec.validate()
        mixed = mixed_precision(device, self.spec.torch_dtype())
        self.accelerator = Accelerator(
            cpu=not device.startswith("cuda"),
            mixed_precision=mixed,
            gradient_accumulation_steps=config.grad_accum,
            log_with=_tracker(config.report_to),
            project_dir=str(self.run_dir / "logs"),
        )
        self.main = self.accelerator.is_main_process
        self.spec.device = str(self.accelerator.device)
        set_seed(config.seed)

    def _setup_data(self) -> None:
        from ..data.holdout import second_stage_rows, set_apart, train_users
        from ..data.prepared import PreparedDataset
        from ..llm.prompt import TEMPLATE_SETS
        from .samples import TrainSamples

        config, accelerator = self.config, self.accelerator
        self.dataset = PreparedDataset.open(config.dataset)
        # The main process trains a missing encoder first; the others then load it.
        encoder, enc_info = ensure_encoder(config, self.dataset) if self.main else (None, None)
        accelerator.wait_for_everyone()
        if not self.main:
            encoder, enc_info = ensure_encoder(config, self.dataset)
        self.encoder, self.enc_info = encoder, enc_info
        self.split = self.dataset.split("train")
        rows, self.holdout = second_stage_rows(self.dataset, enc_info, config.holdout)
        self.data_identity = data_identity(self.dataset, encoder_sha256(Path(enc_info["path"])), self.holdout["spec"])
        if self.holdout["encoder_saw_training_rows"] and self.main:
            labelled(
                "note",
                f"the encoder {Path(enc_info['path']).name!r} was fitted on the rows this run trains "
                "on, so its scores there are far better than on new users (holdout "
                f"{self.holdout['spec']}, training on {self.holdout['train_rows_from']}); an encoder with a holdout "
                "leaves rows out for this stage (`ilora encode`, data/holdout.py).",
            )
        rows, apart = set_apart(rows, train_users(self.dataset)[0], config.apart_users, config.seed)
        self.samples = TrainSamples(
            self.split,
            self.dataset.n_items,
            config.candidates,
            config.seed,
            config.max_train_samples,
            n_templates=len(TEMPLATE_SETS[config.templates]),
            rows=rows,
        )
        if config.hard_negatives > 0:
            self.samples.use_hard_negatives(encoder, config.hard_negatives, config.hard_pool)
        self.log_q = None  # (n_items,) on the device with popularity sampling: the softmax's logQ correction
        if config.negative_sampling == "popularity":
            self.samples.use_popularity(self.split.next)
            self.log_q = torch.as_tensor(self.samples.log_q, dtype=torch.float32, device=accelerator.device)
        self.apart, self.apart_users, self.fusion_fit = None, 0, None  # the rows set apart (fusion_fit.py)
        self.check = None  # the default ranking against the encoder on the val catalogue, at the end
        if len(apart):
            self.apart_users = int(len(np.unique(train_users(self.dataset)[0][apart])))
            self.apart = ApartRows.build(
                self.split, apart, config.head == "item", self.dataset.n_items, config.candidates, config.seed
            )
        world = accelerator.num_processes
        self.per_step = config.batch_size * world * config.grad_accum  # samples per optimisation step
        self.micro_per_epoch = len(self.samples) // (config.batch_size * world)
        if self.micro_per_epoch < config.grad_accum:
            raise UserError(
                f"{len(self.samples)} training rows are fewer than one optimisation step ({self.per_step} samples); "
                "lower --batch-size or grad_accum."
            )
        self.steps_per_epoch = self.micro_per_epoch // config.grad_accum
        self.total_steps = config.max_steps or max(1, int(self.steps_per_epoch * config.epochs))
        check_validate_at(config.validate_at, self.total_steps)

    def _setup_model(self) -> None:
        from ..llm.backbone import load_backbone, prepare_for_training
        from ..llm.heads import scorer
        from ..llm.limits import check_rank
        from ..llm.model import ExpertConfig, ILoraModel, attach_lora
        from ..llm.prompt import PromptBuilder

        config = self.config
        t_load = time.perf_counter()
        base, tokenizer = load_backbone(self.spec)
        check_rank(base, config.rank)
        base = prepare_for_training(base, config.gradient_checkpointing)
        self.experts = ExpertConfig(
            experts=config.experts,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.lora_dropout,
            gate=config.gate,
            target_modules=_targets(config.target_modules),
            hybrid=config.prompt == "hybrid",
            user_token=config.user_token,
            head=config.head,
            projector_norm=config.projector_norm,
            query=config.query,
        )
        torch.manual_seed(config.seed)
        fusion = {} if config.fusion == "learned" else None  # the initial weights: the encoder's ranking
        lora = attach_lora(base, self.experts)
        self.model = ILoraModel(lora, tokenizer, self.encoder, self.experts, fusion=fusion, head_init=config.head_init)
        self.model.to(self.accelerator.device)
        self.scorer = scorer(config.head)
        self.builder = PromptBuilder(
            tokenizer,
            self.dataset.titles,
            self.dataset.domain,
            hybrid=self.experts.hybrid,
            templates=config.templates,
            user_token=config.user_token,
            list_candidates=self.scorer.lists_candidates,
        )
        self.head_fit = None
        if config.head == "item" and config.head_init == "fit":
            # on --resume too: a run stopped before its first checkpoint starts afresh, and one that resumes
            # from a checkpoint replaces W (and the random state) with the checkpoint's
            self.head_fit = self._fit_head()
        self.load_seconds = time.perf_counter() - t_load

    def _fit_head(self, rows: int = 256) -> dict[str, float]:
        """head_init=fit: W by least squares from the untrained model's final hidden states of the first training
        rows (epoch 0's order) onto the encoder's user representations (llm/heads.py)."""
        from ..llm.heads import fit_item_head

        order = self.samples.order(0)[:rows]
        samples = [self.samples.sample(r, 0) for r in order]
        device = self.accelerator.device
        prefixes = [
            build_batch(self.builder, samples[i : i + 32], "rank", self.dataset.pad_id, self.dataset.max_history)[0].to(
                device
            )
            for i in range(0, len(samples), 32)
        ]
        fit = fit_item_head(self.model, prefixes)
        if self.main:
            err.print(
                f"Fitted the item head to the encoder's user representations on {fit['rows']} training rows "
                f"(relative residual {fit['relative_residual']:.3f})."
            )
        return fit

    def _setup_optimizer(self) -> None:
        config = self.config
        groups = self.model.trainable_parameters()
        gate_lr = config.gate_lr if config.gate_lr is not None else 0.3 * config.lr
        head_lr = config.head_lr if config.head_lr is not None else config.projector_lr
        settings = {
            "lora": (config.lr, 0.0),
            "projector": (config.projector_lr, config.weight_decay),
            "gate": (gate_lr, config.weight_decay),
            "head": (head_lr, config.weight_decay),
            "fusion": (config.fusion_lr, 0.0),
        }
        if self.apart is not None:  # the fusion is fitted on the rows set apart after training, not by the optimizer
            del settings["fusion"]
            for p in groups["fusion"]:
                p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": groups[name], "lr": lr, "weight_decay": wd, "name": name}
                for name, (lr, wd) in settings.items()
                if groups[name]
            ]
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, config.warmup_ratio, config.min_lr_ratio)
        )

    def _resume(self) -> None:
        """Load the newest intact checkpoint (a damaged one is skipped, saying so); none at all: start afresh."""
        from .checkpoint import DamagedCheckpoint, list_checkpoints, load_checkpoint

        ckpts = list_checkpoints(self.run_dir / "checkpoints")
        if not ckpts:
            self.fresh_start = True
            if self.main:
                err.print(f"{self.run_dir} has no checkpoint yet (it stopped before the first): starting it afresh.")
            return
        damaged = []
        for path in reversed(ckpts):
            try:
                ck = load_checkpoint(path)
                break
            except DamagedCheckpoint as exc:
                damaged.append(f"{path.name}: {exc}")
        else:
            raise UserError(
                f"No checkpoint in {self.run_dir / 'checkpoints'} is intact ({'; '.join(damaged)}); "
                "start the run again with --overwrite."
            )
        if damaged and self.main:
            labelled("warning", f"skipped a damaged checkpoint ({damaged[0]}); resuming from {path.name}.")
        before = ck["state"].get("data")
        if not isinstance(before, dict):  # a checkpoint of an older version: the run's copy of its encoder
            copy = self.run_dir / "encoder" / "encoder.safetensors"
            before = {"encoder_sha256": encoder_sha256(copy.parent)} if copy.is_file() else {}
        check_resume_data(self.run_dir, before, self.data_identity)
        self._apply_checkpoint(ck, path)

    def _apply_checkpoint(self, ck: dict[str, Any], path: Path) -> None:
        from .checkpoint import restore_rng

        params = dict(self.model.named_parameters())
        names = [n for n, p in params.items() if p.requires_grad]
        for n in names:
            saved = ck["trainable"].get(n)
            if saved is None or saved.shape != params[n].shape:
                found = "no such weight" if saved is None else f"shape {tuple(saved.shape)}"
                raise UserError(
                    f"The checkpoint {path} does not match this configuration: it has {found} for {n} "
                    f"(expected {tuple(params[n].shape)})."
                )
        with torch.no_grad():
            for n in names:
                params[n].copy_(ck["trainable"][n])
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["state"]["scheduler"])
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"The optimizer state in {path} does not match this configuration ({first}).") from None
        restore_rng(ck["rng"])
        self.step_count = int(ck["state"]["step"])
        self.losses = list(ck["state"].get("losses", []))
        self.scaler_state = ck["state"].get("scaler")
        self.resumed_from = str(path)

    def _init_run_dir(self) -> None:
        from ..home import clean_stale_temporaries

        config, run_dir = self.config, self.run_dir
        if self.main:
            clean_stale_temporaries(self.final_dir)  # what killed runs and overwrites left beside it
            if self.fresh_start:
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                (run_dir / "logs").mkdir(parents=True)
                shutil.copytree(self.enc_info["path"], run_dir / "encoder")
                titles = json.dumps({"titles": self.dataset.titles}, ensure_ascii=False)
                (run_dir / "items.json").write_text(titles + "\n")
            # the run's settings, without how this invocation treated the directory (resume, overwrite)
            settings = dataclasses.replace(config, resume=False, overwrite=False)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(settings), sort_keys=False))
        self.accelerator.wait_for_everyone()
        self.log_file = run_dir / "logs" / "train.jsonl"
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and getattr(self, "scaler_state", None):
            scaler.load_state_dict(self.scaler_state)
        if self.main and self.resumed_from:
            for log in (self.log_file, run_dir / "logs" / "validation.jsonl"):
                truncate_log(log, self.step_count)  # steps logged after the checkpoint are run again
            best = self.best()
            if best is not None and best["step"] > self.step_count:
                shutil.rmtree(validation.best_dir(self))  # it competes again when its step is run again

    def _announce(self) -> None:
        if not self.main:
            return
        config, samples, builder = self.config, self.samples, self.builder
        answer_tokens = (lambda s: len(builder.answer_ids(s.target))) if self.scorer.kind == "title" else (lambda s: 0)
        sample_tokens = [
            len(builder.prompt_ids(s.history, s.candidates, s.template)) + answer_tokens(s)
            for s in (samples.sample(r, 0) for r in samples.order(0)[:32])
        ]
        mean_tokens = float(np.mean(sample_tokens))
        n = self.total_steps * self.per_step
        extras = [
            f"{config.head} head",
            f"{config.templates} templates" + (" with the user token" if config.user_token else ""),
        ]
        if config.distill_weight > 0:
            extras.append(f"distillation {config.distill_weight:g} at τ={config.distill_temperature:g}")
        if config.head == "item":
            extras.append(f"{config.query} query, softmax over the {config.loss_over}")
        if config.negative_sampling != "uniform":
            extras.append(f"{config.negative_sampling}-drawn negatives")
        if config.fusion == "learned":
            where = f"fitted on {len(self.apart)} rows set apart" if self.apart is not None else "fitted on every batch"
            extras.append(f"fusion with the encoder {where}")
        if samples.n_hard:
            extras.append(f"{samples.n_hard} hard negatives per prompt")
        err.print(
            f"Run {self.run_dir.name}: {len(samples):,} training rows, {self.total_steps:,} steps of "
            f"{self.per_step} samples ({n:,} samples, ≈{n * mean_tokens:,.0f} prompt tokens, {mean_tokens:.0f} per "
            f"prompt), objective {config.objective}, prompt {config.prompt} ({', '.join(extras)}), "
            f"K={config.experts} gate={config.gate}, {self.accelerator.num_processes} process(es) on "
            f"{self.accelerator.device}."
        )
        if self.resumed_from:
            err.print(f"Resuming from {self.resumed_from} at step {self.step_count}.")

    # -- one optimisation step -----------------------------------------------------------------------
    def micro_batch(self, micro: int, step: int | None = None):
        """The samples of micro-step ``micro`` of ``step`` (default: the current step) for this process
        (deterministic: they depend on the seed, the epoch and the row only)."""
        config, world = self.config, self.accelerator.num_processes
        global_micro = (self.step_count if step is None else step) * config.grad_accum + micro
        epoch, pos = divmod(global_micro, self.micro_per_epoch)
        order = self.samples.order(epoch)
        start = (pos * world + self.accelerator.process_index) * config.batch_size
        return [self.samples.sample(r, epoch) for r in order[start : start + config.batch_size]]

    def step_batches(self, step: int) -> list[tuple[Any, torch.Tensor | None]]:
        """The (PromptBatch, targets) of every micro-step of ``step``, built on the host (in page-locked memory
        when training on a GPU, so that the copy to it runs asynchronously)."""
        config, pin = self.config, self.accelerator.device.type == "cuda"
        out = []
        for micro in range(config.grad_accum):
            batch, target_index = build_batch(
                self.builder,
                self.micro_batch(micro, step),
                config.objective,
                self.dataset.pad_id,
                self.dataset.max_history,
            )
            out.append((batch.pin_memory(), target_index) if pin else (batch, target_index))
        return out

    def step(self) -> tuple[float, dict[str, float]]:
        """One optimisation step (``grad_accum`` micro-steps); returns its loss and terms, averaged.

        The step's batches were built on a background thread while the previous step ran (:class:`Prefetcher`),
        and the loss and its terms are read from the device once, at the end of the step.
        """
        config, accelerator, device = self.config, self.accelerator, self.accelerator.device
        if self.prefetcher is None:
            self.prefetcher = Prefetcher(self.step_batches)
        batches = self.prefetcher.get(self.step_count, ahead=self.step_count + 1 < self.total_steps)
        losses, step_terms = [], {}
        for batch, target_index in batches:
            with accelerator.accumulate(self.model):
                loss, terms, gates = batch_loss(
                    self.model,
                    self.unwrapped,
                    self.scorer,
                    self.builder,
                    batch.to(device, non_blocking=True),
                    target_index,
                    config,
                    self.log_q,
                )
                if self.gate_init is not None and gates is not None:
                    terms = {**terms, **gate_stats.batch_stats(gates)}
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    self._clip_gradients()
                self.optimizer.step()
                self.optimizer.zero_grad()
            losses.append(loss.detach().double())
            for k, v in terms.items():
                step_terms[k] = step_terms.get(k, 0.0) + v.double() / config.grad_accum
        self.scheduler.step()
        self.step_count += 1
        step_loss = accelerator.reduce((sum(losses) / config.grad_accum).float(), "mean")
        values = torch.stack([step_loss.double(), *step_terms.values()]).tolist()  # the step's one read
        return values[0], dict(zip(step_terms, values[1:]))

    def _clip_gradients(self) -> None:
        """Clip the model's gradient norm to max_grad_norm, the fusion weights' on their own: two numbers with
        gradients of order 1 would otherwise be scaled down with the millions of LoRA weights."""
        if self._clip_groups is None:
            fusion = self.unwrapped.trainable_parameters()["fusion"]
            ids = {id(p) for p in fusion}
            self._clip_groups = ([p for p in self.model.parameters() if p.requires_grad and id(p) not in ids], fusion)
        model_params, fusion = self._clip_groups
        self.accelerator.clip_grad_norm_(model_params, self.config.max_grad_norm)
        if fusion:
            torch.nn.utils.clip_grad_norm_(fusion, self.config.max_grad_norm)

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        config, main = self.config, self.main
        self._start_tracking()
        self.model.train()
        train_seconds, done_samples, estimate_printed = 0.0, 0, False
        with progress(disable=config.quiet or not main) as bar, _closing(self):
            task = bar.add_task("train", total=self.total_steps, completed=self.step_count, info="")
            while self.step_count < self.total_steps:
                if config.stop_after is not None and self.step_count >= config.stop_after:
                    break
                t0 = time.perf_counter()
                step_loss, terms = self.step()
                self._check_finite(step_loss)
                self.losses.append(step_loss)
                seconds = time.perf_counter() - t0
                train_seconds += seconds
                done_samples += self.per_step
                sps = done_samples / train_seconds
                lr_now = self.scheduler.get_last_lr()[0]
                step = self.step_count
                bar.update(
                    task,
                    completed=step,
                    info=f"epoch {step / self.steps_per_epoch:.4f}  loss {step_loss:.4f}  lr {lr_now:.2e}  "
                    f"{sps:.2f} samples/s",
                )
                if main and not estimate_printed and (done_samples >= 2 * self.per_step or step == self.total_steps):
                    per = train_seconds / (done_samples / self.per_step)
                    err.print(
                        f"≈{per:.1f} s/step: about {(self.total_steps - step) * per / 60:.1f} min left for this run "
                        f"(a full epoch of the {self.holdout['rows']:,} rows it may train on would take "
                        f"≈{hours_or_minutes(self.holdout['rows'] / sps)} at this speed)."
                    )
                    estimate_printed = True
                if main and (step % config.log_every == 0 or step == self.total_steps):
                    self._log(step, step_loss, terms, lr_now, sps, seconds)
                if validation.validates_at(self, step):
                    validation.keep_if_best(self, self.validate(step))
                stopping = config.stop_after is not None and step >= config.stop_after
                if step % config.checkpoint_every == 0 or step == self.total_steps or stopping:
                    self.save_checkpoint()
        self.accelerator.wait_for_everyone()
        if config.keep_best and self.step_count >= self.total_steps:
            validation.load_best(self)
        if self.step_count >= self.total_steps:
            self.fusion_fit = validation.fit_apart_fusion(self)
            if self.fusion_fit is not None and self.main:
                err.print(fusion_note(self.fusion_fit))
            self.check = validation.catalogue_check(self)
            if self.check is not None and self.check["below"]:
                labelled("note", below_note(self.check))
        summary = self.save(train_seconds, done_samples)
        self.accelerator.end_training()
        return summary

    def _check_finite(self, loss: float) -> None:
        """Stop at a NaN or infinite loss: the weights are ruined, the last checkpoint is not."""
        if math.isfinite(loss):
            return
        from .checkpoint import list_checkpoints

        kept = list_checkpoints(self.run_dir / "checkpoints")
        where = f"the last good checkpoint, {kept[-1]}, is kept" if kept else "no checkpoint had been written yet"
        if not kept and self.fresh_start and self.main:
            shutil.rmtree(self.run_dir, ignore_errors=True)  # nothing to resume: leave nothing for a re-run to trip on
            where += ", and nothing was left behind"
        raise UserError(
            f"The training loss became {loss} at step {self.step_count}, so training stopped ({where}); "
            "lower lr or alpha, or check the other settings."
        )

    def _start_tracking(self) -> None:
        """Open the tracker (TensorBoard's files go to logs/tensorboard/) with the run's settings."""
        config = self.config
        if config.report_to == "none":
            return
        settings = {k: v for k, v in to_dict(config).items() if isinstance(v, (bool, int, float, str))}
        kwargs = {"wandb": {"name": self.run_dir.name, "dir": str(self.run_dir / "logs")}}
        project = "tensorboard" if config.report_to == "tensorboard" else "ilora"
        self.accelerator.init_trackers(project, config=settings, init_kwargs=kwargs)

    def _gate_params(self) -> list[torch.nn.Parameter]:
        model = self.unwrapped if hasattr(self, "unwrapped") else self.model
        return model.trainable_parameters()["gate"]

    def _log(self, step, loss, terms, lr, sps, seconds) -> None:
        gate = gate_stats.log_fields(terms, self._gate_params(), self.gate_init)  # taken out of terms
        record = {
            "step": step,
            "epoch": round(step / self.steps_per_epoch, 4),
            "loss": loss,
            **{(f"train_{k}" if k in ("hr@1", "mrr") else f"loss_{k}"): v for k, v in terms.items()},
            "lr": lr,
            "samples_per_second": sps,
            "seconds": round(seconds, 4),
            **gate,
        }
        if self.unwrapped.fusion is not None and self.apart is None:  # trained on the batches
            record["fusion"] = self.unwrapped.fusion.weights()
        append_json_line(self.log_file, record, _RESUME_HINT)
        skip = ("step", "fusion", "seconds", "gate_load", "gate_drift")
        scalars = {f"train/{k}": v for k, v in record.items() if k not in skip}
        scalars.update({f"train/fusion_{k}": v for k, v in record.get("fusion", {}).items()})
        scalars.update({f"train/gate_load_{k}": v for k, v in enumerate(record.get("gate_load", []))})
        if record.get("gate_drift") is not None:
            scalars["train/gate_drift"] = record["gate_drift"]
        self.accelerator.log(scalars, step=step)

    # -- save ----------------------------------------------------------------------------------------
    def validate(self, step: int) -> dict[str, Any] | None:
        """Score the val rows with the model as it is now (validation.py); None on the other processes."""
        return validation.validate(self, step)

    def best(self) -> dict[str, Any] | None:
        """The kept best checkpoint's state (step, metric, ranking) and path, or None (validation.py)."""
        return validation.best(self)

    def save_checkpoint(self) -> None:
        from .checkpoint import save_checkpoint

        self.accelerator.wait_for_everyone()
        if self.main:
            trainable = {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}
            state = {"step": self.step_count, "total_steps": self.total_steps, "losses": self.losses}
            state["data"] = self.data_identity  # what --resume must train on again (identity.py)
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:  # fp16: the gradient scaler's scale, for an exact resume
                state["scaler"] = {k: float(v) if torch.is_tensor(v) else v for k, v in scaler.state_dict().items()}
            save_checkpoint(self.run_dir / "checkpoints", trainable, self.optimizer, self.scheduler, state)

    def save(self, train_seconds: float, done_samples: int) -> dict[str, Any]:
        """Write the finished run (main process) and return the summary; every process writes its digest."""
        from .run import write_final

        finished = self.step_count >= self.total_steps
        # Every process records a digest of its trainable weights: under DDP they must all agree.
        digest = weights_digest(self.unwrapped)
        rank_ = self.accelerator.process_index
        (self.run_dir / "logs" / f"weights-rank{rank_}.sha256").write_text(digest + "\n")
        summary = {
            "run_dir": str(self.final_dir),
            "steps": self.step_count,
            "total_steps": self.total_steps,
            "complete": finished,
            "final_loss": self.losses[-1] if self.losses else None,
            "train_samples_per_second": done_samples / train_seconds if train_seconds else None,
            "train_seconds": round(train_seconds, 3),
            "load_seconds": round(self.load_seconds, 3),
            "samples_seen": self.step_count * self.per_step,
            "processes": self.accelerator.num_processes,
            "resumed_from": self.resumed_from,
            "weights_sha256": digest,
        }
        if self.unwrapped.fusion is not None:
            summary["fusion"] = self.unwrapped.fusion.weights()
        if self.kept is not None:
            summary["kept"] = self.kept  # --keep-best: which step's weights the run directory holds
        if self.main and finished:
            # The adapter names its backbone as the user gave it (the built-in one by its name), not a cache path.
            for peft_config in self.unwrapped.llm.peft_config.values():
                peft_config.base_model_name_or_path = self.spec.describe()["name"]
            write_final(self.run_dir, self.unwrapped, self.run_info(summary))
            from ..card import write_card

            validation.pictures(self)  # before an overwrite moves the run into place
            write_card(self.run_dir)
        self.accelerator.wait_for_everyone()
        if self.main and finished:
            if self.run_dir != self.final_dir:
                from .run import replace_run

                replace_run(self.run_dir, self.final_dir)  # the finished run replaces the old one only now
            err.print(f"Saved the run to {self.final_dir}.")
        elif self.main:
            err.print(f"Stopped after step {self.step_count} of {self.total_steps}; continue with --resume.")
        return summary

    def _fusion_fit_record(self) -> dict[str, Any]:
        """How the fusion weights were fitted: on the rows set apart (and what the rankings did there), or on every
        training batch, or not at all."""
        if self.unwrapped.fusion is None:
            return {"on": "none"}
        if self.fusion_fit is None:
            return {"on": "training batches", "note": "fitted on the rows the language model trained on"}
        return {"on": "apart"} | {k: v for k, v in self.fusion_fit.items() if k != "weights"}

    def run_info(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The ``ilora.json`` document: everything ``eval`` and ``recommend`` need to rebuild the run."""
        from .run import file_sha256

        config, experts, dataset, enc_info = self.config, self.experts, self.dataset, self.enc_info
        fusion = self.unwrapped.fusion
        return {
            "tool_version": __version__,
            "backbone": self.spec.describe(),
            "experts": {
                "experts": experts.experts,
                "rank": experts.rank,
                "alpha": experts.alpha,
                "dropout": experts.dropout,
                "gate": experts.gate,
                "target_modules": experts.target_modules,
                "hybrid": experts.hybrid,
                "user_token": experts.user_token,
                "head": experts.head,
                "projector_norm": experts.projector_norm,
                "query": experts.query,
            },
            "head": {"kind": experts.head, "init": config.head_init if experts.head == "item" else None}
            | ({"fit": self.head_fit} if self.head_fit else {}),
            "prompt": config.prompt,
            "objective": config.objective,
            "normalize": config.normalize,
            "templates": config.templates,
            "fusion": fusion.weights() if fusion is not None else None,
            "fusion_fit": self._fusion_fit_record(),
            "catalogue_check": self.check,
            "objective_settings": {
                "loss_over": config.loss_over,
                "query": config.query if experts.head == "item" else None,
                "negative_sampling": config.negative_sampling,
                "candidates": config.candidates,
                "hard_negatives": config.hard_negatives,
            },
            "holdout": dict(
                self.holdout,
                train_rows=len(self.samples),
                apart_rows=len(self.apart) if self.apart is not None else 0,
                apart_users=self.apart_users,
            ),
            "encoder": {
                "type": enc_info["type"],
                "name": Path(enc_info["path"]).name,
                "sha256": file_sha256(self.run_dir / "encoder" / "encoder.safetensors"),
            },
            "dataset": {
                "name": dataset.name,
                "checksum": dataset.checksum,
                "n_items": dataset.n_items,
                "domain": dataset.domain,
                "max_history": dataset.max_history,
                "pad_id": dataset.pad_id,
            },
            "training": {
                k: summary[k] for k in ("steps", "final_loss", "samples_seen", "processes", "kept") if k in summary
            },
        }


@contextmanager
def _closing(trainer: Trainer):
    """Stop the trainer's batch prefetching when its loop ends, however it ends."""
    try:
        yield
    finally:
        if trainer.prefetcher is not None:
            trainer.prefetcher.close()
            trainer.prefetcher = None


def _targets(spec: str):
    return spec if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]


def _tracker(report_to: str) -> str | None:
    """accelerate's ``log_with`` for ``report_to``; a tracker that is not installed is refused in one sentence."""
    if report_to == "none":
        return None
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = is_tensorboard_available() if report_to == "tensorboard" else is_wandb_available()
    if not available:
        extra = "tensorboard" if report_to == "tensorboard" else "wandb"
        raise UserError(f"--report-to {report_to} needs {extra}: pip install 'ilora[{extra}]'.")
    return report_to
