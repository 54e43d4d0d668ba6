"""The ``ilora`` command line. It only parses arguments and calls library functions."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import UserError
from .settings import command_class, complete_overrides

app = typer.Typer(
    name="ilora",
    help=(
        "Instance-wise LoRA (iLoRA) sequential recommendation with language models.\n\n"
        "Typical flow: prepare a dataset → encode (train the collaborative encoder) → train → eval → recommend. "
        "Artifacts live by name under $ILORA_HOME (default ~/.ilora)."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Options every command shares.
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML file of settings (same keys as the flags and overrides).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout; logs go to stderr.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", help="Write the artifact to this directory instead of $ILORA_HOME.")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing artifact.")]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Any setting as key=value (e.g. lr=1e-3; all are listed below); unknown keys are refused.",
        show_default=False,
        autocompletion=complete_overrides,
    ),
]
PrintConfigOpt = Annotated[
    bool, typer.Option("--print-config", help="Print the resolved settings as YAML (a --config file) and exit.")
]


def _print_config(config) -> None:
    from .settings import dump_config

    sys.stdout.write(dump_config(config))
    raise typer.Exit(0)


def _flag(value: bool) -> bool | None:
    """A boolean switch counts as given only when set, so a YAML value is not overridden by its default."""
    return True if value else None


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Show the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"ilora {__version__}")
        raise typer.Exit(0)


@app.command(no_args_is_help=False, cls=command_class("prepare"))
def prepare(
    dataset: Annotated[str | None, typer.Option(help="Name to store the prepared dataset under.")] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="Source format: llara, ml-100k, hetrec-lastfm, steam, interactions, synthetic (the default).",
        ),
    ] = None,
    input: Annotated[Path | None, typer.Option("--input", help="Source folder or file.")] = None,
    items: Annotated[Path | None, typer.Option(help="interactions format: the items file (item, title, ...).")] = None,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow reading the pickled LLaRA .df files (restricted unpickler).")
    ] = False,
    download: Annotated[
        bool, typer.Option("--download", help="Fetch the official archive when --input is absent.")
    ] = False,
    url: Annotated[str | None, typer.Option(help="Download from this address instead.")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected SHA-256 of the downloaded archive.")] = None,
    candidates: Annotated[int | None, typer.Option(help="Candidates per val/test row (target + negatives).")] = None,
    draws: Annotated[int | None, typer.Option(help="Independent candidate draws per val/test row.")] = None,
    domain: Annotated[str | None, typer.Option(help="Prompt domain: music, movies, games, generic.")] = None,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
    json: JsonOpt = False,
    overrides: Overrides = None,
) -> None:
    """Turn interactions into a prepared dataset (items, splits, frozen candidate draws, meta.json)."""
    from .config import resolve
    from .data.prepare import PrepareConfig
    from .data.prepare import prepare as run_prepare
    from .report import dataset_table

    cfg = resolve(
        PrepareConfig,
        config,
        dict(
            dataset=dataset,
            format=format,
            input=input,
            items=items,
            trust_pickle=_flag(trust_pickle),
            download=_flag(download),
            url=url,
            sha256=sha256,
            candidates=candidates,
            draws=draws,
            domain=domain,
            output=output,
            overwrite=_flag(overwrite),
            seed=seed,
        ),
        overrides,
    )
    if print_config:
        _print_config(cfg)
    start = time.perf_counter()
    meta = run_prepare(cfg)
    dataset_table(meta)
    if json:
        from .console import print_json

        print_json(
            {
                "dataset": meta["name"],
                "path": meta["path"],
                "n_items": meta["n_items"],
                "n_users": meta["n_users"],
                "splits": meta["splits"],
                "raw_rows": meta["raw_rows"],
                "history_lengths": meta["history_lengths"],
                "n_candidates": meta["n_candidates"],
                "draws": meta["draws"],
                "checksum": meta["checksum"],
                "notes": meta["notes"],
                "seconds": round(time.perf_counter() - start, 3),
            }
        )


@app.command(cls=command_class("encode"))
def encode(
    dataset: Annotated[str | None, typer.Option(help="Prepared dataset name (or path).")] = None,
    model: Annotated[str | None, typer.Option(help="Encoder: sasrec (default), gru4rec or caser.")] = None,
    name: Annotated[
        str | None, typer.Option(help="Name to store the encoder under (default <dataset>-<model>).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs (early stopping on validation).")] = None,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
    json: JsonOpt = False,
    overrides: Overrides = None,
) -> None:
    """Train the collaborative encoder (SASRec, GRU4Rec or Caser) and report its metrics."""
    from .config import resolve
    from .encoders.train import EncodeConfig
    from .encoders.train import encode as run_encode
    from .report import catalogue_table, metrics_table

    cfg = resolve(
        EncodeConfig,
        config,
        dict(
            dataset=dataset, model=model, name=name, epochs=epochs, output=output, overwrite=_flag(overwrite), seed=seed
        ),
        overrides,
    )
    if print_config:
        _print_config(cfg)
    result = run_encode(cfg)
    labels = {"val": "val", "test": "test", "fitted": "train rows it fitted", "second_stage": "second-stage rows"}
    rows = {
        labels[split] + (f" ({m['rows']:,}, 1 draw)" if "rows" in m else ""): {
            k: v for k, v in m.items() if k != "rows"
        }
        for split, m in result["metrics"].items()
        if split in labels
    }
    protocol = next((m.get("protocol") for m in rows.values() if m.get("protocol")), "sampled")
    metrics_table(f"Encoder {result['model']} on {cfg.dataset}", rows, protocol)
    catalogue_table(f"Encoder {result['model']} on {cfg.dataset}", rows)
    if json:
        from .console import print_json

        print_json(result)


def _resumed_config(cfg, flags: dict, overrides):
    """A resumed run continues with the configuration it was started with (its config.yaml), plus what is given
    now; an earlier --stop-after does not stop it again unless given again."""
    from .config import parse_overrides, resolve
    from .training.config import TrainConfig

    saved = cfg.run_directory() / "config.yaml"
    if not saved.is_file():
        return cfg
    cfg = resolve(TrainConfig, saved, flags, overrides)
    cfg.resume, cfg.overwrite = True, False
    if flags.get("stop_after") is None and "stop_after" not in parse_overrides(overrides):
        cfg.stop_after = None
    return cfg


def _given(values: dict, names: list[str]) -> dict:
    """The settings a command's options give (``values``: its ``locals()``), switches only when set (:func:`_flag`)."""
    return {n: _flag(values[n]) if isinstance(values[n], bool) else values[n] for n in names}


