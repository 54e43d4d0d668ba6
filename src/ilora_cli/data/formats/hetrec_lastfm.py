"""``hetrec-lastfm``: the HetRec 2011 Last.fm-2k release (tag assignments with timestamps, artist names).

A user's sequence is the artists they tagged, each once, ordered by the first time they tagged it
(ties by artist id). Only artists that occur in the tag assignments become items, numbered 0..N-1 in
ascending source id order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...errors import UserError
from ..source import SourceData, splits_from_sequences
from ..titles import clean_title
from ._raw import id_sort_key, locate_inputs, open_text, parse_int

if TYPE_CHECKING:
    from pathlib import Path

    from ..prepare import PrepareConfig

FORMAT = "hetrec-lastfm"
TAGS_FILE = "user_taggedartists-timestamps.dat"
ARTISTS_FILE = "artists.dat"


def _tab_fields(line: str, path: Path, lineno: int, minimum: int, columns: str) -> list[str]:
    fields = line.split("\t")
    if len(fields) < minimum:
        hint = " (it looks comma-separated)" if "," in line else ""
        raise UserError(f"{path.name} line {lineno} is not tab-separated {columns}{hint}.")
    return fields


def read_tag_times(path: Path) -> dict[int, dict[str, int]]:
    """user id -> {artist id: first tag time}, users and artists in file order."""
    first: dict[int, dict[str, int]] = {}
    for lineno, line in open_text(path):
        if not line.strip():
            continue
        if lineno == 1 and not line.split("\t")[0].strip().lstrip("-").isdigit():
            _tab_fields(line, path, lineno, 4, "userID, artistID, tagID, timestamp")
            continue  # the header
        fields = _tab_fields(line, path, lineno, 4, "userID, artistID, tagID, timestamp")
        user = parse_int(fields[0].strip(), "user id", path, lineno)
        artist = str(parse_int(fields[1].strip(), "artist id", path, lineno))
        stamp = parse_int(fields[3].strip(), "timestamp", path, lineno)
        seen = first.setdefault(user, {})
        if artist not in seen or stamp < seen[artist]:
            seen[artist] = stamp
    if not first:
        raise UserError(f"{path.name} has no tag assignments.")
    return first


def read_artists(path: Path) -> dict[str, tuple[str, str]]:
    """artist id -> (name, url). The official file is UTF-8."""
    artists: dict[str, tuple[str, str]] = {}
    for lineno, line in open_text(path):
        if not line.strip():
            continue
        if lineno == 1 and not line.split("\t")[0].strip().lstrip("-").isdigit():
            _tab_fields(line, path, lineno, 2, "id, name, url, pictureURL")
            continue  # the header
        fields = _tab_fields(line, path, lineno, 2, "id, name, url, pictureURL")
        artist = str(parse_int(fields[0].strip(), "artist id", path, lineno))
        artists.setdefault(artist, (fields[1], fields[2].strip() if len(fields) > 2 else ""))
    return artists


def load(config: PrepareConfig) -> SourceData:
    inputs = locate_inputs(config, FORMAT, required=(TAGS_FILE, ARTISTS_FILE))
    first = read_tag_times(inputs.files[TAGS_FILE])
    artists = read_artists(inputs.files[ARTISTS_FILE])
    notes = list(inputs.notes)

    used = {a for seen in first.values() for a in seen}
    unnamed = sorted(used - set(artists), key=id_sort_key)
    if unnamed:
        notes.append(
            f"{len(unnamed)} tagged artist(s) have no name in {ARTISTS_FILE} and were dropped (e.g. id {unnamed[0]})."
        )
    named = sorted(used - set(unnamed), key=id_sort_key)
    if not named:
        raise UserError(f"None of the tagged artists has a name in {ARTISTS_FILE}.")
    index = {a: i for i, a in enumerate(named)}

    sequences = []
    for user in sorted(first):
        seen = [(t, int(a), a) for a, t in first[user].items() if a in index]
        if seen:
            sequences.append(np.asarray([index[a] for _, _, a in sorted(seen)], dtype=np.int64))
    titles = [clean_title(artists[a][0]) for a in named]
    return SourceData(
        titles=titles,
        splits=splits_from_sequences(sequences, len(titles), seed=config.seed, max_history=config.max_history),
        domain="music",
        n_users=len(sequences),
        source_ids=named,
        metadata=[{"url": artists[a][1]} if artists[a][1] else {} for a in named],
        source=dict(inputs.source, split_seed=config.seed),
        notes=notes,
    )
