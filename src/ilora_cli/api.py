"""The Python API: the commands as functions, with settings validated exactly as on the command line.

Each function takes a config object (``TrainConfig(...)``) and/or settings by keyword; keywords override the
object's fields. Either way the values go through the same checks as ``--config`` and ``key=value`` (types
coerced, unknown keys and bad values refused with :class:`ilora_cli.errors.UserError`), and the functions
return the documents that ``--json`` prints.

    from ilora_cli import prepare, encode, train, evaluate, recommend
    prepare(format="synthetic")
    encode(dataset="synthetic")
    run = train(dataset="synthetic", experts=4, max_steps=10)
    print(evaluate(runs=[run["run_dir"]], encoder=True)["metrics"])
    print(recommend(run["run_dir"], [[3, 17, 42]], top_k=5)[0]["recommendations"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


def _config(cls: type[C], config: C | None, settings: dict[str, Any]) -> C:
    """``cls`` from a config object and keyword settings, through the command line's resolution and checks."""
    from .config import resolve, to_dict
    from .errors import UserError

    if config is not None and not isinstance(config, cls):
        raise UserError(f"Expected a {cls.__name__} (or settings as keywords); got {type(config).__name__}.")
    values = {**(to_dict(config) if config is not None else {}), **settings}
    return resolve(cls, None, {k: v for k, v in values.items() if v is not None})


def prepare(config=None, /, **settings: Any) -> dict[str, Any]:
    """``ilora prepare``: write a prepared dataset; returns its meta document (with ``path``)."""
    from .data.prepare import PrepareConfig
    from .data.prepare import prepare as run

    return run(_config(PrepareConfig, config, settings))


def encode(config=None, /, **settings: Any) -> dict[str, Any]:
    """``ilora encode``: train and save the collaborative encoder; returns its summary and metrics."""
    from .encoders.train import EncodeConfig
    from .encoders.train import encode as run

    return run(_config(EncodeConfig, config, settings))


def train(config=None, /, **settings: Any) -> dict[str, Any]:
    """``ilora train``: train an iLoRA run; returns the summary (``run_dir``, steps, final loss, ...)."""
    from .training.config import TrainConfig
    from .training.trainer import train as run

    return run(_config(TrainConfig, config, settings))


def evaluate(config=None, /, **settings: Any) -> dict[str, Any]:
    """``ilora eval``: evaluate runs (``runs=[...]``) and/or the encoder on the frozen candidate draws (the runs'
    cards record the results)."""
    from .card import record_results
    from .evaluation.evaluate import EvalConfig
    from .evaluation.evaluate import evaluate as run

    config = _config(EvalConfig, config, settings)
    result = run(config)
    record_results(config.runs, result)
    return result


def recommend(run: str | Path, histories: list[list[Any]], /, **settings: Any) -> list[dict[str, Any]]:
    """``ilora recommend`` for each history (a list of item ids or titles); the run is loaded once.

    Settings as on the command line (``top_k``, ``candidates`` (a JSON file), ``retrieve``, ``device``, ...).
    """
    from .errors import UserError
    from .evaluation.recommend import RecommendConfig, Recommender, history_problem

    if not isinstance(histories, list):
        raise UserError(f"histories must be a list of histories; got {type(histories).__name__}.")
    for i, history in enumerate(histories):
        problem = history_problem(history)
        if problem is not None:
            raise UserError(f"histories[{i}]: {problem}.")
    if not isinstance(run, (str, Path)):
        raise UserError(f"run must be a run directory or name; got {run!r}.")
    # The command line reads histories from --user-history; here they are given, so that setting is a stand-in.
    config = _config(RecommendConfig, None, {"run": str(run), "user_history": "<given in Python>", **settings})
    recommender = Recommender(config)
    return [recommender.recommend(h) for h in histories]


def export(config=None, /, **settings: Any) -> dict[str, Any]:
    """``ilora export``: a self-contained copy of a run (``run=``, ``output=``, ``merge=`` for K = 1)."""
    from .exporting import ExportConfig
    from .exporting import export as run

    return run(_config(ExportConfig, config, settings))


def serve(config=None, /, **settings: Any) -> int:
    """``ilora serve``: answer recommendation requests over HTTP until SIGTERM (it blocks); returns the exit code.

    Settings as on the command line (``run``, ``host``, ``port``, ``api_key``, ``max_batch``, ...); needs the
    ``serve`` extra.
    """
    from .serving.config import ServeConfig
    from .serving.server import serve as run

    return run(_config(ServeConfig, config, settings))
