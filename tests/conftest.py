"""Shared fixtures: an isolated $ILORA_HOME and tiny in-process datasets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def ilora_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "ilora-home"
    monkeypatch.setenv("ILORA_HOME", str(home))
    return home


def run_cli(*args: str, home: Path, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``ilora`` in a subprocess (the real entry point, exit codes and stream separation)."""
    env = dict(os.environ, ILORA_HOME=str(home), TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "ilora_cli.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def run_main(*args: str, home: Path) -> subprocess.CompletedProcess:
    """Run the ``ilora`` entry point (``cli.main``: the same parsing, exit codes and stream separation as
    ``run_cli``) in this process, with stdout and stderr captured: a new interpreter costs about 4 s of imports a
    call here. A traceback is raised, not printed, so a test that expects one sentence fails on it. Commands
    that must run in a fresh process (kills, DDP, the first load of the libraries) use ``run_cli``."""
    import contextlib
    import io

    from ilora_cli import cli

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_home = sys.argv, os.environ.get("ILORA_HOME")
    sys.argv, os.environ["ILORA_HOME"] = ["ilora", *args], str(home)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        if saved_home is None:
            os.environ.pop("ILORA_HOME", None)
        else:
            os.environ["ILORA_HOME"] = saved_home
    return subprocess.CompletedProcess(["ilora", *args], code, out.getvalue(), err.getvalue())


def cycle_source(n_items: int = 30, n_users: int = 60, length: int = 12, seed: int = 0):
    """A SourceData where every user walks i → i+1 (mod n_items) from a random start."""
    from ilora_cli.data.source import SourceData, splits_from_sequences

    rng = np.random.default_rng(seed)
    seqs = [(rng.integers(n_items) + np.arange(length)) % n_items for _ in range(n_users)]
    titles = [f"Item {chr(65 + i % 26)}{i}" for i in range(n_items)]
    return SourceData(titles=titles, splits=splits_from_sequences(seqs, n_items, seed=seed), n_users=n_users)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A prepared cycle dataset, a trained SASRec and a tiny Llama backbone directory, in one $ILORA_HOME."""
    from ilora_cli.data.prepared import write_prepared
    from ilora_cli.encoders.train import EncodeConfig, encode

    from tiny import tiny_llama, word_tokenizer

    home = tmp_path_factory.mktemp("world")
    old = os.environ.get("ILORA_HOME")
    os.environ["ILORA_HOME"] = str(home)
    try:
        src = cycle_source(n_items=30, n_users=40, length=12)
        write_prepared(src, "cyc", home / "datasets" / "cyc", n_candidates=6, draws=2, seed=3)
        encode(EncodeConfig(dataset="cyc", hidden_size=16, epochs=2, quiet=True))
        tok = word_tokenizer(src.titles)
        model = tiny_llama(len(tok), seed=0)
        backbone = home / "tiny-backbone"
        model.save_pretrained(backbone)
        tok.save_pretrained(backbone)
    finally:
        if old is None:
            os.environ.pop("ILORA_HOME", None)
        else:
            os.environ["ILORA_HOME"] = old
    return home
