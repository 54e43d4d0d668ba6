"""The prepared dataset on disk, and the ``prepare`` step that writes it.

Layout of a prepared dataset directory::

    meta.json      item count, padding id, maximum history, source, seed, checksums, tool version
    items/         HF datasets table: item_id, title, source_id, metadata (JSON text)
    train/         sample_id, seq (max_history ids, right-padded), len_seq, next, user
    val/, test/    the same plus candidates: (draws, n_candidates) frozen candidate ids per row
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import UserError
from ..home import atomic_directory, dataset_dir
from .candidates import draw_candidates
from .checks import (
    FORMAT_VERSION,
    check_candidate_table,
    checked_titles,
    read_meta,
    sha256_arrays,
    split_table,
    verified,
)
from .source import MIN_HISTORY, Rows, SourceData, validate_rows
from .titles import clean_title, disambiguate

SPLITS = ("train", "val", "test")


@dataclass
class SplitData:
    """One split in memory (numpy arrays)."""

    name: str
    sample_id: np.ndarray  # (N,)
    seq: np.ndarray  # (N, max_history), right-padded with pad_id
    len_seq: np.ndarray  # (N,)
    next: np.ndarray  # (N,)
    candidates: np.ndarray | None  # (N, draws, n_candidates) or None for train

    def __len__(self) -> int:
        return int(self.next.shape[0])

    def histories(self) -> list[list[int]]:
        return [self.seq[i, : self.len_seq[i]].tolist() for i in range(len(self))]

    def select(self, rows: np.ndarray) -> SplitData:
        """The rows ``rows`` (indices, in that order) as a split of their own."""
        return SplitData(
            self.name,
            self.sample_id[rows],
            self.seq[rows],
            self.len_seq[rows],
            self.next[rows],
            None if self.candidates is None else self.candidates[rows],
        )


def _sha256_texts(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


class PreparedDataset:
    """A prepared dataset directory, read lazily."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise UserError(f"{self.path} is not a prepared dataset (no meta.json); run `ilora prepare` first.")
        self.meta: dict[str, Any] = read_meta(self.path)

    @classmethod
    def open(cls, name_or_path: str | Path) -> PreparedDataset:
        """Open by path, or by name under ``$ILORA_HOME/datasets``."""
        p = Path(name_or_path)
        if (p / "meta.json").is_file():
            return cls(p)
        if isinstance(name_or_path, str) and "/" not in name_or_path:
            d = dataset_dir(name_or_path)
            if (d / "meta.json").is_file():
                return cls(d)
            raise UserError(
                f"No prepared dataset named {name_or_path!r} in {d.parent}; "
                f"run `ilora prepare --dataset {name_or_path} ...` first."
            )
        raise UserError(f"{p} is not a prepared dataset (no meta.json); run `ilora prepare` first.")

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def n_items(self) -> int:
        return int(self.meta["n_items"])

    @property
    def pad_id(self) -> int:
        return int(self.meta["pad_id"])

    @property
    def max_history(self) -> int:
        return int(self.meta["max_history"])

    @property
    def checksum(self) -> str:
        return self.meta["checksum"]

    @property
    def domain(self) -> str:
        return self.meta.get("domain", "generic")

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @cached_property
    def titles(self) -> list[str]:
        return checked_titles(self)

    def split(self, name: str) -> SplitData:
        if name not in self.meta["splits"]:
            raise UserError(f"The dataset {self.name!r} has no {name} split; it has: {', '.join(self.meta['splits'])}.")
        table = split_table(self, name)  # pyarrow: columnar, no per-row Python work; checked against meta.json
        n = table.num_rows

        def column(col: str, *shape: int) -> np.ndarray:
            arr = table.column(col).combine_chunks()
            while hasattr(arr, "flatten"):  # fixed-size lists → flat values
                arr = arr.flatten()
            return arr.to_numpy(zero_copy_only=False).astype(np.int64).reshape(n, *shape)

        cands = None
        if "candidates" in table.column_names:
            cands = column("candidates", int(self.meta["draws"]), int(self.meta["n_candidates"]))
        split = SplitData(
            name=name,
            sample_id=column("sample_id"),
            seq=column("seq", self.max_history),
            len_seq=column("len_seq"),
            next=column("next"),
            candidates=cands,
        )
        return verified(self, split)


def _holdout_counts(train: Rows, spec: str | None, seed: int) -> dict[str, Any]:
    """The holdout spec and how many train rows and users it leaves to each stage (as ``partition`` computes it)."""
    from .holdout import Holdout, chain_users, split_masks

    holdout = Holdout.parse(spec)
    if train.user is not None and len(train.user) and (train.user >= 0).all():
        users = train.user
    else:
        users = chain_users(train.seq, train.len_seq, train.next)
    fits, learns = split_masks(users, holdout, seed)
    if holdout.active and (not fits.any() or not learns.any()):
        raise UserError(
            f"holdout {holdout.spec} leaves {int(fits.sum())} training rows to the encoder and {int(learns.sum())} to "
            "the second stage; choose another --holdout or holdout=none."
        )
    return {
        "spec": holdout.spec,
        "encoder_rows": int(fits.sum()),
        "second_stage_rows": int(learns.sum()),
        "users": int(len(np.unique(users))),
    }


def history_histogram(len_seq: np.ndarray, max_history: int) -> dict[str, int]:
    counts = np.bincount(len_seq, minlength=max_history + 1)
    return {str(k): int(counts[k]) for k in range(len(counts)) if counts[k]}