TRAIN_FLAGS = (
    "dataset experts gate prompt objective head backbone load_in_4bit dtype encoder name epochs "
    "max_steps max_train_samples batch_size resume stop_after keep_best report_to output overwrite seed"
).split()  # train's options that are settings
ABLATE_FLAGS = (
    "dataset eval_dataset experts gates encoders prompts objectives candidates train_fraction "
    "seeds reference split name output overwrite dry_run seed"
).split()  # ablate's options that are settings


@app.command(cls=command_class("train"))
def train(
    dataset: Annotated[str | None, typer.Option(help="Prepared dataset name (or path).")] = None,
    experts: Annotated[int | None, typer.Option(help="LoRA experts K (1 = plain LoRA, i.e. LLaRA).")] = None,
    gate: Annotated[str | None, typer.Option(help="Gate: user (default), mlp, prompt, token, uniform.")] = None,
    prompt: Annotated[str | None, typer.Option(help="hybrid (item embeddings in the prompt) or text.")] = None,
    objective: Annotated[str | None, typer.Option(help="rank (listwise over candidates) or generate.")] = None,
    head: Annotated[
        str | None, typer.Option(help="Scoring head: title (titles' likelihood) or item ((W h) · item embedding).")
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="HF causal-LM directory or hub id (default: SmolLM2-135M).")
    ] = None,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="Quantize the backbone to NF4 (QLoRA).")] = False,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16.")] = None,
    encoder: Annotated[str | None, typer.Option(help="Encoder name or path (default <dataset>-sasrec).")] = None,
    name: Annotated[str | None, typer.Option(help="Run name under $ILORA_HOME/runs (default <dataset>-k<K>).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training rows.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Exact number of optimisation steps.")] = None,
    max_train_samples: Annotated[int | None, typer.Option(help="Train on a seeded subset of this many rows.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per process per micro-step.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its newest checkpoint.")] = False,
    stop_after: Annotated[
        int | None, typer.Option(help="Stop after this many steps with a checkpoint (continue with --resume).")
    ] = None,
    keep_best: Annotated[
        bool,
        typer.Option(
            "--keep-best",
            help="Keep the checkpoint that validated best and finish the run with it (catalogue NDCG@10 for the item "
            "head, chosen on the users set apart when there are any; needs validate_every=N).",
        ),
    ] = False,
    report_to: Annotated[
        str | None, typer.Option(help="Send losses and metrics to: none (default), tensorboard or wandb.")
    ] = None,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
    json: JsonOpt = False,
    overrides: Overrides = None,
) -> None:
    """Train an iLoRA model (LoRA experts gated per user) on a prepared dataset.

    Runs on one process, or as DDP under `accelerate launch` / `torchrun` (same command line).
    """
    from .config import resolve
    from .training.config import TrainConfig
    from .training.trainer import train as run_train

    flags = _given(locals(), TRAIN_FLAGS)
    cfg = resolve(TrainConfig, config, flags, overrides)
    if cfg.resume and config is None:
        cfg = _resumed_config(cfg, flags, overrides)
    if print_config:
        _print_config(cfg)
    result = run_train(cfg)
    if json and os.environ.get("RANK", "0") == "0":  # under a launcher, only the main process prints
        from .console import print_json

        print_json(result)


