"""--overwrite replaces only what this tool wrote as that kind of artifact; exports never follow links out of a
run; --resume refuses other settings; a run stopped by a NaN loss before its first checkpoint leaves nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ilora_cli.errors import UserError
from ilora_cli.training.loop import TrainConfig, train

from conftest import run_main as run_cli  # in this process: see run_main

FAST = dict(dataset="cyc", batch_size=4, candidates=6, quiet=True, seed=5)


@pytest.fixture
def home(tiny_world, tmp_path, monkeypatch):
    """A fresh $ILORA_HOME holding copies of the tiny world's dataset, encoder and backbone: these tests try to
    make the tool delete things, and must not reach the shared world if it does."""
    h = tmp_path / "home"
    for name in ("datasets", "encoders", "tiny-backbone"):
        shutil.copytree(tiny_world / name, h / name)
    monkeypatch.setenv("ILORA_HOME", str(h))
    return h


def _cfg(home: Path, **kw) -> TrainConfig:
    return TrainConfig(backbone=str(home / "tiny-backbone"), **{**FAST, **kw})


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- --overwrite -----------------------------------------------------------------------------------------------------


def test_train_overwrite_refuses_a_folder_of_other_things(home):
    """Before: `train --overwrite --output HOME` deleted the datasets, encoders and backbone beside the run."""
    before = _tree(home)
    r = run_cli(
        "train", "--dataset", "cyc", "--backbone", str(home / "tiny-backbone"), "--output", str(home), "--overwrite",
        "--max-steps", "1", "--batch-size", "4", "candidates=6", "quiet=true", home=home,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--overwrite replaces only a run" in r.stderr and "'datasets'" in r.stderr
    assert _tree(home) == before
    # --resume may start a run afresh (deleting what is there): it refuses a folder that is not a run, too
    project = home.parent / "project"
    project.mkdir()
    (project / "config.yaml").write_text("mine: true\n")
    (project / "notes.txt").write_text("keep me\n")
    with pytest.raises(UserError, match="notes.txt"):
        train(_cfg(home, output=project, resume=True, max_steps=1))
    assert (project / "notes.txt").read_text() == "keep me\n"


@pytest.mark.slow
def test_train_overwrite_still_replaces_a_run(home):
    first = train(_cfg(home, name="again", max_steps=1))
    run_dir = home / "runs" / "again"
    (run_dir / "predictions-val-score.jsonl").write_text("{}\n")  # eval writes these into a run
    second = train(_cfg(home, name="again", max_steps=2, overwrite=True))
    assert first["steps"] == 1 and second["steps"] == 2 and first["weights_sha256"] != second["weights_sha256"]
    # what is on the disk is the second run, whole: its steps, its log, its weights; nothing of the first is left
    assert json.loads((run_dir / "ilora.json").read_text())["training"]["steps"] == 2
    log = [json.loads(x)["step"] for x in (run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert log == [1, 2]
    assert (run_dir / "logs" / "weights-rank0.sha256").read_text().strip() == second["weights_sha256"]
    assert not (run_dir / "predictions-val-score.jsonl").exists()
    assert not [p.name for p in run_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary, no old copy


@pytest.mark.slow
def test_export_overwrite_refuses_a_parent_folder_and_a_file(home, tmp_path):
    """Before: `export --overwrite` onto a parent folder deleted the files beside the copy, and onto a file
    replaced it and left a `.old-PID` temporary."""
    from ilora_cli.exporting import ExportConfig, export

    train(_cfg(home, name="ex", max_steps=1))
    parent = tmp_path / "shared"
    parent.mkdir()
    (parent / "other-work.txt").write_text("mine\n")
    with pytest.raises(UserError, match="other-work.txt"):
        export(ExportConfig(run="ex", output=parent, overwrite=True))
    assert _tree(parent) == ["other-work.txt"]
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    with pytest.raises(UserError, match="is a file, not an export"):
        export(ExportConfig(run="ex", output=afile, overwrite=True))
    assert afile.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir() if "afile" in p.name) == [
        "afile"
    ]
    out = tmp_path / "copy"
    export(ExportConfig(run="ex", output=out))
    export(ExportConfig(run="ex", output=out, overwrite=True))  # an export is replaced by an export
    assert (out / "ilora.json").is_file() and not [p for p in tmp_path.iterdir() if ".old-" in p.name]


@pytest.mark.slow
def test_every_overwrite_refuses_a_folder_of_other_things(home, tmp_path):
    from ilora_cli.ablation.analysis import AnalysisConfig, gradient_conflict
    from ilora_cli.data.prepare import PrepareConfig, prepare
    from ilora_cli.encoders.train import EncodeConfig, encode

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("keep\n")
    with pytest.raises(UserError, match="thesis.tex"):
        prepare(PrepareConfig(dataset="x", output=folder, overwrite=True, synthetic_users=20))
    with pytest.raises(UserError, match="thesis.tex"):
        encode(EncodeConfig(dataset="cyc", output=folder, overwrite=True, hidden_size=8, epochs=1, quiet=True))
    train(_cfg(home, name="gc", max_steps=1))
    with pytest.raises(UserError, match="thesis.tex"):
        gradient_conflict(AnalysisConfig(run="gc", output=folder, overwrite=True, clusters=2, rows_per_cluster=1))
    r = run_cli("ablate", "--dataset", "cyc", "--output", str(folder), "--overwrite", "max_steps=1", home=home)
    assert r.returncode == 2 and "thesis.tex" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _tree(folder) == ["thesis.tex"]


def test_what_overwrite_may_replace(tmp_path):
    from ilora_cli.home import check_replaceable, replace_problem

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    assert replace_problem(run, "run") is None  # the first thing a run writes: a run killed at once
    (run / "config.yaml").write_text("x: 1\n")
    (run / ".final.tmp").mkdir()
    assert replace_problem(run, "run") is None
    (run / "draft.md").write_text("mine")
    assert "draft.md" in replace_problem(run, "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert replace_problem(empty, "export") is None and replace_problem(tmp_path / "absent", "export") is None
    plots = tmp_path / "plots-only"
    (plots / "plots").mkdir(parents=True)
    assert "none of the files" in replace_problem(plots, "export")
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(UserError, match="symbolic link"):
        check_replaceable(link, "run")


def test_an_atomic_write_over_a_file_leaves_no_temporary(tmp_path):
    from ilora_cli.home import atomic_directory

    target = tmp_path / "t"
    target.write_text("old")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # before: .t.old-PID was left


# -- exports and links -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", ["logs/evil", "plots", "encoder/extra.json"])
def test_export_never_follows_a_link_out_of_a_run(home, tmp_path, where):
    """Before: a link planted in the run was followed and its target copied into the export."""
    from ilora_cli.exporting import ExportConfig, export

    train(_cfg(home, name="lnk", max_steps=1))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "password.txt").write_text("hunter2\n")
    planted = home / "runs" / "lnk" / where
    if planted.is_dir():
        shutil.rmtree(planted)
    planted.symlink_to(secret if where == "plots" else secret / "password.txt")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="symbolic link") as exc:
        export(ExportConfig(run="lnk", output=out))
    assert where in str(exc.value) and not out.exists()
    r = run_cli("export", "--run", "lnk", "--output", str(out), home=home)
    assert r.returncode == 2 and "symbolic link" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_overwrite_and_links_through_the_command_line_leave_no_temporaries(home, tmp_path):
    train(_cfg(home, name="cl", max_steps=1))
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = run_cli("export", "--run", "cl", "--output", str(afile), "--overwrite", home=home)
    assert r.returncode == 2 and "is a file" in r.stderr and afile.read_text() == "x"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".afile")]


# -- --resume with other settings ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_naming_them(home):
    """Before: --resume with another seed or batch size continued silently, mixing two runs."""
    train(_cfg(home, name="half", max_steps=4, checkpoint_every=1, stop_after=2))
    for change, named in (({"seed": 6}, "seed: 5 there, 6 now"), ({"batch_size": 2}, "batch_size: 4 there, 2 now")):
        with pytest.raises(UserError, match=named) as exc:
            train(_cfg(home, name="half", max_steps=4, checkpoint_every=1, resume=True, **change))
        assert "\n" not in str(exc.value)
    r = run_cli("train", "--name", "half", "--resume", "--seed", "7", home=home)  # the command line, saved settings
    assert r.returncode == 2 and "seed: 5 there, 7 now" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # what only says how this invocation runs may change: checkpoints, logging, stopping
    done = train(_cfg(home, name="half", max_steps=4, checkpoint_every=2, log_every=2, resume=True))
    assert done["complete"] and done["resumed_from"].endswith("step-000002")


@pytest.mark.slow
def test_resume_on_another_dataset_encoder_or_holdout_is_refused(home, tmp_path):
    """Before: `train --resume --dataset OTHER` continued the run on the other dataset (and its encoder), exit 0."""
    from ilora_cli.data.prepared import write_prepared
    from ilora_cli.encoders.train import EncodeConfig, encode

    from conftest import cycle_source

    train(_cfg(home, name="half", max_steps=4, checkpoint_every=1, stop_after=2))
    other = cycle_source(n_items=30, n_users=40, length=12, seed=1)  # the same catalogue, other users
    write_prepared(other, "cyc2", home / "datasets" / "cyc2", n_candidates=6, draws=2, seed=3)
    encode(EncodeConfig(dataset="cyc2", hidden_size=16, epochs=2, quiet=True))
    encode(EncodeConfig(dataset="cyc", name="cyc-other", hidden_size=16, epochs=2, seed=9, quiet=True))
    refused = {
        "cyc2": ({"dataset": "cyc2"}, r"dataset: 'cyc' \(checksum \w+\) there, 'cyc2' \(checksum \w+\) now"),
        "encoder": ({"encoder": "cyc-other"}, r"encoder: weights \w+ there, \w+ now"),
        "holdout": ({"holdout": "none"}, "holdout: None there, 'none' now"),
    }
    for change, named in refused.values():
        with pytest.raises(UserError, match=named) as exc:
            train(_cfg(home, name="half", max_steps=4, checkpoint_every=1, resume=True, **change))
        assert "\n" not in str(exc.value)
    r = run_cli("train", "--name", "half", "--resume", "--dataset", "cyc2", home=home)
    assert r.returncode == 2 and "trained on other data" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (home / "runs" / "half" / "ilora.json").exists()
    # the same dataset elsewhere is the same data: where it lies does not matter
    shutil.copytree(home / "datasets" / "cyc", tmp_path / "moved-cyc")
    done = train(
        _cfg(home, name="half", max_steps=4, checkpoint_every=1, resume=True, dataset=str(tmp_path / "moved-cyc"))
    )
    assert done["complete"] and done["resumed_from"].endswith("step-000002")


@pytest.mark.slow
def test_validation_steps_beyond_an_epoch_run_are_refused_before_it_starts(home):
    """Without max_steps the run's length is known once its rows are: validate_at beyond it is refused then."""
    with pytest.raises(UserError, match=r"validate_at lists step 100000 beyond the run's \d+ optimisation steps"):
        train(_cfg(home, name="val", epochs=1, validate_at=[1, 100_000]))
    assert not (home / "runs" / "val").exists()


# -- what a failed first step leaves ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_loss_that_is_not_finite_before_any_checkpoint_leaves_nothing(home):
    """Before: an infinite loss at step 1 left a run directory without a checkpoint, so the same command then
    failed with "already exists" and needed --resume or --overwrite."""
    for _ in range(2):  # the same command twice: the same sentence, not "already exists"
        with pytest.raises(UserError, match="loss became inf at step 1.*nothing was left behind"):
            train(_cfg(home, name="inf", max_steps=3, distill_weight=1e39))
        assert not (home / "runs" / "inf").exists()
    assert train(_cfg(home, name="inf", max_steps=1))["complete"]  # and with sane settings, no flag needed
    # a finished run that --overwrite would replace stays, and the run trained beside it is gone too
    with pytest.raises(UserError, match="nothing was left behind"):
        train(_cfg(home, name="inf", max_steps=3, distill_weight=1e39, overwrite=True))
    assert (home / "runs" / "inf" / "ilora.json").is_file()
    assert sorted(p.name for p in (home / "runs").iterdir()) == ["inf"]
