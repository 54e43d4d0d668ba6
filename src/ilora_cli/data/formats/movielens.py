"""``ml-100k``: the GroupLens MovieLens-100K directory (``u.data``, ``u.item``, ``u.genre``).

Item id = GroupLens movie id − 1, for all movies in ``u.item`` (rated or not). A user's sequence is
their rated movies ordered by (time, movie id); users are split 8:1:1 the LLaRA way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...errors import UserError
from ..source import SourceData, splits_from_sequences
from ..titles import movie_title
from ._raw import locate_inputs, open_text, parse_int

if TYPE_CHECKING:
    from pathlib import Path

    from ..prepare import PrepareConfig

FORMAT = "ml-100k"
# u.genre of the official release, used when the file is absent.
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def _separator_hint(line: str, expected: str) -> str:
    for sep, name in ((",", "commas"), (";", "semicolons"), ("|", "'|'"), ("\t", "tabs"), (" ", "spaces")):
        if sep != expected and sep in line:
            return f" (it looks separated by {name})"
    return ""


def read_genres(path: Path | None) -> list[str]:
    if path is None:
        return list(GENRES)
    genres: dict[int, str] = {}
    for lineno, line in open_text(path, "latin-1"):
        if not line.strip():
            continue
        name, sep, index = line.rpartition("|")
        if not sep:
            raise UserError(f"u.genre line {lineno} is not of the form name|index.")
        genres[parse_int(index, "genre index", path, lineno)] = name
    if sorted(genres) != list(range(len(genres))):
        raise UserError("u.genre's indices must run from 0 without gaps.")
    return [genres[i] for i in range(len(genres))]


def read_items(path: Path, genres: list[str]) -> tuple[list[str], list[str | None], list[dict]]:
    """Titles (cleaned), title hints (release years) and metadata, by item id (GroupLens id − 1)."""
    by_id: dict[int, tuple[str, str | None, dict]] = {}
    for lineno, line in open_text(path, "latin-1"):  # the official u.item is latin-1
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 2:
            raise UserError(f"u.item line {lineno} is not '|'-separated{_separator_hint(line, '|')}.")
        movie = parse_int(fields[0], "movie id", path, lineno)
        if movie in by_id:
            raise UserError(f"u.item lists movie id {movie} twice (line {lineno}).")
        title, year = movie_title(fields[1])
        release = fields[2].strip() if len(fields) > 2 else ""
        if year is None and release[-4:].isdigit():
            year = release[-4:]
        meta: dict = {"source_title": fields[1]}
        if release:
            meta["release_date"] = release
        flags = fields[-len(genres) :] if len(fields) >= 5 + len(genres) else []
        if flags:
            meta["genres"] = [g for g, f in zip(genres, flags, strict=True) if f.strip() == "1"]
        by_id[movie] = (title or fields[1].strip(), year, meta)
    if not by_id:
        raise UserError(f"{path.name} lists no movies.")
    expected = range(1, len(by_id) + 1)
    if sorted(by_id) != list(expected):
        gap = next(i for i in expected if i not in by_id)
        raise UserError(f"u.item's movie ids must run from 1 to {len(by_id)}; id {gap} is missing.")
    rows = [by_id[i] for i in expected]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def read_ratings(path: Path, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item id, time) arrays of ``u.data``; item ids already shifted to 0-based."""
    users: list[int] = []
    items: list[int] = []
    times: list[int] = []
    for lineno, line in open_text(path, "latin-1"):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise UserError(
                f"u.data line {lineno} is not four tab-separated fields: user, item, rating and time"
                f"{_separator_hint(line, chr(9))}."
            )
        user = parse_int(fields[0], "user id", path, lineno)
        movie = parse_int(fields[1], "movie id", path, lineno)
        if not 1 <= movie <= n_items:
            raise UserError(f"u.data line {lineno} rates movie {movie}, which u.item does not list.")
        users.append(user)
        items.append(movie - 1)
        times.append(parse_int(fields[3], "timestamp", path, lineno))
    if not users:
        raise UserError(f"{path.name} has no ratings.")
    return np.asarray(users, np.int64), np.asarray(items, np.int64), np.asarray(times, np.int64)


def user_sequences(users: np.ndarray, items: np.ndarray, times: np.ndarray) -> list[np.ndarray]:
    """One time-ordered item sequence per distinct user (ascending user id); ties broken by item id."""
    order = np.lexsort((items, times, users))  # last key is primary: user, then time, then item
    users, items = users[order], items[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    return np.split(items, starts[1:])


def load(config: PrepareConfig) -> SourceData:
    inputs = locate_inputs(config, FORMAT, required=("u.data", "u.item"), optional=("u.genre",))
    genres = read_genres(inputs.files.get("u.genre"))
    titles, hints, metadata = read_items(inputs.files["u.item"], genres)
    users, items, times = read_ratings(inputs.files["u.data"], len(titles))
    sequences = user_sequences(users, items, times)
    source = dict(inputs.source, split_seed=config.seed)
    return SourceData(
        titles=titles,
        splits=splits_from_sequences(sequences, len(titles), seed=config.seed, max_history=config.max_history),
        domain="movies",
        n_users=len(sequences),
        title_hints=hints,
        source_ids=[str(i + 1) for i in range(len(titles))],
        metadata=metadata,
        source=source,
        notes=inputs.notes,
    )