@app.command(name="eval", cls=command_class("eval"))
def eval_(
    run: Annotated[list[str] | None, typer.Option("--run", help="Run directory or name (repeat for several).")] = None,
    encoder: Annotated[
        str | None,
        typer.Option(
            "--encoder",
            metavar="[NAME]",
            help="Also evaluate the encoder alone: the run's (or the dataset's default) with no value; with a name "
            "or path, that encoder besides (e.g. one fitted on every training row).",
        ),
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Prepared dataset (default: the run's).")] = None,
    split: Annotated[str | None, typer.Option(help="val or test.")] = None,
    mode: Annotated[
        str | None, typer.Option(help="score (rank by log-likelihood) or generate (paper's protocol).")
    ] = None,
    candidates: Annotated[
        str | None, typer.Option(help="stored (frozen draws) or retrieve:N (full catalogue).")
    ] = None,
    test_file: Annotated[
        Path | None, typer.Option(help="A LLaRA-format .df split to score (needs --trust-pickle).")
    ] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow reading --test-file.")] = False,
    max_samples: Annotated[int | None, typer.Option(help="Evaluate only the first N rows.")] = None,
    predictions: Annotated[Path | None, typer.Option(help="Where to write per-sample predictions (JSONL).")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Also draw the metrics of every system as a bar chart (PNG, error bars).")
    ] = None,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
    json: JsonOpt = False,
    overrides: Overrides = None,
) -> None:
    """Evaluate trained runs (and the encoder, and popularity) on the frozen candidate draws (HR@K, NDCG@K, MRR, mean ±
    std) and, for the item head, on the whole catalogue with the history left out (what recommend returns)."""
    from .config import resolve
    from .evaluation.evaluate import EvalConfig, evaluate
    from .report import eval_report, eval_rows

    cfg = resolve(
        EvalConfig,
        config,
        dict(
            runs=run or None,
            encoder=encoder,
            dataset=dataset,
            split=split,
            mode=mode,
            candidates=candidates,
            test_file=test_file,
            trust_pickle=_flag(trust_pickle),
            max_samples=max_samples,
            predictions=predictions,
        ),
        overrides,
    )
    if print_config:
        _print_config(cfg)
    if plot is not None and plot.suffix.lower() != ".png":
        raise UserError(f"--plot writes a PNG picture; give a file name ending in .png, not {plot.name!r}.")
    result = evaluate(cfg)
    title = f"{result['split']} ({result['n_rows']} rows, {result['mode']} mode)"
    eval_report(result)
    from .card import record_results

    record_results(cfg.runs, result)
    if plot is not None:
        from .console import err
        from .plots import metrics_bars

        metrics_bars(eval_rows(result["results"]), plot, title=f"{title}, {result['protocol']}")
        err.print(f"Wrote the bar chart to {plot}.")
    if json:
        from .console import print_json

        print_json(result)


@app.command(cls=command_class("export"))
def export(
    run: Annotated[str | None, typer.Option("--run", help="Run directory or name.")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Directory to write the copy to.")] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="K = 1 only: also save the backbone with the LoRA merged in (merged/).")
    ] = False,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
    json: JsonOpt = False,
    overrides: Overrides = None,
) -> None:
    """Copy a finished run into a self-contained directory (adapter, projector, gate, encoder, titles, card)."""
    from .config import resolve
    from .console import err, print_json
    from .exporting import ExportConfig
    from .exporting import export as run_export

    cfg = resolve(
        ExportConfig, config, dict(run=run, output=output, merge=_flag(merge), overwrite=_flag(overwrite)), overrides
    )
    if print_config:
        _print_config(cfg)
    result = run_export(cfg)
    err.print(f"Exported {result['run']} to {result['output']} ({len(result['files'])} files).", highlight=False)
    if json:
        print_json(result)


@app.command(cls=command_class("recommend"))
def recommend(
    run: Annotated[str | None, typer.Option("--run", help="Run directory or name.")] = None,
    user_history: Annotated[
        Path | None, typer.Option(help="JSON list of item ids or titles; JSONL (one list per line) for many users.")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="Recommendations per user.")] = None,
    candidates: Annotated[Path | None, typer.Option(help="JSON list of items to rank (default: retrieval).")] = None,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
    json: JsonOpt = False,
    overrides: Overrides = None,
) -> None:
    """Recommend items for users' histories: the whole catalogue ranked by the run's default (fused) score with the
    history left out (item head), the encoder's top-N reranked by the LLM (title head), or given candidates ranked."""
    from rich.table import Table

    from .config import resolve
    from .console import err, json_text, labelled, print_json
    from .evaluation.recommend import RecommendConfig, Recommender, iter_histories

    cfg = resolve(
        RecommendConfig, config, dict(run=run, user_history=user_history, top_k=top_k, candidates=candidates), overrides
    )
    if print_config:
        _print_config(cfg)
    users, batch = iter_histories(cfg.user_history)  # checked now; a batch's lines are read as they are answered
    rec = Recommender(cfg)
    failed = 0
    for lineno, user in enumerate(users, 1):
        try:
            out = rec.recommend(user)
        except UserError as exc:
            if not batch:
                raise
            # Batch mode: one output line per input line, errors included; exit 2 at the end.
            failed += 1
            labelled("error", f"user {lineno}: {exc}", "bold red")
            sys.stdout.write(json_text({"line": lineno, "error": str(exc)}) + "\n")
            continue
        for note in out["notes"]:
            labelled("note", note)
        if batch:
            sys.stdout.write(json_text(out) + "\n")
            sys.stdout.flush()
            continue
        t = Table(title=f"Recommendations ({out['candidates']})")
        for col in ("rank", "item id", "title", "score"):
            t.add_column(col, justify="right" if col != "title" else "left")
        for i, r in enumerate(out["recommendations"], 1):
            t.add_row(str(i), str(r["item_id"]), r["title"], f"{r['score']:.3f}")
        err.print(t)
        err.print("gate: " + "  ".join(f"expert {k}: {g:.3f}" for k, g in enumerate(out["gate"])))
        if json:
            print_json(out)
    if failed:
        raise typer.Exit(2)


@app.command(cls=command_class("serve"))
def serve(
    run: Annotated[str | None, typer.Option("--run", help="Run directory or name.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8000; 0: a free one).")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Require 'Authorization: Bearer KEY' (or set ILORA_API_KEY).")
    ] = None,
    max_batch: Annotated[int | None, typer.Option(help="Users scored together in one forward.")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="How long a batch waits for more users.")] = None,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
    json: JsonOpt = False,
    overrides: Overrides = None,
) -> None:
    """Serve recommendations over HTTP: every user with their own expert mixture, users batched together.

    POST /v1/recommend and /v1/recommend/batch; GET /healthz, /readyz, /v1/run, /metrics and /docs.
    Stops on SIGTERM after answering the requests in flight. With --json, prints the address once it listens.
    """
    from .config import resolve
    from .serving.config import ServeConfig
    from .serving.server import print_address
    from .serving.server import serve as run_serve

    cfg = resolve(
        ServeConfig,
        config,
        dict(run=run, host=host, port=port, api_key=api_key, max_batch=max_batch, max_wait_ms=max_wait_ms),
        overrides,
    )
    if print_config:
        _print_config(cfg)
    code = run_serve(cfg, on_listening=print_address if json else None)
    if code:
        raise typer.Exit(code)


