"""``steam``: McAuley's Steam reviews and games (``steam_reviews.json.gz``, ``steam_games.json.gz``).

Both files hold one Python dict literal per line (not JSON), read with ``ast.literal_eval``, which
evaluates literals only. A user's sequence is the games they reviewed, each once, by review date
(file order within a day). Items are the reviewed games that have a title, numbered 0..N-1 in
ascending source id order.
"""

from __future__ import annotations

import ast
import datetime
import json
import re
from array import array
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import UserError
from ..source import SourceData, splits_from_sequences
from ..titles import clean_title
from ._raw import id_sort_key, locate_inputs, open_text

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from ..prepare import PrepareConfig

FORMAT = "steam"
REVIEWS_FILE = "steam_reviews.json.gz"
GAMES_FILE = "steam_games.json.gz"
_YEAR = re.compile(r"\b(1[89]\d\d|2\d\d\d)\b")
_METADATA_KEYS = ("genres", "developer", "publisher", "release_date")
_STR = r"'(?:[^'\\\n]|\\.)*'" + "|" + r'"(?:[^"\\\n]|\\.)*"'  # a string literal as repr() writes it
_PLAIN = r"(?:'[a-z_]+': [-+.\w]+, )*"  # keys with number / True / False / None values
_REVIEW_PREFIX = re.compile(
    rf"^\{{'username': ({_STR}), {_PLAIN}'product_id': '([^'\\]*)', {_PLAIN}'date': '([^'\\]*)', "
)


def parse_line(line: str, path: Path, lineno: int) -> dict[str, Any]:
    """One record: a Python dict literal, or JSON as a fallback."""
    try:
        record = ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{path.name} line {lineno} is neither a Python dict literal nor JSON.") from None
    if not isinstance(record, dict):
        raise UserError(f"{path.name} line {lineno} is not a dict (one record per line is expected).")
    return record


def records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, dict)`` per non-empty line."""
    for lineno, line in open_text(path):
        if line.strip():
            yield lineno, parse_line(line, path, lineno)


def review_fields(path: Path) -> Iterator[tuple[int, str, str, str]]:
    """``(line number, username, product id, date)`` per review; empty strings where a field is absent.

    Released lines begin ``{'username': ..., 'hours': 0.1, 'products': 41, 'product_id': '725280',
    'page_order': 0, 'date': '2017-12-17', 'text': ...``. Such a prefix is matched token by token (no
    free text can hide in it), which is ~30x faster than evaluating the whole line with its review
    text; any other line is evaluated in full.
    """
    for lineno, line in open_text(path):
        if not line.strip():
            continue
        m = _REVIEW_PREFIX.match(line)
        if m and line.rstrip().endswith("}"):
            user = m.group(1)
            user = ast.literal_eval(user) if "\\" in user else user[1:-1]
            yield lineno, user.strip(), m.group(2).strip(), m.group(3)
            continue
        record = parse_line(line, path, lineno)
        user = _text(record.get("username", record.get("user_id")))
        yield lineno, user, _text(record.get("product_id")), _text(record.get("date"))


def _text(value: Any) -> str:
    return str(value).strip() if value is not None else ""


def _plain(value: Any) -> str | list[str]:
    """Metadata as JSON-friendly text (literals may hold tuples, sets or numbers)."""
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return str(value)


def read_games(path: Path) -> dict[str, tuple[str, str | None, dict[str, Any]]]:
    """game id -> (title, release year, metadata), for games that have an id and a title."""
    games: dict[str, tuple[str, str | None, dict[str, Any]]] = {}
    for _, record in records(path):
        game = _text(record.get("id"))
        title = clean_title(_text(record.get("app_name")) or _text(record.get("title")))
        if not game or not title or game in games:
            continue
        meta = {k: _plain(record[k]) for k in _METADATA_KEYS if record.get(k) not in (None, "", [])}
        year = _YEAR.search(_text(record.get("release_date")))
        games[game] = (title, year.group(1) if year else None, meta)
    return games


def read_reviews(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str], int]:
    """Reviews as arrays: user code, game code, day (ordinal), plus the code books and a skip count.

    Codes are assigned in order of first appearance; arrays stay compact for the millions of reviews
    of the full release.
    """
    user_codes: dict[str, int] = {}
    game_codes: dict[str, int] = {}
    users, games, days = array("q"), array("q"), array("q")
    skipped = 0
    for lineno, user, game, date in review_fields(path):
        if not (user and game and date):
            skipped += 1
            continue
        try:
            day = datetime.date.fromisoformat(date).toordinal()
        except ValueError:
            raise UserError(f"{path.name} line {lineno}: the date {date!r} is not YYYY-MM-DD.") from None
        users.append(user_codes.setdefault(user, len(user_codes)))
        games.append(game_codes.setdefault(game, len(game_codes)))
        days.append(day)
    if not users:
        raise UserError(f"{path.name} has no reviews with a username, product_id and date.")
    return (
        np.frombuffer(users, np.int64),
        np.frombuffer(games, np.int64),
        np.frombuffer(days, np.int64),
        list(user_codes),
        list(game_codes),
        skipped,
    )


def load(config: PrepareConfig) -> SourceData:
    inputs = locate_inputs(config, FORMAT, required=(REVIEWS_FILE, GAMES_FILE))
    games = read_games(inputs.files[GAMES_FILE])
    users, game_codes, days, user_names, game_ids, skipped = read_reviews(inputs.files[REVIEWS_FILE])
    notes = list(inputs.notes)
    if skipped:
        notes.append(f"{skipped} review(s) without a username, product_id or date were skipped.")

    named = sorted((g for g in game_ids if g in games), key=id_sort_key)
    if not named:
        raise UserError(f"None of the reviewed games has a title in {GAMES_FILE}.")
    untitled = len(game_ids) - len(named)
    if untitled:
        notes.append(f"{untitled} reviewed game(s) have no title in {GAMES_FILE}; their reviews were dropped.")
    item_of_code = np.full(len(game_ids), -1, dtype=np.int64)
    index = {g: i for i, g in enumerate(named)}
    for code, g in enumerate(game_ids):
        item_of_code[code] = index.get(g, -1)
    items = item_of_code[game_codes]

    # Users in name order, each user's reviews by day with file order kept within a day.
    user_rank = np.argsort(np.argsort(np.asarray(user_names, dtype=object), kind="stable"), kind="stable")
    keep = items >= 0
    users, items, days = user_rank[users[keep]], items[keep], days[keep]
    order = np.lexsort((np.arange(len(items)), days, users))
    users, items = users[order], items[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    sequences = []
    repeats = 0
    for seq in np.split(items, starts[1:]):
        _, first = np.unique(seq, return_index=True)
        repeats += len(seq) - len(first)
        sequences.append(seq[np.sort(first)])
    if repeats:
        notes.append(f"{repeats} repeated review(s) of a game by the same user were dropped (the first is kept).")

    return SourceData(
        titles=[games[g][0] for g in named],
        splits=splits_from_sequences(sequences, len(named), seed=config.seed, max_history=config.max_history),
        domain="games",
        n_users=len(sequences),
        title_hints=[games[g][1] for g in named],
        source_ids=named,
        metadata=[games[g][2] for g in named],
        source=dict(inputs.source, split_seed=config.seed),
        notes=notes,
    )
