"""Fetching the official source files into the cache, and unpacking archives safely."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import UserError
from ..home import atomic_directory, cache_dir

# Where ``--download`` fetches each raw format from. Checksums are not pinned: the fetched file's
# sha256 is recorded in the prepared dataset's meta instead (``source.archive_sha256``).
OFFICIAL_URLS: dict[str, list[str]] = {
    "ml-100k": ["https://files.grouplens.org/datasets/movielens/ml-100k.zip"],
    "hetrec-lastfm": ["https://files.grouplens.org/datasets/hetrec2011/hetrec2011-lastfm-2k.zip"],
    "steam": [
        "https://cseweb.ucsd.edu/~wckang/steam_reviews.json.gz",
        "https://cseweb.ucsd.edu/~wckang/steam_games.json.gz",
    ],
}

_CHUNK = 1 << 20
# Unpacking stops past this many bytes: 100 times the archive (the official ones expand 3-4 times) and at
# least 64 MiB, so a small archive that expands to gigabytes (a "zip bomb") is refused, not written out.
MAX_EXPANSION_RATIO, MIN_EXPANSION_CAP = 100, 64 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_DATA_SUFFIXES = (".gz", ".json", ".jsonl", ".csv", ".tsv", ".dat", ".txt")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(value: str) -> str:
    value = value.strip().lower()
    if not _SHA256.match(value):
        raise UserError(f"The expected checksum {value!r} is not a sha256 (64 hexadecimal digits).")
    return value


def _file_name(url: str) -> str:
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", urllib.parse.unquote(name)).lstrip(".")
    return name or "download"


def _download_progress(total: int | None, name: str):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from ..console import err

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
    )
    return bar, bar.add_task(f"download {name}", total=total)


def fetch(url: str, cache_dir: Path, expected_sha256: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` into ``cache_dir`` (reusing an earlier download of the same address); return the file.

    The file is written under a temporary name and renamed once complete; with ``expected_sha256`` a
    mismatching download is deleted and refused.
    """
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise UserError(f"Cannot download {url!r}: only http, https and file addresses are supported.")
    expected = _check_sha256(expected_sha256) if expected_sha256 else None
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / _file_name(url)
    record = target.with_name(target.name + ".source.json")

    if target.is_file() and record.is_file():
        try:
            known = json.loads(record.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            known = {}
        if known.get("url") == url and known.get("sha256") and (expected is None or known["sha256"] == expected):
            if sha256_file(target) == known["sha256"]:
                return target

    part = target.with_name(f".{target.name}.part-{os.getpid()}")
    h = hashlib.sha256()
    try:
        try:
            response = urllib.request.urlopen(url, timeout=60)
        except urllib.error.HTTPError as exc:
            raise UserError(f"Downloading {url} failed: HTTP {exc.code} {exc.reason}.") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"Could not download {url}: {reason}.") from None
        with response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar, task = _download_progress(total, target.name) if progress else (None, None)
            try:
                if bar is not None:
                    bar.start()
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except OSError as exc:
                        raise UserError(f"The download of {url} was interrupted: {exc}.") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    h.update(chunk)
                    if bar is not None:
                        bar.advance(task, len(chunk))
            finally:
                if bar is not None:
                    bar.stop()
        digest = h.hexdigest()
        if expected is not None and digest != expected:
            raise UserError(
                f"The file downloaded from {url} has sha256 {digest}, not the expected {expected}; it was deleted."
            )
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    record.write_text(json.dumps({"url": url, "sha256": digest}) + "\n", encoding="utf-8")
    return target


def archive_kind(path: Path) -> str | None:
    """``"zip"``, ``"tar"`` or None for a plain (possibly gzip'd) data file."""
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    if name.endswith(_DATA_SUFFIXES):
        return None
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    try:
        return "tar" if tarfile.is_tarfile(path) else None
    except (OSError, EOFError, tarfile.TarError):
        return None