@app.command(cls=command_class("ablate"))
def ablate(
    dataset: Annotated[str | None, typer.Option(help="Prepared dataset the cells train on (name or path).")] = None,
    train_dataset: Annotated[str | None, typer.Option(help="Cross-domain: train on this dataset ...")] = None,
    eval_dataset: Annotated[
        str | None, typer.Option(help="... and evaluate on this one, its items mapped by title.")
    ] = None,
    experts: Annotated[
        str | None, typer.Option(help="Axis: expert counts at the fixed total rank, e.g. 1,2,4,8.")
    ] = None,
    gates: Annotated[str | None, typer.Option(help="Axis: gates, from user, mlp, token, prompt, uniform.")] = None,
    encoders: Annotated[str | None, typer.Option(help="Axis: encoders, from sasrec, gru4rec, caser.")] = None,
    prompts: Annotated[str | None, typer.Option(help="Axis: prompts, hybrid and/or text.")] = None,
    objectives: Annotated[str | None, typer.Option(help="Axis: objectives, rank and/or generate.")] = None,
    candidates: Annotated[str | None, typer.Option(help="Axis: candidates per evaluation row, e.g. 20,30,40.")] = None,
    train_fraction: Annotated[
        str | None, typer.Option(help="Axis: fraction of training users kept, e.g. 1,0.5,0.25,0.1.")
    ] = None,
    seeds: Annotated[str | None, typer.Option(help="Axis: training seeds, e.g. 1,2,3.")] = None,
    reference: Annotated[
        str | None, typer.Option(help="The cell the others are tested against (default: the first).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Evaluation split: val (default) or test.")] = None,
    name: Annotated[str | None, typer.Option(help="Directory name under $ILORA_HOME/ablations.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the cells and the time they will take; train nothing.")
    ] = False,
    analysis: Annotated[str | None, typer.Option(help="Run an analysis instead of a grid: gradient-conflict.")] = None,
    run: Annotated[str | None, typer.Option("--run", help="gradient-conflict: the run to analyse.")] = None,
    baseline: Annotated[
        str | None, typer.Option(help="gradient-conflict: a run to compare with (e.g. plain LoRA).")
    ] = None,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    json: JsonOpt = False,
    overrides: Overrides = None,
) -> None:
    """Run a grid of trainings and compare them on the same users (the paper's ablations).

    Each cell trains one run (total rank fixed, everything else equal) and evaluates it on the stored
    candidate draws; the table gives mean ± std over the draws, the encoder alone, and a paired test of
    each cell against the reference cell. Extra key=value pairs are training settings shared by every
    cell (e.g. max_train_samples=256). Running the same command again resumes an interrupted ablation.
    With --analysis gradient-conflict, compares the LoRA gradients of user clusters of --run and --baseline.
    """
    from .console import print_json

    if analysis is not None:
        flags = dict(run=run, baseline=baseline, dataset=dataset, output=output, overwrite=_flag(overwrite), seed=seed)
        result = _analysis(analysis, config, flags, overrides)
    else:
        from .ablation.config import resolve_ablation
        from .ablation.runner import run_ablation

        if run is not None or baseline is not None:
            raise UserError("--run and --baseline belong to --analysis gradient-conflict.")
        if dataset is not None and train_dataset is not None and dataset != train_dataset:
            raise UserError("--dataset and --train-dataset name the same thing; pass one of them.")
        flags = _given(locals(), ABLATE_FLAGS) | {"dataset": dataset or train_dataset}
        result = run_ablation(resolve_ablation(config, flags, overrides))
        if result.get("dry_run"):
            from .ablation.report import print_plan

            print_plan(result)
    if json:
        print_json(result)


