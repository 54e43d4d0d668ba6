"""Item titles: cleaning (METHOD.md §2) and making duplicates distinguishable."""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence

_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")
_ARTICLE = re.compile(r"^(?P<body>.*?),\s*(?P<article>The|A|An|Les|Le|La|L'|Il|Das|Der|Die|El|Los|Las)$")
_SPACES = re.compile(r"\s+")


def clean_title(title: str) -> str:
    """Normalise whitespace and unicode, and strip control characters."""
    title = unicodedata.normalize("NFC", title)
    title = "".join(" " if ch.isspace() else ch for ch in title if ch.isspace() or unicodedata.category(ch)[0] != "C")
    return _SPACES.sub(" ", title).strip()


def split_year(title: str) -> tuple[str, str | None]:
    """``"Toy Story (1995)"`` → ``("Toy Story", "1995")``; titles without a year are returned unchanged."""
    m = _YEAR.search(title)
    if not m:
        return title, None
    return title[: m.start()].rstrip(), m.group(1)


def movie_title(raw: str) -> tuple[str, str | None]:
    """Clean a GroupLens movie title: drop the year, move a trailing article to the front.

    ``"Usual Suspects, The (1995)"`` → ``("The Usual Suspects", "1995")``. Titles like ``"unknown"`` or
    ``"... (V)"`` pass through (the "(V)" marks a video release and is kept: it is part of the name).
    """
    title, year = split_year(clean_title(raw))
    # Alternative titles in brackets: "City of Lost Children, The (Cité des enfants perdus, La)".
    alt = ""
    m = re.match(r"^(?P<main>[^()]*?)\s*(?P<alt>\([^()]*\))$", title)
    if m and not m.group("alt") == "(V)":
        title, alt = m.group("main"), " " + m.group("alt")
    m = _ARTICLE.match(title)
    if m:
        article = m.group("article")
        sep = "" if article.endswith("'") else " "
        title = f"{article}{sep}{m.group('body')}"
    return (title + alt).strip(), year


def disambiguate(titles: Sequence[str], hints: Sequence[str | None] | None = None) -> list[str]:
    """Make every title unique (case-insensitively), so that a title names exactly one item.

    Within a group of equal titles, an item whose hint (for example its year) no other member shares is
    named ``title (hint)``; the rest are numbered ``#2``, ``#3``, … in id order (the first keeps its
    plain title when no hinted member did).
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(titles):
        groups[t.casefold()].append(i)
    out = list(titles)
    taken = {t.casefold() for t in titles}
    for members in groups.values():
        if len(members) == 1:
            continue
        hint_of = {i: (hints[i] if hints else None) for i in members}
        counts = defaultdict(int)
        for h in hint_of.values():
            if h:
                counts[h.casefold()] += 1
        rest = []
        for i in members:
            h = hint_of[i]
            candidate = f"{titles[i]} ({h})" if h and counts[h.casefold()] == 1 else None
            if candidate and candidate.casefold() not in taken:
                out[i] = candidate
                taken.add(candidate.casefold())
            else:
                rest.append(i)
        n = 2  # the first of the rest keeps the plain title
        for i in rest[1:]:
            while f"{titles[i]} #{n}".casefold() in taken:
                n += 1
            out[i] = f"{titles[i]} #{n}"
            taken.add(out[i].casefold())
            n += 1
    return out
