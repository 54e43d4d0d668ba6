"""The LLaRA/iLoRA processed format: ``train_data.df``, ``Val_data.df``, ``Test_data.df`` and titles.

The ``.df`` files are pandas pickles with columns ``seq`` (item ids, right-padded with the item count),
``len_seq`` and ``next``. MovieLens files store ``(id, rating)`` tuples instead of bare ids. Titles
come from ``id2name.txt`` (``id::name``) or GroupLens ``u.item``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ...errors import UserError
from ..safe_pickle import load_dataframe
from ..source import Rows, SourceData
from ..titles import clean_title, movie_title

SPLIT_FILES = {"train": "train_data.df", "val": "val_data.df", "test": "test_data.df"}


def _find(directory: Path, filename: str) -> Path | None:
    """Case-insensitive lookup (the published files are ``Val_data.df``, ``Test_data.df``)."""
    for p in directory.iterdir():
        if p.name.lower() == filename and p.is_file():
            return p
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_id2name(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text.") from None
    names: dict[int, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        raw_id, sep, name = line.partition("::")
        if not sep:
            raise UserError(f"{path} line {lineno} is not of the form id::name.")
        try:
            names[int(raw_id)] = name
        except ValueError:
            raise UserError(f"{path} line {lineno} has a non-integer id {raw_id!r}.") from None
    if not names:
        raise UserError(f"{path} lists no items.")
    n = len(names)
    if min(names) != 0 or max(names) != n - 1:  # n distinct ids fill 0..n-1 exactly when these two hold
        missing = next(i for i in range(n + 1) if i not in names)  # at most n + 1 lookups, whatever the ids
        raise UserError(f"{path} does not list every id from 0 to {max(names)} (id {missing} is missing).")
    return [clean_title(names[i]) for i in range(n)]


def _read_u_item(path: Path) -> tuple[list[str], list[str | None]]:
    text = path.read_bytes().decode("latin-1")
    titles: dict[int, tuple[str, str | None]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 2:
            raise UserError(f"{path} line {lineno} is not '|'-separated.")
        try:
            titles[int(fields[0]) - 1] = movie_title(fields[1])
        except ValueError:
            raise UserError(f"{path} line {lineno} has a non-integer id {fields[0]!r}.") from None
    if not titles:
        raise UserError(f"{path} lists no movies.")
    n = max(titles) + 1
    if len(titles) != n:
        raise UserError(f"{path} does not list every movie id from 1 to {n}.")
    return [titles[i][0] for i in range(n)], [titles[i][1] for i in range(n)]


def _as_id(x) -> int:
    """An item entry: a bare id, or an ``(id, rating)`` pair as in the MovieLens files."""
    if isinstance(x, (tuple, list, np.ndarray)):
        x = x[0]
    return int(x)


def _rows(df, path: Path, max_history: int) -> Rows:
    for col in ("seq", "len_seq", "next"):
        if col not in df.columns:
            raise UserError(f"{path} has no {col!r} column (it has: {', '.join(map(str, df.columns))}).")
    n = len(df)
    try:
        seqs = [[_as_id(x) for x in s] for s in df["seq"]]
        nxt = np.array([_as_id(x) for x in df["next"]], dtype=np.int64)
        lens = np.array([int(x) for x in df["len_seq"]], dtype=np.int64)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise UserError(f"{path} has entries that are not item ids.") from None
    width = max((len(s) for s in seqs), default=max_history)
    seq = np.empty((n, width), dtype=np.int64)
    for i, s in enumerate(seqs):
        if len(s) != width:
            raise UserError(f"{path} row {i} has {len(s)} history slots; the others have {width}.")
        try:
            seq[i] = s
        except OverflowError:
            raise UserError(f"{path} row {i} has an item id out of range.") from None
    return Rows(seq, lens, nxt)


def load(config) -> SourceData:
    directory = Path(config.input) if config.input else None
    if directory is None:
        raise UserError("The llara format needs --input DIR (the folder with train_data.df and id2name.txt).")
    if not directory.is_dir():
        raise UserError(f"The input folder {directory} does not exist.")
    present = {split: _find(directory, f) for split, f in SPLIT_FILES.items()}
    if present["train"] is None:
        raise UserError(f"{directory} has no train_data.df.")
    if not config.trust_pickle:
        raise UserError(
            "The LLaRA .df files are pandas pickles, which can run code when loaded; "
            "pass --trust-pickle if you trust their origin (they are then read through a restricted unpickler)."
        )
    source = {"format": "llara", "input": str(directory.resolve()), "files": {}}
    id2name, u_item = _find(directory, "id2name.txt"), _find(directory, "u.item")
    hints = None
    if id2name is not None:
        titles, domain, title_file = _read_id2name(id2name), "music", id2name
    elif u_item is not None:
        (titles, hints), domain, title_file = _read_u_item(u_item), "movies", u_item
    else:
        raise UserError(f"{directory} has neither id2name.txt nor u.item, so items have no titles.")
    if "steam" in config.dataset.lower():
        domain = "games"
    source["files"][title_file.name] = _sha256(title_file)

    splits: dict[str, Rows] = {}
    notes = []
    for split, path in present.items():
        if path is None:
            notes.append(f"no {SPLIT_FILES[split]} in {directory}: the {split} split is absent")
            continue
        source["files"][path.name] = _sha256(path)
        splits[split] = _rows(load_dataframe(path), path, config.max_history)
        width, train_width = splits[split].seq.shape[1], splits["train"].seq.shape[1]
        if width != train_width:
            raise UserError(
                f"{path.name} has histories of {width} slots but {present['train'].name} of {train_width}; "
                "the splits must come from the same processing."
            )
    return SourceData(titles=titles, splits=splits, domain=domain, title_hints=hints, source=source, notes=notes)
