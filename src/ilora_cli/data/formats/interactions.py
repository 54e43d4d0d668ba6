"""``interactions``: any dataset as two files, interactions (user, item, timestamp) and items (item, title).

Both files are CSV with a header row, or JSON Lines (one object per line), chosen by extension
(``.csv``/``.tsv``, ``.jsonl``/``.ndjson``/``.json``) or else by the first character. ``user_id`` and
``item_id`` are accepted for ``user`` and ``item``. Items are numbered 0..N-1 in the order of the items
file; columns besides item and title become item metadata. A user's sequence is their interactions
ordered by timestamp (file order where equal, or throughout when there is no timestamp column).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import UserError
from ..download import sha256_file
from ..source import SourceData, splits_from_sequences
from ..titles import clean_title

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..prepare import PrepareConfig

FORMAT = "interactions"
ALIASES = {
    "user": ("user", "user_id"),
    "item": ("item", "item_id"),
    "timestamp": ("timestamp",),
    "title": ("title",),
}
_JSONL = (".jsonl", ".ndjson", ".json")
_CSV = (".csv", ".tsv", ".txt")


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path.name} is not UTF-8 text (line {line} cannot be decoded).") from None


def _is_jsonl(path: Path, text: str) -> bool:
    suffix = path.suffix.lower()
    if suffix in _JSONL:
        return True
    if suffix in _CSV:
        return False
    return text.lstrip().startswith("{")


def _column(fields: list[str], role: str) -> str | None:
    for name in ALIASES[role]:
        if name in fields:
            return name
    return None


def read_table(
    path: Path, roles: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` with the role columns renamed to their role; other columns kept as they are."""
    if not path.is_file():
        raise UserError(f"The file {path} does not exist.")
    text = _decode(path)
    if not text.strip():
        raise UserError(f"{path.name} is empty.")
    if _is_jsonl(path, text):
        rows = _jsonl_rows(path, text)
    else:
        rows = _csv_rows(path, text, roles)
    names: dict[str, str | None] | None = None
    for lineno, row in rows:
        if names is None:  # JSONL: resolve the aliases from the first object
            names = {role: _column(list(row), role) for role in (*roles, *optional)}
            missing = [r for r in roles if names[r] is None]
            if missing:
                raise UserError(
                    f"{path.name} has no {' or '.join(ALIASES[missing[0]])} field "
                    f"(found: {', '.join(repr(k)[:40] for k in row) or 'none'})."
                )
        out = {k: v for k, v in row.items() if k not in {n for n in names.values() if n}}
        for role, name in names.items():
            if name is None:
                continue
            if name not in row or row[name] in (None, ""):
                raise UserError(f"{path.name} line {lineno} has no {name}.")
            out[role] = row[name]
        yield lineno, out


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{path.name} line {lineno} is not a JSON object (or is nested too deeply).") from None
        if not isinstance(row, dict):
            raise UserError(f"{path.name} line {lineno} is not a JSON object.")
        yield lineno, row


def _csv_rows(path: Path, text: str, roles: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    header = text.lstrip("\r\n").splitlines()[0]
    for delimiter in (",", "\t", ";", "|"):
        fields = [f.strip() for f in next(csv.reader([header], delimiter=delimiter))]
        if all(_column(fields, r) for r in roles):
            break
    else:
        wanted = ", ".join(ALIASES[r][0] for r in roles)
        raise UserError(f"{path.name} needs a header row with the columns {wanted}; its first line is {header[:80]!r}.")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns: list[str] | None = None
    for row in _checked(reader, path):
        if not any(cell.strip() for cell in row):
            continue
        if columns is None:
            columns = [c.strip() for c in row]
            continue
        if len(row) != len(columns):
            raise UserError(f"{path.name} line {reader.line_num} has {len(row)} fields; the header has {len(columns)}.")
        yield reader.line_num, {c: v.strip() for c, v in zip(columns, row, strict=True)}


def _checked(reader, path: Path) -> Iterator[list[str]]:
    """The CSV reader's rows, its errors (an over-long field, a stray quote) as one sentence."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise UserError(f"{path.name} line {reader.line_num} is not valid CSV ({exc}).") from None
        yield row


def _id(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _time(value: Any, path: Path, lineno: int) -> float:
    """A timestamp as seconds: a finite number, or an ISO 8601 date/time (naive ones taken as UTC)."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    text = str(value).strip()
    try:
        seconds = float(value if numeric else text)
    except (ValueError, OverflowError):
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds):
            raise UserError(f"{path.name} line {lineno}: the timestamp {text[:40]!r} is not a finite number.")
        return seconds
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UserError(
            f"{path.name} line {lineno}: the timestamp {text[:40]!r} is neither a number nor an ISO date."
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def read_items(path: Path) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Source ids, cleaned titles and metadata, in the order of the items file."""
    ids: list[str] = []
    titles: list[str] = []
    metadata: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, row in read_table(path, ("item", "title")):
        item = _id(row.pop("item"))
        if item in seen:
            raise UserError(f"{path.name} line {lineno} lists item {item!r} again (first on line {seen[item]}).")
        seen[item] = lineno
        title = clean_title(str(row.pop("title")))
        if not title:
            raise UserError(f"{path.name} line {lineno}: item {item!r} has an empty title.")
        ids.append(item)
        titles.append(title)
        metadata.append(row)
    if not ids:
        raise UserError(f"{path.name} lists no items.")
    return ids, titles, metadata


def read_interactions(path: Path, index: dict[str, int], items_name: str) -> tuple[list[np.ndarray], bool]:
    """One sequence per user (first-appearance order), and whether a timestamp column was present."""
    per_user: dict[str, list[tuple[float, int, int]]] = {}
    timed = None
    for lineno, row in read_table(path, ("user", "item"), optional=("timestamp",)):
        if timed is None:
            timed = "timestamp" in row
        item = _id(row["item"])
        if item not in index:
            raise UserError(f"{path.name} line {lineno} refers to item {item!r}, which {items_name} does not list.")
        when = _time(row["timestamp"], path, lineno) if timed else 0.0
        per_user.setdefault(_id(row["user"]), []).append((when, lineno, index[item]))
    if not per_user:
        raise UserError(f"{path.name} has no interactions.")
    sequences = [np.asarray([i for _, _, i in sorted(events)], dtype=np.int64) for events in per_user.values()]
    return sequences, bool(timed)


def load(config: PrepareConfig) -> SourceData:
    if config.input is None:
        raise UserError("The interactions format reads --input <file> (user, item, timestamp); it has no download.")
    if config.items is None:
        raise UserError("The interactions format needs --items <file> with item and title columns.")
    interactions, items = Path(config.input).expanduser(), Path(config.items).expanduser()
    ids, titles, metadata = read_items(items)
    sequences, timed = read_interactions(interactions, {s: i for i, s in enumerate(ids)}, items.name)
    notes = [] if timed else [f"{interactions.name} has no timestamp column; file order is the time order."]
    return SourceData(
        titles=titles,
        splits=splits_from_sequences(sequences, len(titles), seed=config.seed, max_history=config.max_history),
        domain="generic",
        n_users=len(sequences),
        source_ids=ids,
        metadata=metadata if any(metadata) else None,
        source={
            "format": FORMAT,
            "input": str(interactions),
            "items": str(items),
            "files": {interactions.name: sha256_file(interactions), items.name: sha256_file(items)},
            "split_seed": config.seed,
        },
        notes=notes,
    )
