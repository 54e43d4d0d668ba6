"""``ilora encode``: train a collaborative encoder on a prepared dataset, then save it for the LLM stage.

Adam on the train split, early stopping on a validation metric (best weights restored), seeded and
deterministic on CPU: the model is initialised after ``torch.manual_seed`` and batches are shuffled by
their own seeded generator.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import console
from ..config import check_minimums, check_range, check_seed, to_dict
from ..data.holdout import Holdout, partition
from ..data.prepared import PreparedDataset, SplitData
from ..errors import UserError
from ..home import atomic_directory, check_name, check_replaceable, encoder_dir
from . import ENCODERS
from .base import SequentialEncoder
from .evaluate import evaluate_encoder, training_rows_metrics
from .io import build_encoder, save_encoder

LOSSES = ("ce", "bce")
MAX_HIDDEN = 8192  # widest encoder accepted: an item table of that width already dwarfs every catalogue's need
MONITORS = (
    "hr@1",
    "hr@3",
    "hr@5",
    "hr@10",
    "ndcg@3",
    "ndcg@5",
    "ndcg@10",
    "mrr",
    "full_hr@10",
    "full_hr@20",
    "full_hr@50",
    "full_ndcg@10",
    "full_ndcg@20",
    "full_mrr",
)


@dataclass
class EncodeConfig:
    dataset: str = "synthetic"  # prepared dataset name (under $ILORA_HOME/datasets) or its path
    model: str = "sasrec"  # sasrec, gru4rec or caser
    name: str | None = None  # stored as $ILORA_HOME/encoders/<name>; None -> <dataset>-<model>
    output: Path | None = None  # write here instead of $ILORA_HOME/encoders/<name>
    overwrite: bool = False  # replace an existing encoder
    hidden_size: int = 64  # item embedding and user representation width
    num_blocks: int = 1  # SASRec attention blocks / GRU4Rec GRU layers (unused by Caser)
    num_heads: int = 1  # SASRec attention heads (must divide hidden_size)
    dropout: float = 0.3  # training only (frozen encoders run in eval mode); beats 0.1 on LastFM val
    max_len: int | None = None  # most recent history items read; None -> the dataset's max_history
    caser_h: int = 16  # Caser: horizontal filters per height
    caser_v: int = 4  # Caser: vertical filters
    loss: str = "ce"  # ce: softmax cross-entropy over the whole catalogue; bce: sampled negatives
    negatives: int = 1  # bce: uniform negatives per training row
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-4  # Adam L2 penalty
    batch_size: int = 256  # training rows per step
    epochs: int = 100  # at most this many passes over the train split
    patience: int = 10  # stop after this many epochs without a better monitor value (0: never stop early)
    monitor: str = "mrr"  # validation metric for early stopping (its mean over the candidate draws)
    holdout: str | None = None  # train rows left out for the second stage: users:F, last:N or none (default: the
    # dataset's, see data/holdout.py); none fits every row, which a second stage then learns on as well
    seed: int = 42  # initialisation, shuffling, dropout and negative sampling
    threads: int | None = None  # CPU threads for torch; None -> torch's default
    device: str = "cpu"  # cpu, cuda or cuda:N (deterministic on cpu)
    quiet: bool = False  # no progress bar

    def validate(self) -> None:
        if self.model not in ENCODERS:
            raise UserError(f"Unknown encoder {self.model!r}; choose one of: {', '.join(ENCODERS)}.")
        if self.loss not in LOSSES:
            raise UserError(f"Unknown loss {self.loss!r}; choose ce (full softmax) or bce (sampled negatives).")
        if self.monitor not in MONITORS:
            raise UserError(f"Unknown monitor {self.monitor!r}; choose one of: {', '.join(MONITORS)}.")
        if self.name is not None:
            check_name(self.name, "encoder name")
        check_minimums(
            self,
            {
                "hidden_size": 1,
                "num_blocks": 1,
                "num_heads": 1,
                "caser_h": 1,
                "caser_v": 1,
                "negatives": 1,
                "batch_size": 1,
                "epochs": 1,
                "patience": 0,
                "max_len": 1,
                "threads": 1,
                "seed": 0,
            },
        )
        check_range(self, "hidden_size", high=MAX_HIDDEN)
        check_seed(self)
        if self.model == "sasrec" and self.hidden_size % self.num_heads:
            raise UserError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}).")
        check_range(self, "dropout", low=0, high=1, high_open=True)
        check_range(self, "lr", low=0, low_open=True)
        check_range(self, "weight_decay", low=0)
        if self.holdout is not None:
            self.holdout = Holdout.parse(self.holdout).spec
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise UserError(f"device must be cpu, cuda or cuda:N; got {self.device!r}.")

    def model_config(self, max_len: int) -> dict[str, Any]:
        """The fields of the chosen encoder's own config dataclass."""
        common = {"hidden_size": self.hidden_size, "dropout": self.dropout, "max_len": max_len}
        if self.model == "sasrec":
            return {**common, "num_blocks": self.num_blocks, "num_heads": self.num_heads}
        if self.model == "gru4rec":
            return {**common, "num_layers": self.num_blocks}
        return {**common, "n_h": self.caser_h, "n_v": self.caser_v}


