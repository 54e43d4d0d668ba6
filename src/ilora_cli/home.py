"""Where named artifacts live: ``$ILORA_HOME`` (default ``~/.ilora``)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def ilora_home() -> Path:
    """The data home: ``$ILORA_HOME`` or ``~/.ilora``."""
    return Path(os.environ.get("ILORA_HOME") or Path.home() / ".ilora").expanduser()


def check_name(name: str, what: str = "name") -> str:
    if not _NAME.match(name):
        raise UserError(
            f"The {what} {name!r} is not valid: use letters, digits, '.', '_' or '-', starting with a letter or digit."
        )
    return name


def dataset_dir(name: str) -> Path:
    return ilora_home() / "datasets" / check_name(name, "dataset name")


def encoder_dir(name: str) -> Path:
    return ilora_home() / "encoders" / check_name(name, "encoder name")


def run_dir(name: str) -> Path:
    return ilora_home() / "runs" / check_name(name, "run name")


def cache_dir() -> Path:
    return ilora_home() / "cache"


def fsync_file(path: Path) -> None:
    """Flush a file's data to the disk (a rename is durable only after what it renames is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (the names created, renamed or removed in it) to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # file systems or platforms that cannot open a directory have nothing to flush
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; their entries are flushed with the files
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def write_text_durably(path: Path, text: str) -> None:
    """Write ``path`` through a temporary beside it, flushed to the disk before it replaces the old one."""
    path = Path(path)
    part = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(part, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    fsync_dir(path.parent)


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def clean_stale_temporaries(target: Path) -> list[Path]:
    """Remove what killed writes of ``target`` left beside it (``.NAME.tmp-PID-*``, ``.NAME.old-PID``) when
    the process that made them is gone; returns what was removed. Names without a process id are from
    older versions and are always stale."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if not p.name.startswith(f".{target.name}."):
            continue
        rest = p.name[len(target.name) + 2 :]
        if not rest.startswith(("tmp-", "old-")):
            continue
        m = _TEMPORARY.match(p.name)
        if m and m.group("name") == target.name and _alive(int(m.group("pid"))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# Write failures that are the disk's, not a bug: full, over quota, a file-size limit, read-only.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def disk_error(exc: BaseException) -> str | None:
    """The reason, when ``exc`` is a write that the disk refused (safetensors reports those as its own
    error type, with the OS error number in the message); None for anything else."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return os.strerror(exc.errno)
    if type(exc).__name__ == "SafetensorError":
        for code in _DISK_ERRNOS:
            if f"(os error {code})" in str(exc):
                return os.strerror(code)
    return None


def append_json_line(path: Path, record: dict, then: str) -> None:
    """Append one JSON line to a log. A full disk is one sentence ending in ``then`` (what to do next), and the
    log is cut back to its last whole line, so that whatever reads it later (``--resume``) still can."""
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError as exc:
        reason = disk_error(exc)
        if reason is None:
            raise
        os.truncate(path, size)
        raise UserError(f"Could not write the log {path} ({reason}); {then}") from None


# -- what --overwrite may replace ------------------------------------------------------------------------

# What a finished run is made of, and what an export copies of it: one list, so that a new weight file is
# known to --overwrite, export and the manifest alike (exporting.KEEP).
RUN_CONTENTS = (
    "ilora.json",
    "config.yaml",
    "adapter",
    "projector.safetensors",
    "user_projector.safetensors",
    "gate.safetensors",
    "head.safetensors",
    "encoder",
    "items.json",
    "README.md",
    "plots",
    "logs",
    "evaluations.json",
    "manifest.json",
)

# kind -> (the files or folders that mark it as written by this tool, every name it may hold). --overwrite
# replaces only a directory that holds one of the markers and nothing else: a folder of other things given as
# --output (a parent of the home, a project folder) is refused instead of deleted.
ARTIFACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepared dataset": (("meta.json",), ("meta.json", "items", "train", "val", "test", "extra_candidates")),
    "encoder": (("encoder.json",), ("encoder.json", "encoder.safetensors")),
    "run": (
        ("config.yaml", "ilora.json", "logs"),  # logs/ is the first thing a new run creates
        (*RUN_CONTENTS, "checkpoints", "README.md.tmp", "evaluations.tmp", "predictions-*.jsonl"),
    ),
    "export": (("ilora.json",), (*RUN_CONTENTS, "merged")),
    "ablation": (
        ("ablation.json",),
        ("ablation.json", "runs", "cells", "logs", "data", "encoders", "results.json", "results.csv", "plots"),
    ),
    "gradient-conflict analysis": (("gradient-conflict.json",), ("gradient-conflict.json", "*.png")),
}


