"""Run directories and checkpoints under damage: every damaged artifact is refused in one sentence, a damaged
checkpoint is skipped for the older one, --resume and --overwrite never lose finished work, a NaN loss stops
training, and a full disk leaves the previous artifacts intact."""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from ilora_cli.errors import UserError
from ilora_cli.training.checkpoint import list_checkpoints
from ilora_cli.training.loop import TrainConfig, train
from ilora_cli.training.run import load_run, read_info

from conftest import run_main as run_cli  # in this process: see run_main

FAST = dict(dataset="cyc", batch_size=4, candidates=6, quiet=True, seed=5)


def _cfg(home: Path, **kw) -> TrainConfig:
    return TrainConfig(backbone=str(home / "tiny-backbone"), **{**FAST, **kw})


@pytest.fixture(scope="module")
def runs(tiny_world):
    """A finished K=4 run (checkpoints at steps 2 and 4), and a finished run of the same settings and seed."""
    old = os.environ.get("ILORA_HOME")
    os.environ["ILORA_HOME"] = str(tiny_world)
    try:
        full = train(_cfg(tiny_world, name="rel-full", max_steps=4, checkpoint_every=2))
    finally:
        os.environ.pop("ILORA_HOME", None) if old is None else os.environ.__setitem__("ILORA_HOME", old)
    return tiny_world, full


@pytest.fixture
def world(runs, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(runs[0]))
    return runs[0]


# -- damaged run directories -----------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _edit(change):
    def apply(run: Path) -> None:
        info = json.loads((run / "ilora.json").read_text())
        change(info)
        (run / "ilora.json").write_text(json.dumps(info))

    return apply


def _set(section, key, value):
    return _edit(lambda info: info[section].__setitem__(key, value))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ilora-pwned",))


def _plant_pickle(run: Path) -> None:
    (run / "adapter" / "adapter_model.safetensors").unlink()
    (run / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps(_Payload()))


DAMAGE = {
    "adapter truncated": lambda r: _truncate(r / "adapter" / "adapter_model.safetensors"),
    "adapter random": lambda r: _scramble(r / "adapter" / "adapter_model.safetensors"),
    "adapter config random": lambda r: _scramble(r / "adapter" / "adapter_config.json"),
    "gate truncated": lambda r: _truncate(r / "gate.safetensors"),
    "gate random": lambda r: _scramble(r / "gate.safetensors"),
    "projector truncated": lambda r: _truncate(r / "projector.safetensors"),
    "projector random": lambda r: _scramble(r / "projector.safetensors"),
    "adapter deleted": lambda r: shutil.rmtree(r / "adapter"),
    "gate deleted": lambda r: (r / "gate.safetensors").unlink(),
    "head truncated": lambda r: _truncate(r / "head.safetensors"),
    "head random": lambda r: _scramble(r / "head.safetensors"),
    "head deleted": lambda r: (r / "head.safetensors").unlink(),
    "projector deleted": lambda r: (r / "projector.safetensors").unlink(),
    "items deleted": lambda r: (r / "items.json").unlink(),
    "items truncated": lambda r: _truncate(r / "items.json"),
    "items shortened": lambda r: (r / "items.json").write_text(json.dumps({"titles": ["a", "b"]})),
    "encoder truncated": lambda r: _truncate(r / "encoder" / "encoder.safetensors"),
    "pickle as adapter_model.bin": _plant_pickle,
    "K edited": _set("experts", "experts", 2),
    "rank edited": _set("experts", "rank", 8),
    "alpha edited": _set("experts", "alpha", 8.0),
    "gate edited to mlp": _set("experts", "gate", "mlp"),
    "gate edited to token": _set("experts", "gate", "token"),
    "gate edited to nonsense": _set("experts", "gate", "banana"),
    "hybrid flipped": _set("experts", "hybrid", False),
    "user token flipped": _edit(lambda info: info["experts"].update(user_token=not info["experts"]["user_token"])),
    "K as a string": _set("experts", "experts", "4"),
    "unknown key in experts": _set("experts", "colour", "blue"),
    "backbone missing": _edit(lambda info: info.pop("backbone")),
    "dataset missing": _edit(lambda info: info.pop("dataset")),
    "n_items edited": _set("dataset", "n_items", 31),
    "fusion not finite": _edit(lambda info: info.__setitem__("fusion", {"llm": float("nan"), "encoder": 1.0})),
    "ilora.json a list": lambda r: (r / "ilora.json").write_text("[1, 2, 3]"),
    "ilora.json truncated": lambda r: _truncate(r / "ilora.json"),
    "ilora.json binary": lambda r: (r / "ilora.json").write_bytes(os.urandom(300)),
    "ilora.json nested deeply": lambda r: (r / "ilora.json").write_text("[" * 100_000 + "]" * 100_000),
    "manifest deleted": lambda r: (r / "manifest.json").unlink(),
    "manifest random": lambda r: _scramble(r / "manifest.json"),
}
# The damage an older run (no manifest) must be refused for too: its files are checked by their contents.
WITHOUT_MANIFEST = [k for k in DAMAGE if not k.startswith(("manifest", "adapter config", "items trunc"))]


