"""ilora: instance-wise LoRA sequential recommendation with language models.

The commands as Python functions (see :mod:`ilora_cli.api`)::

    from ilora_cli import prepare, encode, train, evaluate, recommend
"""

from typing import Any

__version__ = "0.1.0"

from .api import encode, evaluate, export, prepare, recommend, serve, train  # noqa: E402  (light: imports lazily)

# Config classes, imported on first use (their modules load torch).
_CONFIGS = {
    "PrepareConfig": "ilora_cli.data.prepare",
    "EncodeConfig": "ilora_cli.encoders.train",
    "TrainConfig": "ilora_cli.training.config",
    "EvalConfig": "ilora_cli.evaluation.evaluate",
    "RecommendConfig": "ilora_cli.evaluation.recommend",
    "ExportConfig": "ilora_cli.exporting",
    "ServeConfig": "ilora_cli.serving.config",
}

__all__ = ["__version__", "prepare", "encode", "train", "evaluate", "recommend", "export", "serve", *_CONFIGS]


def __getattr__(name: str) -> Any:
    if name in _CONFIGS:
        import importlib

        return getattr(importlib.import_module(_CONFIGS[name]), name)
    raise AttributeError(f"module 'ilora_cli' has no attribute {name!r}")
