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

app = typer.Typer(
    name="ilora",
    help=(
        "Instance-wise LoRA (iLoRA) sequential recommendation with language models.\n\n"
        "Typical flow: prepare a dataset → encode (train the collaborative encoder) → train → eval → recommend. "
        "Artifacts live by name under $ILORA_HOME (default ~/.ilora)."
    ),
    no_args_is_help=True,
    add_completion=False,
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
    typer.Argument(help="Extra settings as key=value (e.g. lr=1e-3); unknown keys are refused.", show_default=False),
]


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


@app.command(no_args_is_help=False)
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


@app.command()
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
    json: JsonOpt = False,
    overrides: Overrides = None,
) -> None:
    """Train the collaborative encoder (SASRec, GRU4Rec or Caser) and report its metrics."""
    from .config import resolve
    from .encoders.train import EncodeConfig
    from .encoders.train import encode as run_encode
    from .report import metrics_table

    cfg = resolve(
        EncodeConfig,
        config,
        dict(
            dataset=dataset, model=model, name=name, epochs=epochs, output=output, overwrite=_flag(overwrite), seed=seed
        ),
        overrides,
    )
    result = run_encode(cfg)
    rows = {split: m for split, m in result["metrics"].items() if split in ("val", "test")}
    metrics_table(f"Encoder {result['model']} on {cfg.dataset}", rows, result.get("protocol", "sampled"))
    if json:
        from .console import print_json

        print_json(result)


def _not_yet(command: str) -> None:
    raise UserError(f"`ilora {command}` is not available in this version yet; see the README's roadmap.")


_LATER = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True}}


@app.command(**_LATER)
def train(ctx: typer.Context) -> None:
    """Train an iLoRA model (LoRA experts gated per user) on a prepared dataset. [not available yet]"""
    _not_yet("train")


@app.command(name="eval", **_LATER)
def eval_(ctx: typer.Context) -> None:
    """Evaluate trained runs on the frozen candidate draws. [not available yet]"""
    _not_yet("eval")


@app.command(**_LATER)
def ablate(ctx: typer.Context) -> None:
    """Run the paper's ablations (experts, gates, encoders, prompts, ...). [not available yet]"""
    _not_yet("ablate")


@app.command(**_LATER)
def recommend(ctx: typer.Context) -> None:
    """Recommend items for users' histories with a trained run. [not available yet]"""
    _not_yet("recommend")


def main() -> None:
    """Entry point: user errors become one sentence on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except UserError as exc:
        from .console import err

        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
