"""``ilora ablate``: train and evaluate every cell of a grid in one ablation directory, resumably.

Layout of an ablation directory::

    ablation.json            what was asked: dataset, evaluation, axes, shared training settings
    runs/<run>/              one ``ilora train`` run directory per distinct training setting
    cells/<cell>.json        a finished cell: settings, metrics (mean ± std over draws), per-user reciprocal ranks
    logs/<run>.jsonl         one line per training attempt (wall seconds, steps, resumed or not)
    data/, encoders/         datasets with fewer training users, and the encoders trained on them
    results.json, results.csv, plots/

A cell is finished when ``cells/<cell>.json`` exists for the current weights of its run. Running the same
command again skips finished cells, resumes an interrupted run from its newest checkpoint, and evaluates
runs that finished training but not evaluation.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.text import Text

from .. import __version__
from ..config import resolve, to_dict
from ..console import err
from ..data.prepared import PreparedDataset, SplitData
from ..errors import UserError
from ..home import append_json_line, check_replaceable
from ..plots import read_jsonl
from ..training.identity import differences, identity
from .config import AblateConfig
from .grid import Cell, axes_of, expand, reference_cell
from .layout import cell_file, run_dir, write_json

# Cells checkpoint more often than a single run by default: an interrupted grid loses at most this many steps.
CHECKPOINT_EVERY = 10

# Reference costs on a 2-core CPU with the default backbone (docs/BENCHMARKS.md), for --dry-run estimates
# before any cell of the ablation has been measured.
REFERENCE_SECONDS_PER_SAMPLE = {"rank": 15.3 / 8, "generate": 12.6 / 8}  # the title head
REFERENCE_ITEM_SECONDS_PER_SAMPLE = 0.15  # the item head (LastFM, 2,568 samples in 5.8-8.7 min on one thread)
REFERENCE_TEXT_FACTOR = 0.87  # text-only prompts are about 13% cheaper per step
REFERENCE_EVAL_SECONDS = 8.43 / 16  # one user, one draw of 20 candidates, score mode
REFERENCE_ITEM_EVAL_SECONDS = 0.05  # one user, every draw: the item head scores them all from one forward
REFERENCE_ENCODER_SECONDS_PER_ROW_EPOCH = 4.19 / 47_872


@dataclass
class Plan:
    """The cells of an ablation and what each still needs."""

    config: AblateConfig
    directory: Path
    dataset: PreparedDataset
    eval_dataset: PreparedDataset | None
    cells: list[Cell]
    reference: Cell
    second_stage_rows: dict[str, int] = field(default_factory=dict)  # holdout spec -> rows (dry-run estimates)


def plan(config: AblateConfig) -> Plan:
    cells = expand(config)
    dataset = PreparedDataset.open(config.dataset)
    eval_dataset = PreparedDataset.open(config.eval_dataset) if config.eval_dataset else None
    check_candidates(config.candidates, dataset, eval_dataset)
    check_fractions(config.train_fraction, dataset)
    return Plan(
        config=config,
        directory=config.directory(),
        dataset=dataset,
        eval_dataset=eval_dataset,
        cells=cells,
        reference=reference_cell(cells, config.reference),
    )


def check_fractions(fractions: list[float] | None, dataset: PreparedDataset) -> None:
    """Refuse, when the grid is planned, a train fraction that keeps no training user of the dataset."""
    if not fractions or all(f >= 1 for f in fractions):
        return
    import numpy as np

    from ..data.holdout import train_users
    from ..data.variants import users_kept

    n_users = len(np.unique(train_users(dataset)[0]))
    for fraction in fractions:
        users_kept(fraction, n_users, dataset.name)


def check_candidates(counts: list[int] | None, dataset: PreparedDataset, eval_dataset: PreparedDataset | None) -> None:
    """Refuse a candidate count the catalogue cannot fill before any cell trains (the draws are made only when a
    cell is evaluated): beside a history of up to ``max_history`` items, at most ``n_items - max_history`` fit."""
    rows_from = eval_dataset or dataset
    most = min(dataset.n_items, rows_from.n_items) - rows_from.max_history
    too_many = [n for n in counts or [] if n > most]
    if too_many:
        raise UserError(
            f"--candidates {too_many[0]} is more than the catalogue can fill: {rows_from.n_items} items leave at most "
            f"{most} candidates beside a history of up to {rows_from.max_history}; ask for at most {most}."
        )


def run_ablation(config: AblateConfig) -> dict[str, Any]:
    """Run (or resume) the ablation; returns the ``results.json`` document (or the plan with ``dry_run``)."""
    from .report import write_results

    p = plan(config)
    if config.dry_run:
        return dry_run(p)
    if config.overwrite and p.directory.exists():
        check_replaceable(p.directory, "ablation")
        shutil.rmtree(p.directory)
    _claim_directory(p)
    t0 = time.perf_counter()
    status: dict[str, str] = {}
    for key, group in _by_run(p.cells).items():
        pending = [c for c in group if not _finished(p, c)]
        for c in group:
            status[c.name] = "finished before"
        if not pending:
            continue
        cells = ", ".join(c.name for c in pending)
        err.print(Text.assemble((f"Ablation {p.directory.name}", "bold"), f": run {key} ({cells})"))
        if not _train(p, group[0]):
            for c in group:
                status[c.name] = "stopped"
            continue
        _evaluate(p, key, pending)
        for c in pending:
            status[c.name] = "done"
        _release_memory()
    docs = {c.name: read_cell(p, c) for c in p.cells}
    return write_results(p, status, time.perf_counter() - t0, docs, loss_curves(p))


def _release_memory() -> None:
    """Free the last run's model before the next cell loads its own."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the ablation directory ----------------------------------------------------------------------------