def _damaged_copy(world: Path, tmp_path: Path, damage: str, manifest: bool = True) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world / "runs" / "rel-full", run)
    if not manifest:
        (run / "manifest.json").unlink()
        _edit(lambda info: info.pop("manifest"))(run)
    DAMAGE[damage](run)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_run_is_refused_in_one_sentence(world, tmp_path, damage):
    run = _damaged_copy(world, tmp_path, damage)
    with pytest.raises(UserError) as exc:
        load_run(run)
    assert str(exc.value).count(". ") == 0 and "\n" not in str(exc.value), str(exc.value)
    assert not Path("/tmp/ilora-pwned").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", WITHOUT_MANIFEST)
def test_a_damaged_run_of_an_older_version_is_refused_too(world, tmp_path, damage):
    run = _damaged_copy(world, tmp_path, damage, manifest=False)
    with pytest.raises(UserError):
        load_run(run)


@pytest.mark.slow
def test_an_intact_run_of_an_older_version_loads(runs, world, tmp_path):
    """The damage cases above only show that old runs can be refused; this one must load, or "refuse every run
    without a manifest" would pass them all. Runs of older versions have no manifest and no manifest key."""
    from ilora_cli.training.loop import weights_digest

    _, full = runs
    run = tmp_path / "old"
    shutil.copytree(world / "runs" / "rel-full", run)
    (run / "manifest.json").unlink()
    _edit(lambda info: info.pop("manifest"))(run)
    assert not (run / "manifest.json").exists() and "manifest" not in json.loads((run / "ilora.json").read_text())
    loaded = load_run(run)
    assert loaded.model.config.experts == 4 and weights_digest(loaded.model) == full["weights_sha256"]


