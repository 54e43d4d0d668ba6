"""Console output: human-readable text and progress on stderr, JSON documents on stdout.

On a terminal, progress is a rich bar. Anywhere else (a job log, ``2>file``, CI) a bar would print nothing
until it ends, so progress becomes plain lines instead: at most one every ``ILORA_PROGRESS_SECONDS`` seconds
(default 10) and a last one when the work is done.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# Logs and CI capture stderr without a terminal, where rich would fall back to 80 columns and cut the
# metric tables: give them room. No markup: what is printed is often the user's (titles, paths, messages that
# quote settings), and markup would swallow anything in square brackets; styles are set with Text instead.
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160, markup=False)

PROGRESS_SECONDS = "ILORA_PROGRESS_SECONDS"  # environment variable: seconds between plain progress lines


def labelled(label: str, text: str, style: str = "yellow") -> None:
    """``label: text`` on stderr, the label styled and the text exactly as given (never read as markup)."""
    err.print(Text.assemble((f"{label}:", style), " ", str(text)), soft_wrap=True)


def progress(disable: bool = False, plain: bool | None = None, **kwargs: Any) -> Progress | PlainProgress:
    """A progress display on stderr: a rich bar on a terminal, plain lines elsewhere (``plain`` forces one).

    Both take ``add_task(description, total=, completed=, info=)``, ``update(task, completed=, advance=,
    total=, info=)`` and ``advance(task, k)``; ``info`` is free text shown after the counts (loss, lr, ...).
    """
    if plain is None:
        plain = not err.is_terminal
    if plain:
        return PlainProgress(disable=disable)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=err,
        transient=False,
        disable=disable,
        **kwargs,
    )


class _Task:
    def __init__(self, description: str, total: float | None, completed: float, info: str):
        self.description, self.total, self.completed, self.info = description, total, completed, info
        self.started = self.last_line = time.monotonic()
        self.first = completed  # done before this display started (a resumed run): not part of the rate
        self.finished_printed = False


class PlainProgress:
    """Progress as plain lines — ``train 3/10 (30%)  loss 0.69  elapsed 0:00:12  ETA 0:00:28`` — for output
    that is not a terminal: one line when ``interval`` seconds have passed since the last, and one at the end."""

    def __init__(self, disable: bool = False, interval: float | None = None, console: Console | None = None):
        self.disable = disable
        self.interval = float(os.environ.get(PROGRESS_SECONDS, 10)) if interval is None else interval
        self.console = console or err
        self.tasks: list[_Task] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            for task_id, task in enumerate(self.tasks):
                if not task.finished_printed and task.completed > task.first:
                    self._print(task_id)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        self.tasks.append(_Task(description, total, completed, str(fields.get("info", ""))))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        if "info" in fields:
            task.info = str(fields["info"])
        done = task.total is not None and task.completed >= task.total
        if done and not task.finished_printed:
            self._print(task_id)
            task.finished_printed = True
        elif not done and time.monotonic() - task.last_line >= self.interval:
            self._print(task_id)

    def line(self, task_id: int) -> str:
        """The progress line of a task as it stands."""
        task = self.tasks[task_id]
        elapsed = time.monotonic() - task.started
        count = f"{_number(task.completed)}"
        eta = ""
        if task.total:
            count += f"/{_number(task.total)} ({100 * task.completed / task.total:.0f}%)"
            rate = (task.completed - task.first) / elapsed if elapsed > 0 else 0.0
            if task.completed < task.total and rate > 0:
                eta = f"  ETA {_clock((task.total - task.completed) / rate)}"
        info = f"  {task.info}" if task.info else ""
        return f"{task.description} {count}{info}  elapsed {_clock(elapsed)}{eta}"

    def _print(self, task_id: int) -> None:
        self.tasks[task_id].last_line = time.monotonic()
        if not self.disable:
            self.console.print(self.line(task_id), markup=False, highlight=False, soft_wrap=True)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def quiet_libraries() -> None:
    """Silence what the libraries print that a user of this tool cannot act on, through their own switches:
    tqdm bars (transformers' GGUF dequantisation and "Loading weights", hub downloads), transformers' advisory
    logs, bitsandbytes' note about an optional CPU kernel, and FutureWarnings about library internals.
    Environment variables the user has set win; call before the libraries are imported."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def print_json(doc: Any) -> None:
    """Print one JSON document on stdout."""
    sys.stdout.write(json_text(doc, indent=2, ensure_ascii=True) + "\n")
    sys.stdout.flush()


def json_text(doc: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    """``doc`` as strict JSON. Python's json writes NaN and infinities as ``NaN`` and ``Infinity``, which no JSON
    parser but Python's accepts: they are written as null instead, with a note on stderr saying how many."""
    doc, replaced = _finite(_plain(doc))
    if replaced:
        err.print(
            f"note: {replaced} number{'s' if replaced > 1 else ''} in the JSON output "
            f"{'were' if replaced > 1 else 'was'} not finite (NaN or infinite) and "
            f"{'are' if replaced > 1 else 'is'} written as null.",
            markup=False,
            highlight=False,
        )
    return json.dumps(doc, indent=indent, ensure_ascii=ensure_ascii, allow_nan=False)


def _plain(doc: Any) -> Any:
    """``doc`` with numpy scalars and arrays as Python numbers and lists."""
    return json.loads(json.dumps(doc, default=_json_default))


def _finite(doc: Any) -> tuple[Any, int]:
    """``doc`` with every non-finite float replaced by None, and how many were."""
    if isinstance(doc, float):
        return (doc, 0) if math.isfinite(doc) else (None, 1)
    if isinstance(doc, dict):
        pairs = [(k, *_finite(v)) for k, v in doc.items()]
        return {k: v for k, v, _ in pairs}, sum(n for _, _, n in pairs)
    if isinstance(doc, list):
        pairs = [_finite(v) for v in doc]
        return [v for v, _ in pairs], sum(n for _, n in pairs)
    return doc, 0


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
