"""A restricted unpickler for the LLaRA/iLoRA processed files (pandas DataFrame pickles).

Pickles can run arbitrary code when loaded. Even after the user opts in with ``--trust-pickle``, we
only admit the few pandas/numpy/builtin globals that a DataFrame of lists and integers needs, so a
crafted file cannot call ``os.system`` or anything else.
"""

from __future__ import annotations

import importlib
import pickle
import struct
from pathlib import Path
from typing import Any

from ..errors import UserError

# (module, name) pairs a DataFrame pickle of this format references, across pandas 1-3 and numpy 1-2.
# Each is a data constructor; none can reach the interpreter, the file system or a subprocess.
_ALLOWED: set[tuple[str, str]] = {
    ("pandas.core.frame", "DataFrame"),
    ("pandas.core.series", "Series"),
    ("pandas.core.internals.managers", "BlockManager"),
    ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas.core.internals.blocks", "new_block"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    # pandas 3 pickles: public names, and Arrow-backed string arrays for the column labels
    ("pandas", "DataFrame"),
    ("pandas", "Series"),
    ("pandas", "Index"),
    ("pandas", "RangeIndex"),
    ("pandas", "StringDtype"),
    ("pandas.arrays", "ArrowStringArray"),
    ("pyarrow.lib", "_restore_array"),
    ("pyarrow.lib", "type_for_alias"),
    ("pyarrow.lib", "py_buffer"),
    ("builtins", "bytearray"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "slice"),
}
# numpy 2 moved numpy.core to numpy._core; import the new home to avoid deprecation shims.
_RENAMED = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy.core.numeric": "numpy._core.numeric"}


class Refused(pickle.UnpicklingError):
    """A pickle that names a global outside the allowed ones."""


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise Refused(f"{module}.{name}"[:120])
        try:
            mod = importlib.import_module(_RENAMED.get(module, module))
        except ImportError:
            mod = importlib.import_module(module)
        return getattr(mod, name)


def load_dataframe(path: Path):
    """Load a pandas DataFrame pickle through :class:`RestrictedUnpickler`."""
    import pandas as pd

    try:
        with open(path, "rb") as fh:
            obj = RestrictedUnpickler(fh).load()
    except Refused as exc:
        raise UserError(f"{path} was refused: it references {exc}, which a LLaRA data file never needs.") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
        MemoryError,
        RecursionError,
        ImportError,
        struct.error,
    ) as exc:
        raise UserError(f"{path} is not a readable pandas pickle ({type(exc).__name__}).") from None
    if not isinstance(obj, pd.DataFrame):
        raise UserError(f"{path} does not hold a pandas DataFrame.")
    return obj