def _claim_directory(p: Plan) -> None:
    """Create the directory, or check that the existing one holds this ablation (same data and evaluation)."""
    doc = {
        "tool_version": __version__,
        "dataset": {"name": p.dataset.name, "checksum": p.dataset.checksum, "path": str(p.dataset.path)},
        "eval_dataset": _dataset_doc(p.eval_dataset),
        "split": p.config.split,
        "axes": axes_of(p.config),
        "train": p.config.train,
        "reference": p.reference.name,
    }
    manifest = p.directory / "ablation.json"
    if manifest.is_file():
        old = json_doc(manifest)
        if old is None:
            raise UserError(
                f"The ablation directory {p.directory} is damaged (ablation.json cannot be read), so it cannot be "
                "checked to hold this ablation; pass --overwrite or choose another --name or --output."
            )
        for key in ("dataset", "eval_dataset"):
            if (old.get(key) or {}).get("checksum") != (doc.get(key) or {}).get("checksum"):
                raise UserError(
                    f"The ablation directory {p.directory} was made for another {key.replace('_', ' ')}; "
                    "pass --overwrite or choose another --name or --output."
                )
    for sub in ("runs", "cells", "logs"):
        (p.directory / sub).mkdir(parents=True, exist_ok=True)
    write_json(manifest, doc)


def _dataset_doc(ds: PreparedDataset | None) -> dict[str, Any] | None:
    return None if ds is None else {"name": ds.name, "checksum": ds.checksum, "path": str(ds.path)}


