"""What the raw formats share: finding their files (given or downloaded) and reading text strictly."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import UserError
from ...home import cache_dir
from ..download import archive_kind, download_inputs, sha256_file, unpack_cached

if TYPE_CHECKING:
    from ..prepare import PrepareConfig


SEARCH_DEPTH = 2  # how deep below an --input directory to look for the files (an unpacked archive: any depth)


@dataclass
class RawInputs:
    """The located input files of one raw format, and their provenance for the dataset's meta."""

    files: dict[str, Path]  # expected file name -> where it was found (absent for missing optional files)
    source: dict[str, Any] = field(default_factory=dict)  # format, input or url, file checksums
    notes: list[str] = field(default_factory=list)


def _find(name: str, places: Sequence[Path], max_depth: int | None) -> Path | None:
    """The shallowest file called ``name`` in ``places`` (files, or folders searched ``max_depth`` deep)."""
    for place in places:
        if place.is_file():
            if place.name == name:
                return place
            continue
        found = []
        for folder, dirs, files in os.walk(place):
            depth = len(Path(folder).relative_to(place).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__MACOSX")))
            if max_depth is not None and depth >= max_depth:
                dirs[:] = []
            if name in files:
                found.append(Path(folder) / name)
        if found:
            return min(found, key=lambda p: (len(p.parts), str(p)))
    return None


def locate_inputs(config: PrepareConfig, fmt: str, required: Sequence[str], optional: Sequence[str] = ()) -> RawInputs:
    """Find a raw format's files under ``--input`` (a directory, one of them, an archive) or download them."""
    notes: list[str] = []
    source: dict[str, Any] = {"format": fmt}
    if config.input is not None:
        given = Path(config.input).expanduser()
        if not given.exists():
            raise UserError(f"The input {given} does not exist.")
        if given.is_dir():
            places, depth = [given], SEARCH_DEPTH
        elif given.name in (*required, *optional):
            places, depth = [given.parent], 0
        elif archive_kind(given) is not None:
            places, depth = [unpack_cached(given, cache_dir() / "downloads" / fmt)], None
        else:
            raise UserError(
                f"The {fmt} format reads a directory (or an archive) holding {', '.join(required)}; {given} is not one."
            )
        source["input"] = str(given)
        if config.sha256:
            notes.append("--sha256 applies to downloads only and was ignored for --input.")
    elif config.download:
        places, fetched = download_inputs(fmt, url=config.url, sha256=config.sha256)
        depth = None
        source.update(fetched)
    else:
        raise UserError(
            f"The {fmt} format needs its source files: pass --input <directory> or --download to fetch them."
        )

    files: dict[str, Path] = {}
    for name in (*required, *optional):
        path = _find(name, places, depth)
        if path is not None:
            files[name] = path
        elif name in required:
            where = ", ".join(str(p) for p in places)
            raise UserError(f"The {fmt} file {name} is missing (looked in {where}).")
    source["files"] = {name: sha256_file(p) for name, p in files.items()}
    return RawInputs(files=files, source=source, notes=notes)


def open_text(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line without newline)``, decoding strictly (gzip'd when the name ends in .gz).

    Text that is not valid ``encoding`` raises a UserError naming the file and line.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and encoding == "utf-8" and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                yield lineno, raw.decode(encoding).rstrip("\r\n")
    except UnicodeDecodeError:
        raise UserError(f"{path.name} is not {encoding.upper()} text (line {lineno} cannot be decoded).") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise UserError(f"{path.name} is not a readable gzip file ({exc}).") from None


INT64_MAX = 2**63 - 1


def parse_int(value: str, what: str, path: Path, lineno: int) -> int:
    """An integer that fits the int64 tables it is stored in (ids, timestamps)."""
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"{path.name} line {lineno}: the {what} {value!r} is not an integer.") from None
    if not -INT64_MAX <= number <= INT64_MAX:
        raise UserError(f"{path.name} line {lineno}: the {what} {value[:40]!r} is out of range.")
    return number


def id_sort_key(value: str) -> tuple[int, int, str]:
    """Order source ids numerically where they are integers, else as text after the numbers."""
    v = value.strip()
    if v.lstrip("-").isdigit():
        return (0, int(v), "")
    return (1, 0, v)