def _ours(name: str, allowed: tuple[str, ...]) -> bool:
    """Whether an entry's name is one the artifact holds, or a temporary this tool writes (``.X.tmp...``)."""
    import fnmatch

    if name.startswith(".") and (".tmp" in name or ".old-" in name):
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed)


def replace_problem(target: Path, kind: str) -> str | None:
    """Why ``--overwrite`` must not replace ``target`` as a ``kind`` (see :data:`ARTIFACTS`), or None when it may:
    it is absent, an empty folder, or a folder holding one of the kind's markers and nothing else."""
    target = Path(target)
    if target.is_symlink():
        return f"{target} is a symbolic link, not {_a(kind)}"
    if not target.exists():
        return None
    if not target.is_dir():
        return f"{target} is a file, not {_a(kind)}"
    markers, allowed = ARTIFACTS[kind]
    names = sorted(p.name for p in target.iterdir())
    if not names:
        return None
    foreign = [n for n in names if not _ours(n, allowed)]
    if foreign:
        return f"{target} holds {foreign[0]!r}, which no {kind} of this tool holds"
    if not any(n in markers for n in names):
        return f"{target} has none of the files that mark {_a(kind)} ({', '.join(markers)})"
    return None


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def check_replaceable(target: Path, kind: str) -> None:
    """Refuse, in one sentence, to let ``--overwrite`` replace anything but a ``kind`` this tool wrote."""
    problem = replace_problem(target, kind)
    if problem is not None:
        raise UserError(
            f"--overwrite replaces only {_a(kind)} written by ilora, and {problem}; "
            "choose another output or move it away yourself."
        )


def _remove(path: Path) -> None:
    """Remove a file, a link or a directory tree (what a replaced target was)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# Errors of a folder that cannot be written at all: read-only, or not the user's.
_UNWRITABLE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def unwritable(exc: BaseException) -> str | None:
    """The reason, when ``exc`` says a place cannot be written (permission, read-only); None otherwise."""
    if isinstance(exc, OSError) and exc.errno in _UNWRITABLE_ERRNOS:
        return os.strerror(exc.errno)
    return None


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` and rename it into place on success.

    On any exception the temporary directory is removed, so no half-written artifact is left behind.
    Everything is flushed to the disk before the rename and the rename itself after it, so a power loss
    leaves the old artifact or the new one, never a renamed directory of empty files. Temporaries that
    killed writes of the same target left behind are removed first. With ``kind``, an existing target is
    replaced only when it is an artifact of that kind (:func:`check_replaceable`).
    """
    target = Path(target)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise UserError(f"The output {target} already exists; pass --overwrite to replace it.")
    if kind is not None:
        check_replaceable(target, kind)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as exc:  # a place that cannot hold a folder (/proc/x, below a file, read-only, a full disk)
        reason = unwritable(exc) or disk_error(exc) or (os.strerror(exc.errno) if exc.errno else type(exc).__name__)
        raise UserError(f"Could not write {target} ({reason}); nothing was written.") from None
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = disk_error(exc)
        if reason is None:
            raise
        kept = "the previous one is unchanged" if target.exists() else "nothing was left behind"
        raise UserError(f"Could not write {target} ({reason}); {kept}.") from None
    if target.exists() or target.is_symlink():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        _remove(trash)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)


# -- manifests: what a finished artifact holds, to verify it before it is used -----------------------------

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, files: list[str] | None = None, extra: dict | None = None) -> dict:
    """Write ``manifest.json``: the size and SHA-256 of ``files`` (paths relative to ``directory``; default:
    every file under it), plus the ``extra`` keys. Write it last: an artifact whose manifest checks out is
    complete."""
    directory = Path(directory)
    if files is None:
        files = sorted(
            str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
        )
    doc = {
        "format_version": 1,
        "files": {f: {"size": (directory / f).stat().st_size, "sha256": _sha256(directory / f)} for f in files},
        **(extra or {}),
    }
    write_text_durably(directory / MANIFEST, json.dumps(doc, indent=1) + "\n")
    return doc


def manifest_problem(directory: Path) -> str | None:
    """Why ``directory`` does not match its manifest (a missing, truncated or altered file), or None."""
    directory = Path(directory)
    f = directory / MANIFEST
    if not f.is_file():
        return f"{MANIFEST} is missing"
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
        files = doc["files"]
        entries = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is not a valid manifest"
    for name, size, digest in entries:
        path = directory / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"{MANIFEST} names a file outside the directory ({name!r})"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum"
    return None