def write_prepared(
    source: SourceData,
    name: str,
    out_dir: Path,
    n_candidates: int = 20,
    draws: int = 5,
    seed: int = 42,
    min_history: int = MIN_HISTORY,
    overwrite: bool = False,
    holdout: str | None = None,
) -> dict[str, Any]:
    """Filter, draw candidates, and write a prepared dataset atomically. Returns its meta document.

    ``holdout`` (default :data:`~.holdout.DEFAULT_HOLDOUT`) is recorded with the counts of train rows it leaves
    to the encoder and to the second stage (data/holdout.py)."""
    import datasets

    datasets.disable_progress_bars()
    if n_candidates < 2:
        raise UserError("--candidates must be at least 2 (the target and one negative).")
    if draws < 1:
        raise UserError("--draws must be at least 1.")
    titles = _checked_titles(source)
    n_items = len(titles)
    kept, raw_counts = _kept_rows(source, n_items, min_history)
    max_history = kept["train"].seq.shape[1]
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "n_items": n_items,
        "n_users": source.n_users,
        "pad_id": n_items,
        "max_history": max_history,
        "min_history": min_history,
        "domain": source.domain,
        "n_candidates": n_candidates,
        "draws": draws,
        "seed": seed,
        "source": source.source,
        "splits": {s: len(r) for s, r in kept.items()},
        "raw_rows": raw_counts,
        "history_lengths": {s: history_histogram(r.len_seq, max_history) for s, r in kept.items()},
        "holdout": _holdout_counts(kept["train"], holdout, seed),
        "tool_version": __version__,
        "notes": list(source.notes),
    }
    checksums = {"items": _sha256_texts(titles)}
    check_candidate_table(sum(len(r) for s, r in kept.items() if s != "train"), draws, n_candidates)
    with atomic_directory(out_dir, overwrite=overwrite, kind="prepared dataset") as tmp:
        _write_items(tmp / "items", source, titles)
        for split, rows in kept.items():
            draw = (n_items, n_candidates, draws, seed) if split != "train" else None
            checksums[split] = _write_split(tmp / split, split, rows, max_history, draw)
        meta["checksums"] = checksums
        meta["checksum"] = hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def _checked_titles(source: SourceData) -> list[str]:
    """The items' cleaned, disambiguated titles; no items or an empty title is refused."""
    if not source.titles:
        raise UserError("The dataset has no items.")
    titles = [clean_title(t) for t in source.titles]
    if any(not t for t in titles):
        empty = [i for i, t in enumerate(titles) if not t][:5]
        raise UserError(f"Items {empty} have empty titles.")
    return disambiguate(titles, source.title_hints)


def _kept_rows(source: SourceData, n_items: int, min_history: int) -> tuple[dict[str, Rows], dict[str, int]]:
    """Each split's rows with at least ``min_history`` history items (validated), and the raw row counts."""
    kept: dict[str, Rows] = {}
    raw_counts: dict[str, int] = {}
    for split in SPLITS:
        rows = source.splits.get(split)
        if rows is None:
            continue
        raw_counts[split] = len(rows)
        # Validate only what is kept: the published LastFM train file has 976 rows with len_seq 1 and an
        # all-padding history, which the ≥ min_history filter drops anyway.
        kept[split] = rows.select(rows.len_seq >= min_history)
        validate_rows(kept[split], n_items, split, n_items)
    if "train" not in kept or len(kept["train"]) == 0:
        raise UserError(f"The dataset has no training samples with at least {min_history} history items.")
    return kept, raw_counts


def _write_items(path: Path, source: SourceData, titles: list[str]) -> None:
    from datasets import Dataset, Features, Value

    n_items = len(titles)
    features = Features(
        {"item_id": Value("int64"), "title": Value("string"), "source_id": Value("string"), "metadata": Value("string")}
    )
    Dataset.from_dict(
        {
            "item_id": list(range(n_items)),
            "title": titles,
            "source_id": source.source_ids or [str(i) for i in range(n_items)],
            "metadata": [json.dumps(m, ensure_ascii=False) for m in source.metadata]
            if source.metadata
            else ["{}"] * n_items,
        },
        features=features,
    ).save_to_disk(str(path))


def _write_split(path: Path, split: str, rows: Rows, max_history: int, draw: tuple[int, int, int, int] | None) -> str:
    """Write one split (with its frozen candidate draws when ``draw`` = (n_items, n_candidates, draws, seed));
    returns the checksum of what it holds."""
    from datasets import Dataset, Features, Sequence, Value

    sample_id = np.arange(len(rows), dtype=np.int64)
    cols: dict[str, Any] = {
        "sample_id": sample_id,
        "seq": rows.seq,
        "len_seq": rows.len_seq,
        "next": rows.next,
        "user": rows.user if rows.user is not None else np.full(len(rows), -1, dtype=np.int64),
    }
    feats = {
        "sample_id": Value("int64"),
        "seq": Sequence(Value("int64"), length=max_history),
        "len_seq": Value("int64"),
        "next": Value("int64"),
        "user": Value("int64"),
    }
    parts = [rows.seq, rows.len_seq, rows.next]
    if draw is not None:
        n_items, n_candidates, draws, seed = draw
        cands = draw_candidates(rows.seq, rows.len_seq, rows.next, sample_id, n_items, n_candidates, draws, seed, split)
        cols["candidates"] = cands
        feats["candidates"] = Sequence(Sequence(Value("int64"), length=n_candidates), length=draws)
        parts.append(cands)
    Dataset.from_dict(cols, features=Features(feats)).save_to_disk(str(path))
    return sha256_arrays(*parts)
