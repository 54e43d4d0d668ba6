"""``ilora prepare``: read a source format and write a prepared dataset."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import check_minimums, check_range, check_seed
from ..console import err
from ..errors import UserError
from ..home import check_name, check_replaceable, dataset_dir
from .checks import MAX_CANDIDATES_PER_ROW
from .formats import FORMATS, loader
from .holdout import DEFAULT_HOLDOUT, Holdout
from .prepared import write_prepared
from .source import MIN_HISTORY

MAX_DRAWS = 1000  # candidate draws per row: more only multiplies the stored table


@dataclass
class PrepareConfig:
    dataset: str | None = None  # name to store it under (default: derived from the format and input)
    format: str = "synthetic"  # llara, ml-100k, hetrec-lastfm, steam, interactions, synthetic
    input: Path | None = None  # source directory or file (format-specific)
    items: Path | None = None  # interactions format: the items file (item, title[, ...])
    output: Path | None = None  # write here instead of $ILORA_HOME/datasets/<dataset>
    overwrite: bool = False  # replace an existing prepared dataset
    trust_pickle: bool = False  # allow reading the pickled LLaRA files (through a restricted unpickler)
    download: bool = False  # fetch the official archive when no --input is given
    url: str | None = None  # download from this address instead of the official one
    sha256: str | None = None  # expected checksum of the downloaded archive
    candidates: int = 20  # candidates per evaluation row (the target plus negatives)
    draws: int = 5  # independent candidate draws per evaluation row
    seed: int = 42  # seed of the user split, the candidate draws and the synthetic generator
    min_history: int = MIN_HISTORY  # drop samples with fewer history items
    max_history: int = 10  # history items kept per sample (raw formats)
    domain: str | None = None  # prompt template family (music, movies, games, generic); format default if unset
    holdout: str = DEFAULT_HOLDOUT  # train rows the encoder does not fit, for the second stage: users:F (a seeded
    # fraction of the training users), last:N (each user's last N rows) or none (data/holdout.py)
    # synthetic generator sizes
    synthetic_users: int = 600  # users in the synthetic dataset
    synthetic_items: int = 240  # items in the synthetic dataset
    synthetic_groups: int = 4  # latent user groups, each with its own transition pattern

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"Unknown format {self.format!r}; choose one of: {', '.join(FORMATS)}.")
        if self.dataset is None:
            self.dataset = default_name(self.format, self.input)
        check_name(self.dataset, "dataset name")
        if self.domain is not None and self.domain not in ("music", "movies", "games", "generic"):
            raise UserError(f"Unknown domain {self.domain!r}; choose music, movies, games or generic.")
        check_minimums(self, {"max_history": 1, "min_history": 1, "candidates": 2, "draws": 1, "seed": 0})
        check_range(self, "draws", high=MAX_DRAWS)
        self.holdout = Holdout.parse(self.holdout).spec
        if self.draws * self.candidates > MAX_CANDIDATES_PER_ROW:
            raise UserError(
                f"--draws {self.draws} x --candidates {self.candidates} stores {self.draws * self.candidates:,} "
                f"candidates per val/test row; at most {MAX_CANDIDATES_PER_ROW:,} are allowed."
            )
        check_seed(self)
        if self.format == "synthetic":
            from .formats.synthetic import MAX_ITEMS, MAX_USERS, MIN_ITEMS

            check_range(self, "synthetic_items", low=MIN_ITEMS, high=MAX_ITEMS)
            check_range(self, "synthetic_users", low=10, high=MAX_USERS)
            check_range(self, "synthetic_groups", low=1, high=self.synthetic_items)


def default_name(fmt: str, input: Path | None) -> str:
    """``synthetic``, ``ml100k``, ``lastfm-hetrec``, ``steam``; llara and interactions use the input's name."""
    named = {"synthetic": "synthetic", "ml-100k": "ml100k", "hetrec-lastfm": "lastfm-hetrec", "steam": "steam"}
    if fmt in named:
        return named[fmt]
    stem = Path(input).stem if input else fmt
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or fmt


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Read the source, then write the prepared dataset; returns its meta document plus the path."""
    config.validate()  # also names the dataset when no name was given
    out_dir = Path(config.output) if config.output else dataset_dir(config.dataset)
    if out_dir.exists() and not config.overwrite:
        raise UserError(f"The output {out_dir} already exists; pass --overwrite to replace it.")
    check_replaceable(out_dir, "prepared dataset")  # before reading the source, not after
    started = time.perf_counter()
    where = f" from {config.input}" if config.input else ""
    err.print(f"prepare: reading the {config.format} data{where} ...", highlight=False)
    source = loader(config.format)(config)
    rows = sum(len(r) for r in source.splits.values())
    err.print(
        f"prepare: read {len(source.titles):,} items and {rows:,} rows in {time.perf_counter() - started:.1f} s; "
        f"writing them with {config.draws} candidate draws per val/test row ...",
        highlight=False,
    )
    if config.domain:
        source.domain = config.domain
    source.source.setdefault("format", config.format)
    meta = write_prepared(
        source,
        name=config.dataset,
        out_dir=out_dir,
        n_candidates=config.candidates,
        draws=config.draws,
        seed=config.seed,
        min_history=config.min_history,
        overwrite=config.overwrite,
        holdout=config.holdout,
    )
    meta["path"] = str(out_dir)
    return meta
