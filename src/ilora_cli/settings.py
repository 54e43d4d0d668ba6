"""Every setting of a command, read from its config dataclass: name, type, default and the comment beside the
field (which states the allowed values). ``ilora COMMAND --help`` lists them, ``--print-config`` prints the
resolved values, and the shell completes ``key=`` from them.

The source is read with ``ast`` rather than imported, so that ``--help`` does not wait for torch to load;
a default that is not a literal is taken from the imported class instead.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import io
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

# command -> "module:ConfigClass"
CONFIGS = {
    "prepare": "ilora_cli.data.prepare:PrepareConfig",
    "encode": "ilora_cli.encoders.train:EncodeConfig",
    "train": "ilora_cli.training.config:TrainConfig",
    "eval": "ilora_cli.evaluation.evaluate:EvalConfig",
    "recommend": "ilora_cli.evaluation.recommend:RecommendConfig",
    "serve": "ilora_cli.serving.config:ServeConfig",
    "export": "ilora_cli.exporting:ExportConfig",
    "ablate": "ilora_cli.ablation.config:AblateConfig",
}

_UNRESOLVED = object()


@dataclass
class Setting:
    name: str
    type: str  # the annotation as written, e.g. "int | None"
    default: Any
    help: str  # the field's comment (allowed values, meaning)


@cache
def settings(target: str) -> tuple[Setting, ...]:
    """The settings of ``module:Class`` in field order."""
    module, cls_name = target.split(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"module {module} not found")
    source = Path(spec.origin).read_text(encoding="utf-8")
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls_name)
    comments = _comments(source)
    fields = [s for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    out = []
    for i, stmt in enumerate(fields):
        # The comment on the field's line, continued by comment-only lines up to the next field.
        end = fields[i + 1].lineno if i + 1 < len(fields) else stmt.end_lineno + 1
        text = [comments[ln] for ln in range(stmt.end_lineno, end) if ln in comments]
        out.append(
            Setting(
                name=stmt.target.id,
                type=ast.get_source_segment(source, stmt.annotation) or "",
                default=_default(stmt.value),
                help=" ".join(text),
            )
        )
    if any(s.default is _UNRESOLVED for s in out):
        cls = getattr(importlib.import_module(module), cls_name)
        defaults = {f.name: f for f in cls.__dataclass_fields__.values()}
        for s in out:
            if s.default is _UNRESOLVED:
                f = defaults[s.name]
                s.default = f.default_factory() if callable(f.default_factory) else f.default
    return tuple(out)


def _comments(source: str) -> dict[int, str]:
    """Line number -> comment text (without '#')."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string.lstrip("#").strip()
    return found


def _default(value: ast.expr | None) -> Any:
    if value is None:
        return _UNRESOLVED
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        for kw in value.keywords:
            if kw.arg == "default_factory" and isinstance(kw.value, ast.Name) and kw.value.id in ("list", "dict"):
                return [] if kw.value.id == "list" else {}
        return _UNRESOLVED
    try:
        return ast.literal_eval(value)
    except ValueError:
        return _UNRESOLVED


def show_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "[]"
    if value == "":
        return '""'
    return str(value)


def settings_table(target: str):
    """A rich table of the settings, for the help screen."""
    from rich import box
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False, expand=False)
    table.add_column("key", style="bold cyan", no_wrap=True)
    table.add_column("type", style="yellow", no_wrap=True)
    table.add_column("default", no_wrap=True)
    table.add_column("meaning and allowed values")
    for s in settings(target):
        table.add_row(s.name, Text(s.type.replace("Path", "path")), Text(show_default(s.default)), Text(s.help))
    return Panel(
        table,
        title="Settings: key=value on the command line, key: value in --config FILE.yaml",
        title_align="left",
        border_style="dim",
        box=box.ROUNDED,
    )


class SettingsCommand(TyperCommand):
    """A command whose help ends with every setting of its config (``config_target``)."""

    config_target: str = ""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help = paragraphs(self.help)

    def format_help(self, ctx, formatter) -> None:
        super().format_help(ctx, formatter)
        if self.config_target:
            from rich.console import Console

            Console().print(settings_table(self.config_target))


def paragraphs(text: str | None) -> str | None:
    """A docstring's paragraphs each on one line, so that the help wraps them to the terminal: the line breaks of
    the source would otherwise stay where they are and leave a word alone on a line."""
    if not text:
        return text
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


def command_class(command: str) -> type[TyperCommand]:
    """The command class that lists ``command``'s settings in its help."""
    return type(f"{command.title()}Command", (SettingsCommand,), {"config_target": CONFIGS[command]})


def complete_overrides(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of ``key=value``: the keys of the command's settings."""
    target = getattr(ctx.command, "config_target", "")
    if not target or "=" in incomplete:
        return []
    return [f"{s.name}=" for s in settings(target) if s.name.startswith(incomplete)]


def dump_config(config: Any) -> str:
    """The resolved configuration as YAML (the same keys ``--config`` reads)."""
    import yaml

    from .config import to_dict

    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
