"""Faults: ``prepare``, ``encode`` and ``train`` killed with SIGKILL at random moments (a fixed seed).

After every kill the artifact is absent or complete and verified (no damaged checkpoint, no half-written
dataset or encoder); a re-run (``--resume`` for training) succeeds; and the final result equals an
uninterrupted run: the dataset checksum, the encoder's tensors, the run's weights digest. Also: the same
seed and inputs give identical metrics and weights on CPU (determinism).

Each random kill lands in the command's work: after the line it prints once its imports and setup are done, at a
seeded delay within the time an uninterrupted run's work took. A run that finishes before its kill does not count
(it is started again), and each test asserts that its kills interrupted the command.

By default each command is killed once; ILORA_KILL_LOOPS=N kills each N times (the long loop).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # kills and re-runs commands in subprocesses

LOOPS = int(os.environ.get("ILORA_KILL_LOOPS", "1"))
RNG = np.random.default_rng(20261128)
TRAIN = ["--max-steps", "4", "--batch-size", "4", "candidates=6", "checkpoint_every=1", "quiet=true", "--seed", "5"]


def _start(args: list[str], home: Path) -> subprocess.Popen:
    # progress lines at once (ILORA_PROGRESS_SECONDS=0): they tell when a command's work has started
    env = dict(os.environ, ILORA_HOME=str(home), TOKENIZERS_PARALLELISM="false", ILORA_PROGRESS_SECONDS="0")
    return subprocess.Popen(
        [sys.executable, "-m", "ilora_cli.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _run(args: list[str], home: Path) -> dict:
    proc = _start([*args, "--json"], home)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out)


def _timed_run(args: list[str], home: Path, marker: str) -> tuple[dict, float]:
    """Run the command to its end; its JSON document and the seconds of work (from ``marker`` on stderr, the
    first line a command prints once its imports and setup are done, to its exit)."""
    proc = _start([*args, "--json"], home)
    started = _watch(proc, marker)
    started.wait(timeout=600)
    t0 = time.perf_counter()
    out = proc.stdout.read()
    proc.wait(timeout=600)
    assert proc.returncode == 0 and started.is_set(), started.lines
    return json.loads(out), time.perf_counter() - t0


def _watch(proc: subprocess.Popen, marker: str) -> threading.Event:
    """An event set when a line starting with ``marker`` appears on the process's stderr (or when stderr ends,
    so that nothing waits forever); a thread keeps reading stderr, so the process never blocks on it."""
    seen = threading.Event()
    seen.lines = []

    def read() -> None:
        for line in proc.stderr:
            seen.lines.append(line)
            if line.startswith(marker):
                seen.marker = True
                seen.set()
        seen.set()

    seen.marker = False
    threading.Thread(target=read, daemon=True).start()
    return seen


def _kill_at_random(args: list[str], home: Path, marker: str, work: float, tries: int = 6) -> float:
    """SIGKILL the command at a random moment of its work: after ``marker`` appears on stderr (imports and setup
    done), a seeded delay within the ``work`` seconds an uninterrupted run took. A run that finishes before its
    kill does not count: the command is started again, up to ``tries`` times. Returns the delay of the kill
    that interrupted the work, after asserting that one did."""
    for _ in range(tries):
        delay = float(RNG.uniform(0.05, 0.95) * work)
        proc = _start(args, home)
        started = _watch(proc, marker)
        started.wait(timeout=600)
        killed = False
        if started.marker:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                killed = True
        proc.wait()
        proc.stdout.close()
        if killed:
            assert proc.returncode == -signal.SIGKILL  # killed in its work, not finished
            return delay
    raise AssertionError(f"no kill interrupted {args[0]} in {tries} tries (its work takes {work:.1f} s)")


def _kill_during_write(args: list[str], home: Path, folder: Path, prefix: str, tries: int = 8) -> bool:
    """Start the command and SIGKILL it as soon as a temporary ``prefix*`` appears in ``folder`` (a write in
    progress); returns whether it was caught writing. A small artifact is written in a few milliseconds, so
    the command is started again (up to ``tries`` times) when it finished before the poll saw the write."""
    return any(_kill_during_one_write(args, home, folder, prefix) for _ in range(tries))


def _kill_during_one_write(args: list[str], home: Path, folder: Path, prefix: str) -> bool:
    proc = _start(args, home)
    caught = False
    while proc.poll() is None:
        if folder.is_dir() and any(p.name.startswith(prefix) for p in folder.iterdir()):
            proc.send_signal(signal.SIGKILL)
            caught = True
            break
        time.sleep(0.005)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return caught


def _no_temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name] if folder.is_dir() else []


@pytest.fixture
def home(tiny_world, tmp_path):
    """A fresh $ILORA_HOME holding the tiny world's dataset and backbone (runs and encoders start empty)."""
    import shutil

    h = tmp_path / "home"
    shutil.copytree(tiny_world / "datasets", h / "datasets")
    shutil.copytree(tiny_world / "encoders", h / "encoders")
    return h


