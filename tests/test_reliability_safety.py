"""Safety: crafted pickles cannot run code even with --trust-pickle, names from data or flags cannot make the
tool write outside $ILORA_HOME or --output, and the source never loads data unsafely (a grep of the source)."""

from __future__ import annotations

import builtins
import importlib
import os
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ilora_cli.data.prepare import PrepareConfig, prepare
from ilora_cli.errors import UserError

from conftest import run_cli

SRC = Path(__file__).resolve().parents[1] / "src" / "ilora_cli"


class _Reduce:
    """An object that unpickles as ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, object]:
    frame = pd.DataFrame({"seq": [[0, 1, 2]], "len_seq": [3], "next": [4]})
    return {
        "os.system": _Reduce(os.system, f"touch {marker}"),
        "builtins.eval": _Reduce(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": _Reduce(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "subprocess.Popen": _Reduce(subprocess.Popen, ["touch", str(marker)]),
        "importlib.import_module": _Reduce(importlib.import_module, "os"),
        "nested reduce inside a frame": {"frame": frame, "evil": [_Reduce(os.system, f"touch {marker}")]},
        "allowed constructor fed a reduce": _Reduce(pd.DataFrame, _Reduce(os.system, f"touch {marker}")),
    }


@pytest.mark.parametrize("payload", list(_payloads(Path("/x"))))
def test_a_crafted_pickle_is_refused_even_with_trust_pickle(payload, tmp_path, ilora_home):
    marker = tmp_path / "pwned"
    d = tmp_path / "llara"
    d.mkdir()
    rng = np.random.default_rng(0)
    rows = [{"seq": rng.choice(40, 3, replace=False).tolist() + [40] * 7, "len_seq": 3, "next": 5} for _ in range(20)]
    pd.DataFrame(rows).to_pickle(d / "train_data.df")
    (d / "id2name.txt").write_text("".join(f"{i}::A{i}\n" for i in range(40)))
    (d / "Val_data.df").write_bytes(pickle.dumps(_payloads(marker)[payload]))
    with pytest.raises(UserError, match="refused|not a readable|does not hold"):
        prepare(PrepareConfig(dataset="x", format="llara", input=d, trust_pickle=True))
    assert not marker.exists()
    assert not (ilora_home / "datasets" / "x").exists()


BAD_NAMES = ["../escape", "/tmp/abs", "a/b", "..", ".hidden", "x\\y", "", "-rf", "x\x00y", "é/../../z"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_cannot_leave_the_home(name, ilora_home):
    from ilora_cli.home import dataset_dir, encoder_dir, run_dir

    for where in (dataset_dir, encoder_dir, run_dir):
        with pytest.raises(UserError, match="not valid"):
            where(name)


def test_commands_given_hostile_names_write_nothing_outside_the_home(tmp_path):
    home = tmp_path / "home"
    outside_before = sorted(p.name for p in tmp_path.iterdir())
    for args in (
        ("prepare", "--dataset", "../escape"),
        ("encode", "--dataset", "synthetic", "--name", "../../escape"),
        ("train", "--name", "../escape"),
    ):
        r = run_cli(*args, home=home)
        assert r.returncode == 2 and "not valid" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == outside_before
    # an item title that looks like a path is only ever a title
    r = run_cli("prepare", "--dataset", "ok", "synthetic_users=20", home=home)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*outside_before, "home"})


def _source_lines():
    for path in sorted(SRC.rglob("*.py")):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            yield path.relative_to(SRC.parent), lineno, code


# What the grep flags: a name and a test of one line of code (comments stripped). The planted lines below run
# through these same checks, so that the grep and its own test cannot drift apart.
UNSAFE = {
    "torch.load without weights_only=True": lambda code: "torch.load(" in code and "weights_only=True" not in code,
    "yaml.load without the safe loader": lambda code: bool(re.search(r"\byaml\.(load|unsafe_load|full_load)\(", code)),
    "eval/exec": lambda code: bool(re.search(r"(?<![\w.])(eval|exec)\(", code)),
    "pickle outside the restricted unpickler": lambda code: bool(re.search(r"\bpickle\.(loads?|Unpickler)\b", code)),
    "a pickle written": lambda code: bool(re.search(r"\b(pickle\.dump|to_pickle|torch\.save)\(", code)),
}
ALLOWED = {"pickle outside the restricted unpickler": "safe_pickle.py"}  # check -> the one file it may appear in


def _unsafe(where: Path, code: str) -> list[str]:
    return [name for name, found in UNSAFE.items() if found(code) and ALLOWED.get(name) != where.name]


def test_the_source_never_loads_data_unsafely():
    problems = [(where, lineno, name) for where, lineno, code in _source_lines() for name in _unsafe(where, code)]
    assert not problems, problems


def test_the_grep_finds_what_it_looks_for():
    """The check above is not vacuous: each planted line is flagged by the check meant for it, through the same
    patterns; safe forms are not."""
    planted = {
        "torch.load(f)": "torch.load without weights_only=True",
        "yaml.load(text)": "yaml.load without the safe loader",
        "yaml.unsafe_load(text)": "yaml.load without the safe loader",
        "x = eval(data)": "eval/exec",
        "exec(code)": "eval/exec",
        "pickle.loads(b)": "pickle outside the restricted unpickler",
        "df.to_pickle(p)": "a pickle written",
        "torch.save(state, f)": "a pickle written",
    }
    here = Path("module.py")
    for code, name in planted.items():
        assert _unsafe(here, code) == [name], code
    for safe in ("model.eval()", "torch.load(f, weights_only=True)", "yaml.safe_load(text)", "yaml.compose(text)"):
        assert _unsafe(here, safe) == [], safe
    assert _unsafe(Path("safe_pickle.py"), "pickle.Unpickler(fh)") == []  # the restricted unpickler itself