@pytest.mark.slow
def test_an_intact_run_loads_and_its_backbone_path_may_be_edited(world, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(world / "runs" / "rel-full", run)
    shutil.copytree(world / "tiny-backbone", tmp_path / "backbone-elsewhere")
    _set("backbone", "name", str(tmp_path / "backbone-elsewhere"))(run)
    assert load_run(run).model.config.experts == 4


@pytest.mark.slow
@pytest.mark.parametrize("damage,command", [("hybrid flipped", "eval"), ("pickle as adapter_model.bin", "recommend")])
def test_damaged_runs_through_the_command_line(world, tmp_path, damage, command):
    run = _damaged_copy(world, tmp_path, damage)
    history = tmp_path / "h.json"
    history.write_text("[1, 2, 3]")
    extra = ("--user-history", str(history)) if command == "recommend" else ()
    r = run_cli(command, "--run", str(run), *extra, home=world)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "damaged" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3  # one sentence (rich may wrap it)


# -- checkpoints -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_skips_a_damaged_checkpoint_and_matches_the_uninterrupted_run(runs, world, capfd):
    _, full = runs
    part = train(_cfg(world, name="rel-part", max_steps=4, checkpoint_every=1, stop_after=3))
    assert part["steps"] == 3
    ckpts = list_checkpoints(world / "runs" / "rel-part" / "checkpoints")
    assert [c.name for c in ckpts] == ["step-000002", "step-000003"]
    _truncate(ckpts[-1] / "trainable.safetensors")  # before: loaded without a check (a traceback)
    resumed = train(_cfg(world, name="rel-part", max_steps=4, checkpoint_every=1, resume=True))
    assert "skipped a damaged checkpoint (step-000003" in capfd.readouterr().err
    assert resumed["resumed_from"].endswith("step-000002") and resumed["complete"]
    assert resumed["weights_sha256"] == full["weights_sha256"]


@pytest.mark.slow
def test_resume_with_every_checkpoint_damaged_names_overwrite(world):
    train(_cfg(world, name="rel-bad", max_steps=4, checkpoint_every=1, stop_after=2))
    for ck in list_checkpoints(world / "runs" / "rel-bad" / "checkpoints"):
        _scramble(ck / "optimizer.safetensors")
    with pytest.raises(UserError, match="--overwrite"):
        train(_cfg(world, name="rel-bad", max_steps=4, checkpoint_every=1, resume=True))


@pytest.mark.slow
def test_resume_with_another_rank_is_refused_in_one_sentence(world):
    train(_cfg(world, name="rel-rank", max_steps=4, checkpoint_every=1, stop_after=1))
    with pytest.raises(UserError, match="rank: 16 there, 8 now"):
        train(_cfg(world, name="rel-rank", max_steps=4, checkpoint_every=1, resume=True, rank=8))


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(runs, world):
    _, full = runs
    shutil.copytree(world / "runs" / "rel-full", world / "runs" / "rel-early")
    run = world / "runs" / "rel-early"
    for name in ("checkpoints", "adapter", "manifest.json", "ilora.json", "gate.safetensors"):
        p = run / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    # before: "no checkpoint to resume from" with --resume and "already exists" without it
    resumed = train(_cfg(world, name="rel-early", max_steps=4, checkpoint_every=2, resume=True))
    assert resumed["complete"] and resumed["resumed_from"] is None
    assert resumed["weights_sha256"] == full["weights_sha256"]


@pytest.mark.slow
def test_overwrite_keeps_the_finished_run_until_the_new_one_is_finished(runs, world):
    _, full = runs
    shutil.copytree(world / "runs" / "rel-full", world / "runs" / "rel-over")
    # a NaN loss (lr far too high) stops the new run: the old one must be untouched
    with pytest.raises(UserError, match="loss became"):
        train(_cfg(world, name="rel-over", max_steps=4, overwrite=True, lr=1e30, projector_lr=1e30))
    kept = load_run(world / "runs" / "rel-over")
    from ilora_cli.training.loop import weights_digest

    assert weights_digest(kept.model) == full["weights_sha256"]
    done = train(_cfg(world, name="rel-over", max_steps=2, overwrite=True, seed=9))
    assert done["run_dir"] == str(world / "runs" / "rel-over")
    assert read_info(world / "runs" / "rel-over")["training"]["steps"] == 2
    assert not [p for p in (world / "runs").iterdir() if p.name.startswith(".rel-over")]


@pytest.mark.slow
def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(world):
    with pytest.raises(UserError, match="last good checkpoint") as exc:
        train(_cfg(world, name="rel-nan", max_steps=6, checkpoint_every=1, lr=1e30, projector_lr=1e30))
    assert "\n" not in str(exc.value)
    run = world / "runs" / "rel-nan"
    assert not (run / "ilora.json").exists()
    for ck in list_checkpoints(run / "checkpoints"):
        assert all(v == v for v in json.loads((ck / "state.json").read_text())["losses"])  # no NaN saved


# -- full disk -------------------------------------------------------------------------------------------------------


@contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail with EFBIG, as a full disk fails them with ENOSPC (a real kernel limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_world, tmp_path):
    import torch

    from ilora_cli.training.checkpoint import load_checkpoint, save_checkpoint

    param = torch.nn.Parameter(torch.randn(64, 64))
    opt = torch.optim.AdamW([param])
    param.grad = torch.ones_like(param)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path, {"w": param}, opt, sched, {"step": 1})
    with file_size_limit(4096), pytest.raises(UserError, match="previous one is unchanged|nothing was left"):
        save_checkpoint(tmp_path, {"w": param}, opt, sched, {"step": 1})
    with file_size_limit(4096), pytest.raises(UserError, match="nothing was left behind"):
        save_checkpoint(tmp_path, {"w": param}, opt, sched, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]  # no temporaries, the old one intact
    assert load_checkpoint(tmp_path / "step-000001")["state"]["step"] == 1