def _analysis(analysis: str, config, flags: dict, overrides):
    """``ablate --analysis NAME``: the gradient-conflict analysis of a run against its baseline."""
    from .ablation.analysis import analysis_config, gradient_conflict

    if analysis != "gradient-conflict":
        raise UserError(f"Unknown analysis {analysis!r}; the one available is gradient-conflict.")
    return gradient_conflict(analysis_config(config, flags, overrides))


def _optional_values(argv: list[str]) -> list[str]:
    """``eval --encoder`` may stand alone (the run's encoder) or name one (``--encoder NAME``): alone — at the end,
    or before another option or a ``key=value`` setting — it means ``--encoder=true``."""
    if len(argv) < 2 or argv[1] != "eval":
        return argv
    out = list(argv)
    for i, token in enumerate(out):
        following = out[i + 1] if i + 1 < len(out) else None
        if token == "--encoder" and (following is None or following.startswith("-") or "=" in following):
            out[i] = "--encoder=true"
    return out


def main() -> None:
    """Entry point: user errors become one sentence on stderr and exit code 2."""
    from .console import quiet_libraries

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    sys.argv = _optional_values(sys.argv)
    try:
        app(prog_name="ilora")
    except UserError as exc:
        from .console import labelled

        labelled("error", str(exc), "bold red")  # literally: messages quote settings, titles and paths
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