def _member_path(name: str, target: Path, archive: Path) -> Path:
    """Where an archive member lands under ``target``; refuses absolute paths and ``..``."""
    parts = re.split(r"[\\/]+", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise UserError(
            f"The archive {archive.name} holds an unsafe member {name!r} (absolute or outside the archive)."
        )
    dest = target.joinpath(*[p for p in parts if p not in ("", ".")])
    root = target.resolve()
    resolved = dest.resolve()
    if resolved != root and root not in resolved.parents:
        raise UserError(
            f"The archive {archive.name} holds an unsafe member {name!r} (absolute or outside the archive)."
        )
    return dest


def safe_extract(archive: Path, target: Path) -> None:
    """Unpack a zip or tar(.gz) archive into ``target``.

    Every member is checked before anything is written: absolute paths, ``..`` components, links and
    device files are refused, so a hostile archive cannot write outside ``target``.
    """
    archive, target = Path(archive), Path(target)
    kind = archive_kind(archive) or "zip"
    target.mkdir(parents=True, exist_ok=True)
    budget = _Budget(archive, max(MIN_EXPANSION_CAP, MAX_EXPANSION_RATIO * archive.stat().st_size))
    if kind == "zip":
        _extract_zip(archive, target, budget)
    else:
        _extract_tar(archive, target, budget)


class _Budget:
    """Counts the bytes written while unpacking, and refuses the archive once they pass the cap."""

    def __init__(self, archive: Path, cap: int):
        self.archive, self.cap, self.used = archive, cap, 0

    def copy(self, src, out) -> None:
        while chunk := src.read(_CHUNK):
            self.used += len(chunk)
            if self.used > self.cap:
                raise UserError(
                    f"The archive {self.archive.name} expands to more than {self.cap >> 20} MiB "
                    f"({MAX_EXPANSION_RATIO} times its size); refusing to unpack it."
                )
            out.write(chunk)


def _corrupt(archive: Path, kind: str, exc: BaseException) -> UserError:
    detail = str(exc).rstrip(".") or type(exc).__name__
    return UserError(
        f"The archive {archive.name} is not a readable {kind} archive ({detail}); delete it and download again."
    )


def _extract_zip(archive: Path, target: Path, budget: _Budget) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = []
            for info in zf.infolist():
                kind = stat.S_IFMT(info.external_attr >> 16)  # 0 where the archiver recorded no file type
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise UserError(
                        f"The archive {archive.name} holds {info.filename!r}, a link or device; refusing to unpack it."
                    )
                members.append((info, _member_path(info.filename, target, archive)))
            for info, dest in members:
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    budget.copy(src, out)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise _corrupt(archive, "zip", exc) from None


def _extract_tar(archive: Path, target: Path, budget: _Budget) -> None:
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = []
            for info in tf.getmembers():
                if not (info.isfile() or info.isdir()):
                    raise UserError(
                        f"The archive {archive.name} holds {info.name!r}, a link or device; refusing to unpack it."
                    )
                members.append((info, _member_path(info.name, target, archive)))
            for info, dest in members:
                if info.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(info)
                if src is None:
                    raise UserError(f"The archive {archive.name} member {info.name!r} cannot be read.")
                with src, open(dest, "wb") as out:
                    budget.copy(src, out)
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # a file-system error (disk full, permissions), not a bad archive
        raise _corrupt(archive, "tar", exc) from None


def unpack_cached(archive: Path, base: Path, digest: str | None = None) -> Path:
    """Unpack ``archive`` once into ``base/unpacked/<name>-<sha>/`` (atomically) and return that directory."""
    digest = digest or sha256_file(archive)
    unpacked = base / "unpacked" / f"{archive.name}-{digest[:12]}"
    if not (unpacked / ".complete").is_file():
        with atomic_directory(unpacked, overwrite=True) as tmp:
            safe_extract(archive, tmp)
            (tmp / ".complete").write_text(digest + "\n", encoding="utf-8")
    return unpacked


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def download_inputs(
    fmt: str, url: str | None = None, sha256: str | None = None, progress: bool = True
) -> tuple[list[Path], dict[str, Any]]:
    """Fetch a raw format's files into ``<cache>/downloads/<fmt>/`` and unpack archives.

    ``url`` (comma-separated for several files) replaces the official addresses; ``sha256`` (one per
    address) is the expected checksum. Returns the places to look for the format's files (unpacked
    directories and plain files) and the provenance to record in the dataset's meta.
    """
    urls = _split(url) or OFFICIAL_URLS.get(fmt, [])
    if not urls:
        raise UserError(f"The {fmt} format has no official download; pass --input or --url.")
    shas: list[str | None] = list(_split(sha256)) or [None] * len(urls)
    if len(shas) != len(urls):
        raise UserError(
            f"--sha256 gives {len(shas)} checksums for {len(urls)} download addresses; give one per address."
        )
    base = cache_dir() / "downloads" / fmt
    places: list[Path] = []
    digests: dict[str, str] = {}
    for u, expected in zip(urls, shas, strict=True):
        path = fetch(u, base, expected_sha256=expected, progress=progress)
        digest = sha256_file(path)
        digests[path.name] = digest
        if archive_kind(path) is None:
            places.append(path)
            continue
        places.append(unpack_cached(path, base, digest))
    source: dict[str, Any] = {
        "url": urls[0] if len(urls) == 1 else urls,
        "archive_sha256": next(iter(digests.values())) if len(digests) == 1 else digests,
    }
    return places, source
