"""Errors a user can cause. The CLI prints them as one sentence and exits with code 2."""

from __future__ import annotations

import itertools
import json
from typing import Any


class UserError(Exception):
    """Bad input, a missing file, a refused option combination: anything the user can fix."""

    exit_code = 2


def describe(value: Any, depth: int = 3) -> str:
    """``value`` as short JSON for an error sentence: lists and objects below ``depth`` levels shown as ``[...]``
    and ``{...}``, long ones cut, so that no input is too deep or too long to name (``json.dumps`` of a history
    entry nested 950 deep ran out of stack)."""
    if isinstance(value, (list, dict)) and value and depth <= 0:
        return "[...]" if isinstance(value, list) else "{...}"
    if isinstance(value, list):
        parts = [describe(v, depth - 1) for v in value[:3]]
        return "[" + ", ".join(parts + ["..."] * (len(value) > 3)) + "]"
    if isinstance(value, dict):
        parts = [f"{describe(str(k))}: {describe(v, depth - 1)}" for k, v in itertools.islice(value.items(), 3)]
        return "{" + ", ".join(parts + ["..."] * (len(value) > 3)) + "}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"  # str() of one of over 4,300 digits raises
    if value is None or isinstance(value, (bool, int, float, str)):
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:56] + '..."'
    return type(value).__name__
