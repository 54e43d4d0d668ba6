"""A prepared dataset is checked before it is used: ``meta.json`` against its schema, every split table against
the sizes ``meta.json`` states, and every split's arrays against the checksum written with them.

A truncated ``meta.json``, an edited ``draws`` or ``pad_id``, a deleted or truncated split: each is one sentence
naming the dataset and what is wrong, instead of a traceback from json, numpy or pyarrow, or, where the edit
happened to fit (``draws`` 2 → 1 with 6 → 12 candidates reshapes the same numbers), silently wrong rows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

# meta.json: key -> accepted types
_META = {
    "name": (str,),
    "n_items": (int,),
    "pad_id": (int,),
    "max_history": (int,),
    "n_candidates": (int,),
    "draws": (int,),
    "seed": (int,),
    "splits": (dict,),
    "checksum": (str,),
    "checksums": (dict,),
}


FORMAT_VERSION = 1  # of a prepared dataset's files; a newer one is refused


def sha256_arrays(*arrays: np.ndarray) -> str:
    """The checksum of a split's arrays (dtype, shape and bytes of each), as meta.json records it."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def damaged(path: Path, problem: str) -> UserError:
    return UserError(
        f"The prepared dataset {path} is damaged or was edited ({problem}); prepare it again with --overwrite."
    )


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of the dataset in ``path``, checked against its schema."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise damaged(path, "meta.json is not valid JSON") from None
    problem = meta_problem(meta)
    if problem is not None:
        raise damaged(path, problem)
    if not (path / "items").is_dir():
        raise damaged(path, "the items table is missing")
    for name in meta["splits"]:  # found now, not when the split is first read (a val split: after training)
        _table(path, meta, name)
    return meta


def meta_problem(meta: Any) -> str | None:
    """What is wrong with a ``meta.json`` document, or None."""
    if not isinstance(meta, dict):
        return "meta.json is not a JSON object"
    for key, types in _META.items():
        value = meta.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            return f"meta.json's {key} is {'missing' if key not in meta else 'of the wrong type'}"
    if isinstance(meta.get("format_version"), int) and meta["format_version"] > FORMAT_VERSION:
        return "it was written by a newer version of ilora"
    if meta["n_items"] < 1 or meta["pad_id"] != meta["n_items"]:
        return f"meta.json's pad_id {meta['pad_id']} is not its item count {meta['n_items']}"
    if meta["max_history"] < 1 or meta["n_candidates"] < 2 or meta["draws"] < 1:
        return "meta.json's sizes are out of range"
    splits = meta["splits"]
    if "train" not in splits or not all(isinstance(n, int) and n >= 0 for n in splits.values()):
        return "meta.json's splits are not row counts with a train split"
    if not all(isinstance(meta["checksums"].get(s), str) for s in splits):
        return "meta.json lacks the checksum of a split"
    return None


def split_table(dataset, name: str):
    """The pyarrow table of a split, after checking that it is readable and holds what ``meta.json`` says."""
    return _table(dataset.path, dataset.meta, name)


def _table(path: Path, meta: dict[str, Any], name: str):
    """The split's table (memory-mapped: opening it reads its schema, not its rows), checked against meta.json:
    row count, columns, and the fixed sizes of the history and candidate lists."""
    from datasets import load_from_disk

    folder = path / name
    if not folder.is_dir():
        raise damaged(path, f"the {name} split is missing")
    try:
        table = load_from_disk(str(folder)).data.table
    except (OSError, ValueError, KeyError, TypeError) as exc:  # pyarrow's errors are OSError or ValueError
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise damaged(path, f"the {name} split cannot be read: {first}") from None
    if table.num_rows != meta["splits"][name]:
        raise damaged(path, f"the {name} split has {table.num_rows} rows, meta.json says {meta['splits'][name]}")
    widths = {"seq": [meta["max_history"]]}
    if name != "train":
        widths["candidates"] = [meta["draws"], meta["n_candidates"]]
    for column in ("sample_id", "seq", "len_seq", "next", *widths):
        if column not in table.column_names:
            raise damaged(path, f"the {name} split has no {column} column")
    for column, sizes in widths.items():
        if _list_sizes(table.schema.field(column).type) != sizes:
            raise damaged(path, f"the {name} split's {column} lists do not have the sizes meta.json says")
    return table


def _list_sizes(arrow_type) -> list[int]:
    """The sizes of a fixed-size list type, outermost first (a nested list of draws x candidates: two)."""
    sizes = []
    while hasattr(arrow_type, "list_size"):
        sizes.append(int(arrow_type.list_size))
        arrow_type = arrow_type.value_type
    return sizes


def verified(dataset, split):
    """``split`` (a SplitData just read) after checking its arrays against the checksum written with them."""
    parts = [split.seq, split.len_seq, split.next]
    if split.candidates is not None:
        parts.append(split.candidates)
    if sha256_arrays(*parts) != dataset.meta["checksums"][split.name]:
        raise damaged(dataset.path, f"the {split.name} split does not match its checksum")
    return split


def checked_titles(dataset) -> list[str]:
    """The item titles, after checking that there is one per item."""
    from datasets import load_from_disk

    try:
        titles = list(load_from_disk(str(dataset.path / "items"))["title"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise damaged(dataset.path, f"the items table cannot be read: {first}") from None
    if len(titles) != dataset.n_items or not all(isinstance(t, str) for t in titles):
        raise damaged(dataset.path, f"the items table does not hold {dataset.n_items} titles")
    return titles


# -- what preparing a dataset may cost -----------------------------------------------------------------------------

MAX_CANDIDATES_PER_ROW = 100_000  # draws x candidates stored per val/test row (5 draws of 20,000 candidates)
BYTES_PER_CANDIDATE = 32  # peak memory per stored candidate id while drawing and writing (28 measured, plus room)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where it is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_candidate_table(rows: int, draws: int, candidates: int, available: int | None = None) -> None:
    """Refuse, before drawing, a candidate table that would need more than half of the available memory
    (``ml-100k --draws 1000 --candidates 1600`` ran out of memory at 3.6 GB before)."""
    need = rows * draws * candidates * BYTES_PER_CANDIDATE
    available = available_memory() if available is None else available
    if available is not None and need > available // 2:
        raise UserError(
            f"{rows:,} val/test rows x {draws} draws x {candidates} candidates would take about {need / 2**30:.1f} GiB "
            f"of memory to draw and store, more than half of the {available / 2**30:.1f} GiB available; "
            "lower --draws or --candidates."
        )