# Bytes of memory training needs per parameter: the weights, their gradients, Adam's two moments and its
# temporaries, and the best weights kept for early stopping (two copies while a better epoch replaces them).
BYTES_PER_PARAMETER = 4 * 8
ACTIVATIONS_PER_BLOCK = 16  # (batch, length, hidden) float tensors kept for the backward pass per block


def training_memory(config: EncodeConfig, n_items: int, max_len: int) -> int:
    """An estimate, in bytes, of what training the encoder of ``config`` takes: its parameters (counted on a model
    built without memory) and the activations of one batch, with the catalogue-wide scores and their gradient."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = build_encoder(config.model, n_items, config.model_config(max_len))
    parameters = sum(p.numel() for p in model.parameters())
    rows = config.batch_size * max_len * config.hidden_size  # (B, L, d)
    activations = rows * (ACTIVATIONS_PER_BLOCK * config.num_blocks + 4) + 3 * config.batch_size * (n_items + 1)
    return parameters * BYTES_PER_PARAMETER + activations * 4


def check_training_memory(config: EncodeConfig, n_items: int, max_len: int, available: int | None = None) -> None:
    """Refuse, before anything is allocated, an encoder whose training would need more memory than there is (the
    machine's available memory on cpu, the GPU's free memory on cuda): `hidden_size=8192` allocated until it
    failed."""
    from ..data.checks import available_memory

    if available is None:
        if config.device.startswith("cuda") and torch.cuda.is_available():
            available = torch.cuda.mem_get_info(torch.device(config.device))[0]
        else:
            available = available_memory()
    need = training_memory(config, n_items, max_len)
    if available is not None and need > available:
        raise UserError(
            f"Training a {config.model} encoder of hidden_size={config.hidden_size} with {config.num_blocks} "
            f"block(s) on {n_items} items would take about {need / 2**30:.1f} GiB of memory, more than the "
            f"{available / 2**30:.1f} GiB available on {config.device}; lower hidden_size, num_blocks or batch_size."
        )


def training_loss(
    model: SequentialEncoder,
    seq: torch.Tensor,
    len_seq: torch.Tensor,
    target: torch.Tensor,
    loss: str,
    negatives: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean loss of one batch: catalogue-wide softmax cross-entropy, or BCE against uniform negatives."""
    if loss == "ce":
        return F.cross_entropy(model.score_all(seq, len_seq), target)  # (B, n_items) vs (B,)
    user = model(seq, len_seq)  # (B, d)
    items = model.item_embeddings()  # (N, d)
    # Uniform over the other N - 1 items: draw from N - 1 ids and skip over the target.
    neg = torch.randint(0, model.n_items - 1, (len(target), negatives), generator=generator).to(target.device)
    neg = neg + (neg >= target[:, None]).long()  # (B, k)
    pos_logit = (user * items[target]).sum(-1)  # (B,)
    neg_logit = torch.einsum("bd,bkd->bk", user, items[neg])  # (B, k)
    return F.binary_cross_entropy_with_logits(
        pos_logit, torch.ones_like(pos_logit)
    ) + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))


def _tensors(split: SplitData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.as_tensor(split.seq, device=device),
        torch.as_tensor(split.len_seq, device=device),
        torch.as_tensor(split.next, device=device),
    )


