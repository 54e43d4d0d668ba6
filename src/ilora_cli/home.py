"""Where named artifacts live: ``$ILORA_HOME`` (default ``~/.ilora``)."""

from __future__ import annotations

import os
import re
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


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` and rename it into place on success.

    On any exception the temporary directory is removed, so no half-written artifact is left behind.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise UserError(f"The output {target} already exists; pass --overwrite to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)