def test_a_full_disk_during_prepare_keeps_the_previous_dataset(tiny_world, tmp_path):
    out = tmp_path / "ds"
    r = run_cli("prepare", "--output", str(out), "synthetic_users=40", home=tiny_world)
    assert r.returncode == 0, r.stderr
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    limited = "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    limited += "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
    limited += "from ilora_cli.cli import main; sys.argv = ['ilora'] + sys.argv[1:]; main()"
    import subprocess
    import sys

    env = dict(os.environ, ILORA_HOME=str(tiny_world))
    args = ["prepare", "--output", str(out), "--overwrite", "synthetic_users=400"]
    r = subprocess.run([sys.executable, "-c", limited, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Could not write" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_enospc_on_a_small_file_system_during_prepare(tiny_world, tmp_path):
    """A real ENOSPC: a 256 KiB tmpfs, where the machine allows mounting one (root); skipped elsewhere."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        r = run_cli("prepare", "--output", str(mnt / "ds"), "synthetic_users=4000", home=tiny_world)
        assert r.returncode == 2 and "No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- durability ------------------------------------------------------------------------------------------------------


def test_stale_temporaries_of_killed_writes_are_cleaned_and_live_ones_kept(tmp_path):
    from ilora_cli.home import atomic_directory

    dead = tmp_path / ".ds.tmp-999999999-abc"  # no such process
    legacy = tmp_path / ".ds.tmp-x1y2z3"  # the names of older versions
    live = tmp_path / f".ds.tmp-{os.getppid()}-def"  # a live process (our parent)
    other = tmp_path / ".dsx.tmp-999999999-abc"  # another target's
    for p in (dead, legacy, live, other):
        p.mkdir()
    with atomic_directory(tmp_path / "ds") as tmp:
        (tmp / "f").write_text("x")
    assert not dead.exists() and not legacy.exists() and live.exists() and other.exists()
    assert (tmp_path / "ds" / "f").read_text() == "x"


def test_checkpoints_are_flushed_to_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    import torch

    from ilora_cli.training.checkpoint import save_checkpoint

    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    param = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([param])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    target = save_checkpoint(tmp_path, {"w": param}, opt, sched, {"step": 3})
    names = {Path(p).name for p in synced}
    for f in target.iterdir():
        assert f.name in names, f.name  # every file, under its temporary directory
    assert str(tmp_path) in synced  # and the directory holding the renamed one, after the rename


# -- eval and recommend on an intact run --------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_predictions_into_a_folder_never_touch_unrelated_files(world, tmp_path):
    from ilora_cli.evaluation.evaluate import EvalConfig, evaluate

    run = str(world / "runs" / "rel-full")
    folder = tmp_path / "preds"
    folder.mkdir()
    # before: a crash after the whole evaluation, leaving preds.tmp behind
    out = evaluate(EvalConfig(runs=[run], predictions=folder, max_samples=2, draws=1, quiet=True))
    written = Path(out["results"]["rel-full"]["predictions"])
    assert written.parent == folder and written.read_text().count("\n") == 2
    (tmp_path / "x.tmp").write_text("unrelated")  # before: overwritten by the predictions of x.jsonl
    evaluate(EvalConfig(runs=[run], predictions=tmp_path / "x.jsonl", max_samples=2, draws=1, quiet=True))
    assert (tmp_path / "x.tmp").read_text() == "unrelated" and (tmp_path / "x.jsonl").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with pytest.raises(UserError, match="is a file"):  # refused before the evaluation, not after it
        evaluate(EvalConfig(runs=[run], predictions=tmp_path / "x.tmp" / "p.jsonl", quiet=True))


@pytest.mark.slow
def test_recommend_batch_answers_good_lines_and_numbers_bad_ones(world, tmp_path):
    users = tmp_path / "users.jsonl"
    users.write_text('[1, 2, 3]\n{"oops": 1}\n[4, 5\n[999]\n[6, 7, 8]\n')
    empty = tmp_path / "none.json"
    empty.write_text("[]")
    r = run_cli("recommend", "--run", "rel-full", "--user-history", str(users), home=world)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [("error" in x) for x in lines] == [False, True, True, True, False]
    assert "line 2" in lines[1]["error"] and "line 3" in lines[2]["error"] and "999" in lines[3]["error"]
    assert len(lines[0]["recommendations"]) == 10 and len(lines[4]["recommendations"]) == 10
    from ilora_cli.evaluation.recommend import RecommendConfig, Recommender

    with pytest.raises(UserError, match="lists no items"):
        Recommender(RecommendConfig(run="rel-full", user_history=users, candidates=empty, device="cpu"))


def test_a_full_disk_while_appending_to_a_log_is_one_sentence(tmp_path):
    """The training, validation and ablation logs are appended through one function."""
    from ilora_cli.home import append_json_line

    log = tmp_path / "train.jsonl"
    log.write_text("x" * 4000 + "\n")
    with file_size_limit(4096), pytest.raises(UserError, match="Could not write the log .* pass --resume"):
        append_json_line(log, {"step": 1, "loss": 0.5, "padding": "y" * 200}, "pass --resume.")
    append_json_line(log, {"step": 1}, "pass --resume.")  # with room again, it appends
    assert log.read_text().splitlines()[-1] == '{"step": 1}'