def encode(config: EncodeConfig) -> dict[str, Any]:
    """Train, early-stop on validation, save ``encoder.safetensors`` + ``encoder.json``; returns a summary."""
    config.validate()
    dataset = PreparedDataset.open(config.dataset)
    name = config.name or f"{dataset.name}-{config.model}"
    check_name(name, "encoder name")
    out_dir = Path(config.output) if config.output else encoder_dir(name)
    if out_dir.exists() and not config.overwrite:
        raise UserError(f"The output {out_dir} already exists; pass --overwrite to replace it.")
    check_replaceable(out_dir, "encoder")  # before training, not after
    if config.device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"device {config.device!r} was requested but no CUDA device is available.")
    device = torch.device(config.device)

    full_train = dataset.split("train")
    rows = partition(dataset, config.holdout)
    train = full_train.select(rows.encoder_rows)
    val = dataset.split("val") if "val" in dataset.splits else None
    test = dataset.split("test") if "test" in dataset.splits else None
    if len(train) == 0:
        raise UserError(f"The dataset {dataset.name!r} has no training rows.")
    if val is not None and len(val) == 0:
        val = None
    if val is not None and val.candidates is None and not config.monitor.startswith("full_"):
        raise UserError(
            f"The validation split of {dataset.name!r} has no stored candidates, so it cannot report "
            f"{config.monitor}; pick monitor=full_hr@10 or full_ndcg@10."
        )
    max_len = config.max_len or dataset.max_history
    check_training_memory(config, dataset.n_items, max_len)

    old_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        model = build_encoder(config.model, dataset.n_items, config.model_config(max_len)).to(device)
        history, best_state, best_epoch, best_value, train_seconds = _fit(model, config, train, val, device)
    finally:
        torch.set_num_threads(old_threads)
    model.load_state_dict(best_state)
    model.eval()

    results: dict[str, Any] = {}
    if val is not None:
        results["val"] = evaluate_encoder(model, val, dataset.n_items)
    if test is not None:
        results["test"] = evaluate_encoder(model, test, dataset.n_items)
    results.update(_training_rows_results(model, dataset, full_train, rows, config.seed))
    epochs_run = len(history)
    summary = {
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "monitor": f"val {config.monitor}" if val is not None else None,
        "best_value": best_value,
        "seconds_per_epoch": train_seconds / epochs_run,
        "seconds_total": train_seconds,
        "train_rows": len(train),
        "holdout": rows.describe(),
        "history": history,
        "metrics": results,
    }
    info = {
        "dataset": {"name": dataset.name, "checksum": dataset.checksum, "path": str(dataset.path)},
        "holdout": rows.describe(),
        "best_epoch": best_epoch,
        "training": {"config": to_dict(config), **summary},
    }
    with atomic_directory(out_dir, overwrite=config.overwrite, kind="encoder") as tmp:
        save_encoder(model, info, tmp)
    return {
        "encoder_dir": str(out_dir),
        "name": name,
        "model": config.model,
        "dataset": dataset.name,
        **summary,
    }


def _training_rows_results(model, dataset: PreparedDataset, train: SplitData, rows, seed: int) -> dict[str, Any]:
    """The encoder on the rows it fitted (``fitted``) and on the rows left to the second stage (``second_stage``,
    with a holdout): sampled metrics on one seeded draw of the dataset's candidate count, at most 2,000 rows."""
    n_candidates = int(dataset.meta.get("n_candidates", 20))
    if dataset.n_items - dataset.max_history - 1 < n_candidates - 1:
        return {}
    out = {"fitted": training_rows_metrics(model, train, rows.encoder_rows, dataset.n_items, n_candidates, seed)}
    if rows.holdout.active:
        out["second_stage"] = training_rows_metrics(
            model, train, rows.second_stage_rows, dataset.n_items, n_candidates, seed
        )
    return out


def _fit(
    model: SequentialEncoder,
    config: EncodeConfig,
    train: SplitData,
    val: SplitData | None,
    device: torch.device,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], int, float | None, float]:
    """The training loop. Returns per-epoch history, the best weights, best epoch and value, train seconds."""
    seq, len_seq, target = _tensors(train, device)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = len(train)
    steps = (n + config.batch_size - 1) // config.batch_size
    history: list[dict[str, Any]] = []
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, best_value, stale, train_seconds = 0, None, 0, 0.0
    val_info = ""  # the last validation, kept on every progress line until the next one
    with console.progress(disable=config.quiet) as bar:
        task = bar.add_task(f"encode {config.model}", total=config.epochs * steps, info="")
        for epoch in range(1, config.epochs + 1):
            model.train()
            started = time.perf_counter()
            order = torch.randperm(n, generator=generator).to(device)  # (n,)
            total = torch.zeros((), device=device)
            for step in range(steps):
                idx = order[step * config.batch_size : (step + 1) * config.batch_size]  # (b,)
                loss = training_loss(
                    model, seq[idx], len_seq[idx], target[idx], config.loss, config.negatives, generator
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(idx)
                if step % 20 == 19 or step == steps - 1:
                    done = (epoch - 1) * steps + step + 1
                    bar.update(task, completed=done, info=f"epoch {epoch} loss {loss.item():.4f}{val_info}")
            train_seconds += time.perf_counter() - started
            record: dict[str, Any] = {"epoch": epoch, "loss": float(total) / n}
            if not math.isfinite(record["loss"]):
                raise UserError(f"Training diverged at epoch {epoch} (the loss is {record['loss']}); lower lr.")
            if val is None:
                best_state, best_epoch = copy.deepcopy(model.state_dict()), epoch
                history.append(record)
                continue
            result = evaluate_encoder(model, val, model.n_items)
            value = float(result[config.monitor]["mean"])
            record["val"] = {k: round(v["mean"], 6) for k, v in result.items() if isinstance(v, dict)}
            history.append(record)
            if best_value is None or value > best_value:
                best_state, best_epoch, best_value, stale = copy.deepcopy(model.state_dict()), epoch, value, 0
            else:
                stale += 1
            val_info = f"  val {config.monitor} {value:.4f} (best {best_value:.4f} @ epoch {best_epoch})"
            bar.update(task, info=f"epoch {epoch} loss {record['loss']:.4f}{val_info}")
            if config.patience and stale >= config.patience:
                break
        bar.update(task, total=epoch * steps, completed=epoch * steps)
    return history, best_state, best_epoch, best_value, train_seconds