def test_prepare_killed_at_random_moments(home):
    from ilora_cli.data.prepared import PreparedDataset

    args = ["prepare", "--dataset", "k", "synthetic_users=300", "--overwrite"]
    doc, work = _timed_run(args, home, "prepare: reading")
    want = doc["checksum"]
    target = home / "datasets" / "k"
    assert _kill_during_write(args, home, home / "datasets", ".k.tmp-")
    for attempt in range(LOOPS + 1):
        if attempt:
            _kill_at_random(args, home, "prepare: reading", work)
        if target.exists():  # complete and verified, never half-written
            ds = PreparedDataset.open(target)
            assert ds.checksum == want and len(ds.split("val")) == ds.meta["splits"]["val"]
        assert _run(args, home)["checksum"] == want
        assert _no_temporaries(home / "datasets") == []


def test_encode_killed_at_random_moments(home, monkeypatch):
    from ilora_cli.encoders.io import load_encoder
    from ilora_cli.encoders.train import EncodeConfig, encode

    # 20 epochs without early stopping: a few seconds of work to interrupt (3 epochs took 0.5 s)
    args = [
        "encode",
        "--dataset",
        "cyc",
        "--name",
        "k",
        "hidden_size=16",
        "--epochs",
        "20",
        "patience=0",
        "--overwrite",
    ]
    monkeypatch.setenv("ILORA_HOME", str(home))
    t0 = time.perf_counter()
    first = encode(EncodeConfig(dataset="cyc", name="k", hidden_size=16, epochs=20, patience=0, quiet=True))
    work = time.perf_counter() - t0  # in this process: the work alone
    want = load_file(str(home / "encoders" / "k" / "encoder.safetensors"))
    assert _kill_during_write(args, home, home / "encoders", ".k.tmp-")
    for attempt in range(LOOPS + 1):
        if attempt:
            _kill_at_random(args, home, "encode sasrec", work)
        if (home / "encoders" / "k").exists():
            model, _ = load_encoder(home / "encoders" / "k")
            assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
        again = _run(args, home)
        assert again["metrics"] == json.loads(json.dumps(first["metrics"]))  # deterministic on CPU: the metrics ...
        got = load_file(str(home / "encoders" / "k" / "encoder.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # ... and tensors
        assert _no_temporaries(home / "encoders") == []


def test_train_killed_at_random_moments_resumes_to_the_same_weights(home, tiny_world, monkeypatch):
    from ilora_cli.training.checkpoint import list_checkpoints, load_checkpoint
    from ilora_cli.training.loop import TrainConfig, train
    from ilora_cli.training.run import load_run

    base = ["train", "--dataset", "cyc", "--backbone", str(tiny_world / "tiny-backbone"), *TRAIN]
    monkeypatch.setenv("ILORA_HOME", str(home))
    whole = dict(name="whole", max_steps=4, batch_size=4, candidates=6, checkpoint_every=1, quiet=True, seed=5)
    t0 = time.perf_counter()
    want = train(TrainConfig(dataset="cyc", backbone=str(tiny_world / "tiny-backbone"), **whole))["weights_sha256"]
    work = time.perf_counter() - t0  # setup included: a little longer than the work after the "Run ..." line
    run = home / "runs" / "k"
    args = [*base, "--name", "k"]
    assert _kill_during_write(args, home, run / "checkpoints", ".step-000002.tmp-")
    for i in range(LOOPS + 1):
        delay = _kill_at_random([*args, "--overwrite"], home, "Run ", work) if i else 0.0
        for ck in list_checkpoints(run / "checkpoints"):
            load_checkpoint(ck)  # every checkpoint on disk is intact (raises DamagedCheckpoint otherwise)
        if (run / "manifest.json").exists():
            load_run(run)  # a finished run is complete and verified
        again = "--resume" if (run / "config.yaml").is_file() else "--overwrite"
        result = _run([*args, again], home)
        assert result["complete"] and result["weights_sha256"] == want, (delay, again)
        assert _no_temporaries(home / "runs") == []


def test_train_is_deterministic_on_cpu(home, tiny_world, monkeypatch):
    from ilora_cli.training.loop import TrainConfig, train

    monkeypatch.setenv("ILORA_HOME", str(home))
    cfg = dict(dataset="cyc", backbone=str(tiny_world / "tiny-backbone"), batch_size=4, candidates=6, quiet=True)
    a = train(TrainConfig(name="d1", max_steps=3, lora_dropout=0.1, **cfg))
    b = train(TrainConfig(name="d2", max_steps=3, lora_dropout=0.1, **cfg))
    assert a["weights_sha256"] == b["weights_sha256"] and a["final_loss"] == b["final_loss"]
    la = [json.loads(x)["loss"] for x in (home / "runs" / "d1" / "logs" / "train.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (home / "runs" / "d2" / "logs" / "train.jsonl").read_text().splitlines()]
    assert la == lb