def json_doc(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, truncated, not JSON or not an object: what an
    ablation writes (cells, attempt logs) is read back only where it is whole."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _by_run(cells: list[Cell]) -> dict[str, list[Cell]]:
    out: dict[str, list[Cell]] = {}
    for c in cells:
        out.setdefault(c.train_key, []).append(c)
    return out


# -- data and encoders ------------------------------------------------------------------------------------
def train_dataset(p: Plan, cell: Cell) -> PreparedDataset:
    """The dataset a cell trains on: the ablation's, or a copy with a fraction of its training users."""
    from ..data.variants import user_subset

    if cell.train_fraction >= 1:
        return p.dataset
    out = p.directory / "data" / f"{p.dataset.name}-users{cell.train_fraction:g}"
    return user_subset(p.dataset, cell.train_fraction, p.config.seed, out)


def encoder_path(p: Plan, dataset: PreparedDataset, kind: str) -> Path:
    """The encoder of ``kind`` for ``dataset``: the shared one in $ILORA_HOME when it fits, else one in the
    ablation directory; trained first when missing."""
    from ..encoders.io import check_compatible, load_encoder
    from ..encoders.train import EncodeConfig, encode
    from ..home import dataset_dir, encoder_dir

    name = f"{dataset.name}-{kind}"
    shared = encoder_dir(name)
    local = p.directory / "encoders" / name
    for candidate in (shared, local):
        if (candidate / "encoder.json").is_file():
            _, info = load_encoder(candidate)
            if info["type"] == kind:
                try:
                    check_compatible(info, dataset)
                    return candidate
                except UserError:
                    continue
    home_dataset = dataset.path.resolve() == dataset_dir(dataset.name).resolve()
    target = shared if home_dataset and not shared.exists() else local
    err.print(f"Training the {kind} encoder for {dataset.name!r} into {target} (ilora encode).")
    settings = dict(dataset=str(dataset.path), model=kind, output=target, seed=p.config.seed, quiet=p.config.quiet)
    if p.config.encode_epochs is not None:
        settings["epochs"] = p.config.encode_epochs
    encode(EncodeConfig(**settings, overwrite=target.exists()))
    return target


# -- training -------------------------------------------------------------------------------------------
def train_config(p: Plan, cell: Cell, dataset: PreparedDataset, encoder: Path):
    from ..training.config import TrainConfig

    settings = {**cell.train, "dataset": str(dataset.path), "encoder": str(encoder), "output": run_dir(p, cell)}
    settings.setdefault("quiet", p.config.quiet)
    settings.setdefault("checkpoint_every", CHECKPOINT_EVERY)
    return resolve(TrainConfig, None, settings)


def run_state(directory: Path, config) -> str:
    """``done``, ``resume`` or ``fresh`` for a run directory; refuses one trained with other settings."""
    from ..training.checkpoint import list_checkpoints
    from ..training.config import TrainConfig

    saved = directory / "config.yaml"
    has_checkpoint = bool(list_checkpoints(directory / "checkpoints"))
    if not saved.is_file() or not (has_checkpoint or (directory / "ilora.json").is_file()):
        return "fresh"
    old = resolve(TrainConfig, saved)
    diff = differences(to_dict(old), to_dict(config))
    if diff:
        raise UserError(
            f"The run {directory} was trained with other settings ({'; '.join(diff[:3])}); "
            "pass --overwrite or choose another --name or --output."
        )
    return "done" if (directory / "ilora.json").is_file() else "resume"


def _train(p: Plan, cell: Cell) -> bool:
    """Train (or resume) the run of ``cell``; True when it is complete."""
    from ..training.trainer import train

    dataset = train_dataset(p, cell)
    config = train_config(p, cell, dataset, encoder_path(p, dataset, cell.encoder))
    state = run_state(run_dir(p, cell), config)
    if state == "done":
        return True
    config.resume = state == "resume"
    config.overwrite = state == "fresh" and run_dir(p, cell).exists()
    if config.resume and "stop_after" not in p.config.train:
        config.stop_after = None
    t0 = time.perf_counter()
    summary = train(config)
    attempt = {
        "seconds": round(time.perf_counter() - t0, 3),
        "steps": summary["steps"],
        "total_steps": summary["total_steps"],
        "complete": summary["complete"],
        "resumed_from": summary["resumed_from"],
        "samples": (summary["steps"] - _resumed_step(summary)) * config.batch_size * config.grad_accum,
        "objective": config.objective,
        "prompt": config.prompt,
        "head": config.head,
    }
    append_json_line(
        p.directory / "logs" / f"{cell.train_key}.jsonl",
        attempt,
        "free some space and run the same command again: it resumes.",
    )
    return bool(summary["complete"])


def _resumed_step(summary: dict[str, Any]) -> int:
    resumed = summary.get("resumed_from")
    return int(Path(resumed).name.split("-")[1]) if resumed else 0


def train_minutes(p: Plan, cell: Cell) -> float:
    """Wall minutes of every training attempt of the cell's run (loading included)."""
    log = p.directory / "logs" / f"{cell.train_key}.jsonl"
    return sum(a["seconds"] for a in read_jsonl(log) if _number(a.get("seconds"))) / 60


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# -- evaluation -----------------------------------------------------------------------------------------
def eval_identity(p: Plan, cell: Cell) -> dict[str, Any]:
    """What decides a cell's evaluation rows and candidates."""
    ds = p.eval_dataset or p.dataset
    return {
        "dataset": ds.checksum,
        "catalogue": p.dataset.checksum,
        "split": p.config.split,
        "candidates": cell.candidates,
        "draws": p.config.eval_draws,
        "rows": p.config.eval_rows,
        "seed": p.config.seed if p.eval_dataset else None,
    }


def _weights_digest(directory: Path) -> str | None:
    f = directory / "logs" / "weights-rank0.sha256"
    return f.read_text().strip() if f.is_file() else None


def _finished(p: Plan, cell: Cell) -> bool:
    """Whether the cell's file is whole and was written for the current weights of its run and this evaluation;
    a damaged cell file counts as not finished: the cell is evaluated again."""
    doc = json_doc(cell_file(p, cell))
    if doc is None or cell_problem(doc) is not None:
        return False
    return (
        doc.get("eval_identity") == eval_identity(p, cell)
        and doc.get("train_identity") == identity(to_dict(_cell_train_config(p, cell)))
        and (run_dir(p, cell) / "ilora.json").is_file()
        and doc.get("weights_sha256") == _weights_digest(run_dir(p, cell))
    )


def cell_problem(doc: dict[str, Any]) -> str | None:
    """What a cell document lacks that the report reads, or None."""
    for key in ("metrics", "llm_metrics", "encoder_metrics"):
        mrr = doc.get(key, {}).get("mrr") if isinstance(doc.get(key), dict) else None
        if not (isinstance(mrr, dict) and _number(mrr.get("mean"))):
            return f"no {key}"
    for key in ("train_minutes", "eval_minutes"):
        if not _number(doc.get(key)):
            return f"no {key}"
    per_user = doc.get("per_user")
    if not isinstance(per_user, dict):
        return "no per-user results"
    catalogue = per_user.get("catalogue", {})  # per ranking, where the cell ranked the catalogue
    lists = [v for k, v in per_user.items() if k != "catalogue"] + list(
        catalogue.values() if isinstance(catalogue, dict) else [None]
    )
    if not all(isinstance(v, list) for v in lists):
        return "no per-user results"
    return None


def eval_split(p: Plan, cell: Cell) -> tuple[SplitData, dict[str, Any] | None]:
    """The rows and candidates a cell is evaluated on, and the cross-domain mapping report (or None)."""
    from ..data.variants import candidate_draws, translate_split

    config = p.config
    if p.eval_dataset is not None:
        n = cell.candidates or int(p.eval_dataset.meta["n_candidates"])
        draws = config.eval_draws or int(p.eval_dataset.meta["draws"])
        split, report = translate_split(p.eval_dataset, config.split, p.dataset, n, draws, config.seed)
    else:
        split, report = p.dataset.split(config.split), None
        if cell.candidates is not None:
            split.candidates = candidate_draws(p.dataset, config.split, cell.candidates)
    if split.candidates is None:
        raise UserError(f"The {config.split} split has no stored candidate draws.")
    if config.eval_draws is not None:
        split.candidates = split.candidates[:, : config.eval_draws]
    if config.eval_rows is not None:
        n = min(config.eval_rows, len(split))
        split = SplitData(
            split.name, split.sample_id[:n], split.seq[:n], split.len_seq[:n], split.next[:n], split.candidates[:n]
        )
    return split, report


def _evaluate(p: Plan, key: str, cells: list[Cell]) -> None:
    """Evaluate one trained run for each of its pending cells (the run is loaded once)."""
    from .. import metrics
    from ..devices import resolve_device
    from ..evaluation.evaluate import EvalConfig, evaluate_run
    from ..training.config import TrainConfig
    from ..training.run import load_run
    from .significance import per_user_values, test_metric

    directory = run_dir(p, cells[0])
    run = load_run(directory, device=resolve_device(p.config.train.get("device", "auto")))
    config = resolve(TrainConfig, directory / "config.yaml")
    ev = EvalConfig(runs=[key], batch_size=p.config.eval_batch_size, quiet=p.config.quiet)
    for cell in cells:
        split, report = eval_split(p, cell)
        predictions = directory / f"predictions-{cell.name}.jsonl"
        t0 = time.perf_counter()
        meta = (p.eval_dataset or p.dataset).meta
        out = evaluate_run(run, split, ev, cell.name, predictions, meta)
        seconds = time.perf_counter() - t0
        doc = {
            "name": cell.name,
            "axes": cell.axes,
            "run": key,
            "run_dir": str(directory),
            "train_identity": identity(to_dict(config)),
            "eval_identity": eval_identity(p, cell),
            "eval_rows_key": f"{(p.eval_dataset or p.dataset).checksum}:{split.name}",
            "weights_sha256": _weights_digest(directory),
            "encoder": cell.encoder,
            "train_fraction": cell.train_fraction,
            "protocol": metrics.label(split.candidates.shape[2]),
            "split": split.name,
            "rows": len(split),
            "draws": int(split.candidates.shape[1]),
            "ranking": out["ranking"],
            "fusion": out["fusion"],
            "metrics": out["metrics"],
            "llm_metrics": out["llm"]["metrics"] if "llm" in out else out["metrics"],
            "encoder_metrics": out["encoder"]["metrics"],
            "gate": out.get("gate"),  # K > 1: the gate's statistics and its counterfactual (evaluation/gate_report.py)
            "per_user": per_user_values(predictions, out),
            "test_metric": test_metric(out),
            "train_minutes": round(train_minutes(p, cell), 3),
            "eval_minutes": round(seconds / 60, 3),
            "cross_domain": report,
        }
        write_json(cell_file(p, cell), doc)
        err.print(
            f"cell {cell.name}: HR@1 {out['metrics']['hr@1']['mean']:.4f}  MRR {out['metrics']['mrr']['mean']:.4f}"
            f" ({out['ranking']} ranking; {len(split)} rows x {split.candidates.shape[1]} draws)"
        )
    del run


# -- --dry-run --------------------------------------------------------------------------------------------
def dry_run(p: Plan) -> dict[str, Any]:
    """Each cell's status and estimated minutes, from this ablation's measured attempts when there are any,
    else from reference costs of the default backbone on a 2-core CPU."""
    measured = _measured_seconds_per_sample(p)
    default_backbone = p.config.train.get("backbone") in (None, "", "default", "smollm2-135m-instruct")
    rows = []
    seen_runs: set[str] = set()
    for cell in p.cells:
        status, done_steps = _cell_status(p, cell)
        tc = _cell_train_config(p, cell)
        steps, per_step = _steps(p, cell, tc)
        train_s = eval_s = None
        reference = _reference_seconds_per_sample(tc)
        per_sample = measured.get((tc.objective, tc.prompt, tc.head)) or (reference if default_backbone else None)
        if per_sample is not None and status != "finished":
            first = cell.train_key not in seen_runs
            train_s = (steps - done_steps) * per_step * per_sample if first and status != "trained" else 0.0
            n_rows, draws, n_cands = _eval_size(p, cell)
            speed = per_sample / reference  # this machine and backbone against the reference
            if tc.head == "item":
                eval_s = n_rows * REFERENCE_ITEM_EVAL_SECONDS * speed
            else:
                eval_s = n_rows * draws * n_cands / 20 * REFERENCE_EVAL_SECONDS * speed
        seen_runs.add(cell.train_key)
        rows.append(
            {
                "name": cell.name,
                "run": cell.train_key,
                "axes": cell.axes,
                "status": status,
                "steps": steps,
                "samples_per_step": per_step,
                "train_minutes_estimate": None if train_s is None else round(train_s / 60, 2),
                "eval_minutes_estimate": None if eval_s is None else round(eval_s / 60, 2),
            }
        )
    known = [r for r in rows if r["train_minutes_estimate"] is not None]
    total = sum(r["train_minutes_estimate"] + r["eval_minutes_estimate"] for r in known) if known else None
    if measured:
        basis = "seconds per training sample measured by this ablation's earlier attempts"
    elif default_backbone:
        basis = "reference costs of the default backbone on a 2-core CPU (docs/BENCHMARKS.md)"
    else:
        basis = "no estimate: no cell of this ablation has been measured on this backbone yet"
    return {
        "dry_run": True,
        "directory": str(p.directory),
        "reference": p.reference.name,
        "cells": rows,
        "total_minutes_estimate": None if total is None else round(total, 1),
        "estimate_basis": basis,
        "note": "encoders that still have to be trained are not included",
    }


def _cell_status(p: Plan, cell: Cell) -> tuple[str, int]:
    from ..training.checkpoint import list_checkpoints

    directory = run_dir(p, cell)
    if _finished(p, cell):
        return "finished", 0
    if (directory / "ilora.json").is_file():
        return "trained", 0
    ckpts = list_checkpoints(directory / "checkpoints")
    if ckpts:
        step = int(ckpts[-1].name.split("-")[1])
        return f"resume at step {step}", step
    return "to train", 0


def _cell_train_config(p: Plan, cell: Cell):
    from ..training.config import TrainConfig

    return resolve(TrainConfig, None, {**cell.train, "dataset": str(p.dataset.path)})


def _reference_seconds_per_sample(tc) -> float:
    """Seconds per training sample of the default backbone on a 2-core CPU, by head, objective and prompt."""
    if tc.head == "item":
        return REFERENCE_ITEM_SECONDS_PER_SAMPLE
    return REFERENCE_SECONDS_PER_SAMPLE[tc.objective] * (REFERENCE_TEXT_FACTOR if tc.prompt == "text" else 1)


def _second_stage_rows(p: Plan, tc) -> int:
    """How many train rows a cell's run learns on: those its holdout leaves the second stage (all with none)."""
    from ..data.holdout import NO_HOLDOUT, dataset_holdout, partition

    spec = tc.holdout or dataset_holdout(p.dataset)
    if spec == NO_HOLDOUT:
        return int(p.dataset.meta["splits"]["train"])
    if spec not in p.second_stage_rows:
        p.second_stage_rows[spec] = int(len(partition(p.dataset, spec).second_stage_rows))
    return p.second_stage_rows[spec]


def _steps(p: Plan, cell: Cell, tc) -> tuple[int, int]:
    rows = int(_second_stage_rows(p, tc) * cell.train_fraction)
    if tc.max_train_samples is not None:
        rows = min(rows, tc.max_train_samples)
    per_step = tc.batch_size * tc.grad_accum
    steps = tc.max_steps or max(1, int((rows // tc.batch_size) // tc.grad_accum * tc.epochs))
    return steps, per_step


def _eval_size(p: Plan, cell: Cell) -> tuple[int, int, int]:
    ds = p.eval_dataset or p.dataset
    rows = int(ds.meta["splits"].get(p.config.split, 0))
    if p.config.eval_rows is not None:
        rows = min(rows, p.config.eval_rows)
    draws = p.config.eval_draws or int(ds.meta["draws"])
    return rows, draws, cell.candidates or int(ds.meta["n_candidates"])


def _measured_seconds_per_sample(p: Plan) -> dict[tuple[str, str, str], float]:
    """Wall seconds per training sample of this ablation's attempts, by (objective, prompt, head)."""
    totals: dict[tuple[str, str, str], list[float]] = {}
    logs = p.directory / "logs"
    for f in sorted(logs.glob("*.jsonl")) if logs.is_dir() else []:
        for a in read_jsonl(f):
            if _number(a.get("samples")) and _number(a.get("seconds")) and a.get("samples") > 0:
                key = (str(a.get("objective")), str(a.get("prompt")), str(a.get("head", "title")))
                t = totals.setdefault(key, [0.0, 0.0])
                t[0] += a["seconds"]
                t[1] += a["samples"]
    return {k: s / n for k, (s, n) in totals.items() if n}


def read_cell(p: Plan, cell: Cell) -> dict[str, Any] | None:
    return json_doc(cell_file(p, cell)) if _finished(p, cell) else None


def loss_curves(p: Plan) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) of every training run of the grid, from its log."""
    out = {}
    for key, group in _by_run(p.cells).items():
        log = run_dir(p, group[0]) / "logs" / "train.jsonl"
        if log.is_file():
            records = [r for r in read_jsonl(log) if _number(r.get("step")) and isinstance(r.get("loss"), float)]
            out[key] = [(r["step"], r["loss"]) for r in records]
    return out
