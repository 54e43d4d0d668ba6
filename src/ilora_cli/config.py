"""Typed configs: dataclass defaults, then a YAML file, then command-line flags, then ``key=value``."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UserError

C = TypeVar("C")
# libyaml's safe loader where PyYAML was built with it: the same types, 5x faster on a large file (a grid's list).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` through :data:`_SafeLoader`."""
    loader = _SafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML-parsed value to the field's annotated type, or raise a UserError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except UserError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{name} must be one of {', '.join(map(str, args))}; got {value!r}.")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # validate_at=96: a list of one
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list; got {value!r}.")
        inner = args[0] if args else Any
        return [_coerce(name, v, inner) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{name} must be true or false; got {value!r}.")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"{name} must be an integer; got {value!r}.")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{name} must be an integer; got {value!r}.") from None
    if annotation is float:
        if isinstance(value, bool):
            raise UserError(f"{name} must be a number; got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a number; got {value!r}.") from None
    if annotation is str:
        if isinstance(value, (dict, list, tuple, bool)):
            raise UserError(f"{name} must be a string; got {value!r}.")
        return str(value)
    if annotation is Path:
        if isinstance(value, (dict, list, tuple, bool)) or value is None:
            raise UserError(f"{name} must be a path; got {value!r}.")
        return Path(value) if isinstance(value, Path) else Path(str(value))
    return value


# YAML 1.1 reads 007 as 7, yes as True and 2024-01-01 as a date. A setting that holds text (a name, a path) keeps
# what was written instead; a quoted value is a string already, and a null token leaves an optional one unset.
_NULL_TOKENS = ("~", "null", "Null", "NULL")


def _text_field(annotation: Any) -> bool:
    """Whether a field holds text: str or Path, optionally None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = [a for a in (typing.get_args(annotation) if union else (annotation,)) if a is not type(None)]
    return bool(kinds) and all(a in (str, Path) for a in kinds)


def as_written(value: Any, written: str | None, annotation: Any) -> Any:
    """``value`` as YAML read it, or the text ``written`` where YAML turned a text setting into something else."""
    if written is None or not _text_field(annotation) or isinstance(value, (str, list, dict)):
        return value
    if value is None and written.strip() in _NULL_TOKENS:
        return None
    return written.strip()


def written_overrides(pairs: list[str] | None) -> dict[str, str]:
    """The text of each ``key=value`` pair's value, as written."""
    return {p.partition("=")[0].strip(): p.partition("=")[2] for p in pairs or [] if "=" in p}


def written_scalars(path: Path | None, section: str | None = None) -> dict[str, str]:
    """The text of each plain (unquoted) scalar value of a YAML config file's top level, or of its ``section``."""
    if path is None:
        return {}
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=_SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError, OSError, RecursionError):
        return {}  # load_yaml reports it
    if section is not None and isinstance(node, yaml.MappingNode):
        node = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == section), None)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {
        k.value: v.value
        for k, v in node.value
        if isinstance(k, yaml.ScalarNode) and isinstance(v, yaml.ScalarNode) and not v.style  # plain: None or ""
    }


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Turn ``["lr=1e-3", "model=gru4rec"]`` into a dict of YAML-parsed values."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"The override {pair!r} is not of the form key=value.")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_yaml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The config file {path} does not exist.")
    try:
        data = _safe_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"The config file {path} is not valid YAML: {str(exc).splitlines()[0]}.") from None
    except RecursionError:
        raise UserError(f"The config file {path} is nested too deeply to be a config.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"The config file {path} must be a mapping of key: value pairs.")
    return data


def resolve(
    cls: type[C],
    config_file: Path | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> C:
    """Build ``cls`` from its defaults, a YAML file, explicit flags (None = not given) and overrides."""
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    for source, layer, written in (
        ("config file", load_yaml(config_file), written_scalars(config_file)),
        ("flags", {k: v for k, v in (flags or {}).items() if v is not None}, {}),
        ("overrides", parse_overrides(overrides), written_overrides(overrides)),
    ):
        unknown = sorted(map(str, set(layer) - set(types_)))
        if unknown:
            raise UserError(
                f"Unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in the {source}; "
                f"valid keys are: {', '.join(sorted(types_))}."
            )
        for key, value in layer.items():
            values[key] = _coerce(key, as_written(value, written.get(key), types_[key]), types_[key])
    try:
        config = cls(**values)
    except TypeError as exc:
        raise UserError(f"Incomplete configuration: {exc}.") from None
    check = getattr(config, "validate", None)
    if check is not None:
        check()
    return config


MAX_SEED = 2**32 - 1  # numpy's and accelerate's seeding refuse more (a ValueError deep inside, before)


def check_seed(config: Any, field: str = "seed") -> None:
    """Refuse a seed outside [0, 2³² − 1] in one sentence."""
    value = getattr(config, field)
    if value is not None and not 0 <= value <= MAX_SEED:
        raise UserError(f"{field} must be from 0 to {MAX_SEED} (2^32 - 1); got {value}.")


def check_minimums(config: Any, minimums: dict[str, int]) -> None:
    """Refuse a field below its minimum with one sentence; ``None`` (unset optional) passes."""
    for field, minimum in minimums.items():
        value = getattr(config, field)
        if value is not None and value < minimum:
            raise UserError(f"{field} must be at least {minimum}; got {value}.")


def check_range(
    config: Any,
    field: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Refuse a number outside [low, high] (``*_open``: the bound itself excluded), NaN or an infinity, with one
    sentence; ``None`` (an unset optional) passes."""
    value = getattr(config, field)
    if value is None:
        return
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    ok = math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if ok:
        return
    if low is not None and high is not None:
        want = f"in {lo}, {hi}"
    elif low == 0 and low_open:
        want = "positive"
    elif low is not None:
        want = f"{'greater than' if low_open else 'at least'} {low:g}"
    elif high is not None:
        want = f"{'less than' if high_open else 'at most'} {high:g}"
    else:
        want = "a finite number"
    raise UserError(f"{field} must be {want}; got {value}.")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-friendly dict of a config dataclass."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else v
    return out
