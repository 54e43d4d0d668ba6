"""The newer surfaces under bad input: ``ablate``, ``export``, ``recommend`` with fusion, the newer ``train``
settings and the Python API end in a result or one sentence (exit code 2), never a traceback, a hang, invalid
JSON or a silently wrong result."""

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


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
    """A home of its own (copies of the tiny world's dataset, encoder and backbone) with a finished K = 2 run."""
    home = tmp_path_factory.mktemp("surfaces") / "home"
    for name in ("datasets", "encoders", "tiny-backbone"):
        shutil.copytree(tiny_world / name, home / name)
    old = os.environ.get("ILORA_HOME")
    os.environ["ILORA_HOME"] = str(home)
    try:
        train(TrainConfig(backbone=str(home / "tiny-backbone"), name="s2", experts=2, max_steps=2, **FAST))
    finally:
        os.environ.pop("ILORA_HOME", None) if old is None else os.environ.__setitem__("ILORA_HOME", old)
    return home


@pytest.fixture
def home(world, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(world))
    return world


@pytest.fixture
def data(tiny_world, monkeypatch):
    """The shared tiny world (dataset, encoder, backbone; no run), for tests whose commands are refused before
    they write anything."""
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    return tiny_world


def _strict_json(text: str):
    """Parse as a JSON parser other than Python's would: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _copy_run(home: Path, tmp_path: Path, name: str = "s2") -> Path:
    run = tmp_path / f"{name}-copy"
    shutil.copytree(home / "runs" / name, run)
    return run


def _edit_info(run: Path, change) -> None:
    info = json.loads((run / "ilora.json").read_text())
    change(info)
    (run / "ilora.json").write_text(json.dumps(info))


# -- JSON output -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_edited_or_absurd_fusion_weights_and_a_removed_fusion_are_refused(home, tmp_path):
    """Before: fusion weights of 1e308 (or -1e308) in ilora.json gave a ranking of NaN scores written as null, exit
    0, and removing the fusion of a run trained with one silently ranked by the LLM alone."""
    from ilora_cli.training import run as runs

    history = tmp_path / "h.json"
    history.write_text("[1, 2, 3]")
    batch = tmp_path / "h.jsonl"
    batch.write_text("[1, 2, 3]\n[4, 5]\n")
    edits = {
        "1e308": lambda info: info.__setitem__("fusion", {"llm": 1e308, "encoder": 1e308}),
        "-1e308": lambda info: info.__setitem__("fusion", {"llm": -1e308, "encoder": 1.0}),
        "NaN": lambda info: info.__setitem__("fusion", {"llm": float("nan"), "encoder": 1.0}),
        "other weights": lambda info: info.__setitem__("fusion", {"llm": 1.0, "encoder": 0.0}),
        "no fusion": lambda info: info.__setitem__("fusion", None),
        "K": lambda info: info["experts"].__setitem__("experts", 1),
    }
    for name, edit in edits.items():
        shutil.rmtree(tmp_path / "s2-copy", ignore_errors=True)
        run = _copy_run(home, tmp_path, "s2")
        _edit_info(run, edit)
        for extra in (("--user-history", str(history), "--json"), ("--user-history", str(batch))):
            r = run_cli("recommend", "--run", str(run), *extra, home=home)
            assert r.returncode == 2 and "Traceback" not in r.stderr and not r.stdout, (name, r.stderr)
            assert "ilora.json" in r.stderr and len(r.stderr.strip().splitlines()) <= 3, (name, r.stderr)
        if name in ("other weights", "K"):
            continue
        # even where the manifest were written again for the edit, such weights and a missing fusion are refused
        runs.write_run_manifest(run, json.loads((run / "ilora.json").read_text()))
        with pytest.raises(UserError, match="ilora.json"):
            runs.load_run(run)
    shutil.rmtree(tmp_path / "s2-copy")
    assert runs.load_run(_copy_run(home, tmp_path, "s2")).fusion is not None  # the unedited copy loads


def test_json_text_writes_non_finite_numbers_as_null():
    import numpy as np

    from ilora_cli.console import json_text

    doc = {"a": float("nan"), "b": [1.0, float("-inf"), np.float32(2.5)], "c": {"d": np.float64("inf")}, "e": "x"}
    assert _strict_json(json_text(doc)) == {"a": None, "b": [1.0, None, 2.5], "c": {"d": None}, "e": "x"}


# -- messages are printed literally ----------------------------------------------------------------------------------


def test_messages_keep_their_square_brackets(data):
    """Before: error sentences were read as rich markup, so `[nan]`, `'a[b]'` and `'ilora[wandb]'` vanished."""
    r = run_cli("ablate", "--dataset", "cyc", "--train-fraction", "nan", "--dry-run", home=data)
    assert r.returncode == 2 and "got [nan]." in r.stderr, r.stderr
    r = run_cli("train", "--name", "a[b]", home=data)
    assert r.returncode == 2 and "'a[b]'" in r.stderr, r.stderr


@pytest.mark.slow
def test_a_missing_candidates_file_is_called_so(home, tmp_path):
    """Before: "The history file absent.json is missing." for the --candidates file."""
    history = tmp_path / "h.json"
    history.write_text("[1, 2]")
    r = run_cli("recommend", "--run", "s2", "--user-history", str(history), "--candidates", "absent.json", home=home)
    assert r.returncode == 2 and "The candidates file absent.json is missing." in r.stderr, r.stderr


def test_the_install_hint_of_a_missing_tracker_names_the_extra(data):
    pytest.importorskip("tensorboard")
    if __import__("importlib").util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed: its hint cannot be seen")
    r = run_cli("train", "--dataset", "cyc", "--backbone", str(data / "tiny-backbone"), "--name", "w",
                "--report-to", "wandb", "--max-steps", "1", home=data)  # fmt: skip
    assert r.returncode == 2 and "pip install 'ilora[wandb]'" in r.stderr, r.stderr


# -- settings that hold text stay text -------------------------------------------------------------------------------


def test_text_settings_keep_what_was_written(tmp_path):
    """Before: YAML 1.1 turned name=007 into 7 and name=yes into True (a run named 'True')."""
    from ilora_cli.ablation.config import resolve_ablation
    from ilora_cli.config import resolve

    for written, kept in (
        ("007", "007"),
        ("yes", "yes"),
        ("'007'", "007"),
        ("2024-01-01", "2024-01-01"),
        ("1e3", "1e3"),
    ):
        assert resolve(TrainConfig, overrides=[f"name={written}"]).name == kept, written
    assert resolve(TrainConfig, overrides=["name=null"]).name is None  # an optional setting left unset
    assert resolve(TrainConfig, overrides=["seed=007", "gate=user"]).seed == 7  # numbers stay numbers
    config = tmp_path / "c.yaml"
    config.write_text("name: 007\nbackbone: yes\nencoder: on\nseed: 12\noutput: 123\n")
    cfg = resolve(TrainConfig, config)
    assert (cfg.name, cfg.backbone, cfg.encoder, cfg.seed, str(cfg.output)) == ("007", "yes", "on", 12, "123")
    ablation = tmp_path / "a.yaml"
    ablation.write_text("dataset: cyc\ntrain:\n  target_modules: yes\n")
    a = resolve_ablation(ablation, {}, ["backbone=007", "eval_rows=2"])
    assert a.train["target_modules"] == "yes" and a.train["backbone"] == "007" and a.eval_rows == 2


def test_a_run_named_007_is_called_007(data):
    r = run_cli("train", "--dataset", "cyc", "name=007", "--print-config", home=data)
    assert r.returncode == 0 and "name: '007'" in r.stdout, r.stderr


# -- ablate: the size of a grid, cells that would share a name, candidates the catalogue cannot fill ----------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seeds", [10_000, 250_000], ids=["40,000 cells", "1,000,000 cells"])
def test_a_huge_grid_is_refused_at_once(data, seeds):
    """Before: --dry-run expanded and listed every cell of a 40,000- or 1,000,000-cell grid (the command did not
    answer within 120 s)."""
    import time

    from ilora_cli.ablation.config import resolve_ablation
    from ilora_cli.ablation.runner import run_ablation

    flags = {"dataset": "cyc", "experts": "1,2,4,8", "seeds": ",".join(map(str, range(seeds))), "dry_run": True}
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=f"The grid has {4 * seeds:,} cells .* at most 1,000"):
        run_ablation(resolve_ablation(None, flags, None))
    assert time.perf_counter() - t0 < 10  # the count alone: 0.2 s here for a million cells


def test_grid_values_that_would_share_a_cell_name_are_refused(data):
    """Before: --train-fraction 0.5,0.5000001 made two cells named users0.5 that shared one run."""
    from ilora_cli.ablation.config import resolve_ablation

    with pytest.raises(UserError, match="0.5 and 0.5000001 would both be named 'users0.5'"):
        resolve_ablation(None, {"dataset": "cyc", "train_fraction": "0.5,0.5000001"}, None)
    assert resolve_ablation(None, {"dataset": "cyc", "train_fraction": "0.5,0.500001"}, None).train_fraction


def test_a_train_fraction_that_keeps_no_user_is_refused_by_the_dry_run(data):
    """Before: `ablate --train-fraction 1e-300 --dry-run` accepted a fraction that keeps no training user."""
    import re

    from ilora_cli.data.holdout import train_users
    from ilora_cli.data.prepared import PreparedDataset

    n_users = len(set(train_users(PreparedDataset.open("cyc"))[0].tolist()))
    for fraction in ("1e-300", f"0.5,{0.4 / n_users:g}"):
        r = run_cli("ablate", "--dataset", "cyc", "--train-fraction", fraction, "--dry-run", home=data)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert re.search(rf"keeps 0 of the {n_users} training users of 'cyc'; give at least", r.stderr), r.stderr
    r = run_cli("ablate", "--dataset", "cyc", "--train-fraction", f"0.5,{1 / n_users:g}", "--dry-run", home=data)
    assert r.returncode == 0, r.stderr


def test_candidates_the_catalogue_cannot_fill_are_refused_by_the_dry_run(data):
    """Before: --dry-run accepted --candidates 100000, which the real run refused only after training the cell."""
    r = run_cli("ablate", "--dataset", "cyc", "--candidates", "6,100000", "--dry-run", home=data)
    assert r.returncode == 2 and "--candidates 100000 is more than the catalogue can fill" in r.stderr, r.stderr
    r = run_cli("ablate", "--dataset", "cyc", "--candidates", "6,20", "--dry-run", "--json", home=data)
    assert r.returncode == 0 and len(json.loads(r.stdout)["cells"]) == 2, r.stderr


GARBAGE_CONFIGS = {
    "keys that are numbers": "1: 2\nname: x\n",
    "a train section with a number as key": "train: {1: 2}\n",
    "a list": "- a\n- b\n",
    "a train section that is a list": "train: [1, 2]\n",
    "an axis that is a mapping": "experts: {a: 1}\n",
    "nested 100,000 deep": "a: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "binary": None,
}


@pytest.mark.parametrize("case", list(GARBAGE_CONFIGS))
def test_a_garbage_config_file_is_one_sentence(case, tmp_path):
    """Before: keys that YAML reads as numbers ended in a TypeError (joining the unknown keys for the message)."""
    from ilora_cli.ablation.config import resolve_ablation
    from ilora_cli.config import resolve

    config = tmp_path / "c.yaml"
    text = GARBAGE_CONFIGS[case]
    config.write_bytes(os.urandom(3000) if text is None else text.encode())
    for load in (lambda: resolve_ablation(config, {"dataset": "cyc"}, None), lambda: resolve(TrainConfig, config)):
        with pytest.raises(UserError) as exc:
            load()
        assert "\n" not in str(exc.value)


# -- ablate over damaged ablation directories ------------------------------------------------------------------------

ABLATE = dict(dataset="cyc", experts="1", candidates="6,8", name="grid", eval_rows=4)
ABLATE_TRAIN = ["max_steps=1", "batch_size=4", "candidates=6", "quiet=true"]


def _ablate(home: Path, **flags):
    from ilora_cli.ablation.config import resolve_ablation
    from ilora_cli.ablation.runner import run_ablation

    settings = {**ABLATE, **flags}
    pairs = [*ABLATE_TRAIN, f"backbone={home / 'tiny-backbone'}", f"eval_rows={settings.pop('eval_rows')}"]
    return run_ablation(resolve_ablation(None, settings, pairs))


@pytest.fixture(scope="module")
def grid(world):
    """A finished two-cell ablation (one run, evaluated with 6 and with 8 candidates)."""
    old = os.environ.get("ILORA_HOME")
    os.environ["ILORA_HOME"] = str(world)
    try:
        doc = _ablate(world)
    finally:
        os.environ.pop("ILORA_HOME", None) if old is None else os.environ.__setitem__("ILORA_HOME", old)
    assert doc["unfinished"] == []
    return world / "ablations" / "grid"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


ABLATION_DAMAGE = {
    "cell truncated": lambda d, home: _truncate(d / "cells" / "k1_c6.json"),
    "cell a list": lambda d, home: (d / "cells" / "k1_c6.json").write_text("[1, 2]"),
    "cell without metrics": lambda d, home: (d / "cells" / "k1_c6.json").write_text('{"metrics": 5}'),
    "attempt log half-written": lambda d, home: (d / "logs" / "k1.jsonl").open("a").write('{"seconds": 1'),
    "attempt log with a list": lambda d, home: (d / "logs" / "k1.jsonl").open("a").write("[1]\n"),
    "run log half-written": lambda d, home: (d / "runs" / "k1" / "logs" / "train.jsonl").open("a").write('{"st'),
    "extra candidates truncated": lambda d, home: (
        (d / "cells" / "k1_c8.json").unlink(),
        _truncate(home / "datasets" / "cyc" / "extra_candidates" / "val-c8.safetensors"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(ABLATION_DAMAGE))
def test_an_ablation_over_damaged_files_finishes_or_says_why(home, grid, tmp_path, damage):
    """Before: every case ended in a traceback (JSONDecodeError, AttributeError, KeyError, SafetensorError),
    in the run and in --dry-run. Now a damaged cell is evaluated again and damaged log lines are skipped."""
    copy = tmp_path / "grid"
    shutil.copytree(grid, copy)
    ABLATION_DAMAGE[damage](copy, home)
    plan = _ablate(home, output=copy, dry_run=True)
    assert len(plan["cells"]) == 2
    doc = _ablate(home, output=copy)
    assert doc["unfinished"] == [] and [c["metrics"]["mrr"]["mean"] for c in doc["cells"]] == [
        c["metrics"]["mrr"]["mean"] for c in json.loads((grid / "results.json").read_text())["cells"]
    ]


@pytest.mark.slow
@pytest.mark.parametrize("text", ["[1, 2]", '{"dataset": '])
def test_an_ablation_with_a_damaged_ablation_json_is_refused_in_one_sentence(home, grid, tmp_path, text):
    copy = tmp_path / "grid"
    shutil.copytree(grid, copy)
    (copy / "ablation.json").write_text(text)
    with pytest.raises(UserError, match="ablation.json cannot be read") as exc:
        _ablate(home, output=copy)
    assert "\n" not in str(exc.value)


# -- gradient-conflict, export, eval: damaged or unwritable places ---------------------------------------------------


@pytest.mark.slow
def test_gradient_conflict_with_more_clusters_than_distinct_users_is_one_sentence(home, tmp_path):
    """Before: k-means left clusters empty (duplicate user representations) and the analysis ended in an
    AttributeError on their missing gradient."""
    import numpy as np

    from ilora_cli.ablation.analysis import AnalysisConfig, gradient_conflict, user_representations
    from ilora_cli.data.holdout import partition
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.encoders.io import load_encoder

    # the rows the run trained on (its encoder's holdout): the cycle data repeats histories across users
    dataset = PreparedDataset.open("cyc")
    rows = partition(dataset, None).second_stage_rows
    encoder, _ = load_encoder(home / "runs" / "s2" / "encoder")
    distinct = len(np.unique(user_representations(encoder, dataset.split("train"))[rows].round(5), axis=0))
    assert distinct < len(rows)  # the premise: more rows than distinct representations
    with pytest.raises(UserError, match=f"distinct user representations .* fewer than the {distinct + 1} clusters"):
        gradient_conflict(AnalysisConfig(run="s2", clusters=distinct + 1, rows_per_cluster=1, output=tmp_path / "gc"))


@pytest.mark.slow
@pytest.mark.parametrize("text", ["x: [1, 2\n", "- 1\n- 2\n", "seed: [1]\n"], ids=["not YAML", "a list", "a bad value"])
def test_gradient_conflict_of_a_run_whose_config_yaml_is_damaged_is_one_sentence(home, tmp_path, text):
    """Before: a config.yaml that was not YAML, or a YAML list, ended in yaml's ParserError or an AttributeError."""
    run = _copy_run(home, tmp_path)
    (run / "config.yaml").write_text(text)
    r = run_cli("ablate", "--analysis", "gradient-conflict", "--run", str(run), "--output", str(tmp_path / "gc"),
                "clusters=2", "rows_per_cluster=1", home=home)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "has no valid config.yaml" in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr
    assert not (tmp_path / "gc").exists()


@pytest.mark.slow
def test_export_to_a_place_that_cannot_hold_a_folder_is_one_sentence(home, tmp_path):
    """Before: `export --output /proc/x` ended in a FileNotFoundError from the temporary folder."""
    for output in ("/proc/x", "/proc/x/y", str(tmp_path / "a-file" / "x")):
        (tmp_path / "a-file").write_text("mine\n")
        r = run_cli("export", "--run", "s2", "--output", output, home=home)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (output, r.stderr)
        assert f"Could not write {output}" in r.stderr and "nothing was written" in r.stderr, r.stderr
    assert (tmp_path / "a-file").read_text() == "mine\n"


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: (r / "evaluations.json").write_text("{bad"),
        lambda r: (r / "evaluations.json").write_text("[1, 2]"),
        lambda r: (r / "logs" / "validation.jsonl").write_text('{"step": 2}\n{"st'),
        lambda r: (r / "logs" / "train.jsonl").write_text('[1]\n{"step": 1, "loss"'),
    ],
    ids=["evaluations truncated", "evaluations a list", "validation log damaged", "train log damaged"],
)
@pytest.mark.slow
def test_export_and_eval_of_a_run_with_damaged_logs_or_evaluations(home, tmp_path, damage):
    """Before: export (which writes the card when the run has none) and eval (which rewrites it) ended in
    JSONDecodeError, TypeError or KeyError on the damaged file."""
    from ilora_cli.api import evaluate, export

    run = _copy_run(home, tmp_path)
    damage(run)
    (run / "README.md").unlink()
    out = export(run=str(run), output=tmp_path / "export")
    assert "README.md" in out["files"]
    result = evaluate(runs=[str(run)], max_samples=2, draws=1, quiet=True)
    assert "s2-copy" in result["results"] and "evaluations.json" in os.listdir(run)
    assert len(json.loads((run / "evaluations.json").read_text())) == 1


@pytest.fixture
def read_only(tmp_path):
    """A function that makes a read-only copy of a folder: a read-only tmpfs where this runs as root (which
    ignores file modes) and mounting is allowed, else a copy without write permission."""
    mounts = []

    def make(src: Path | None, name: str) -> Path:
        target = tmp_path / f"ro-{name}"
        target.mkdir()
        if os.geteuid() == 0:
            import subprocess

            if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(target)]).returncode:
                pytest.skip("a read-only folder needs a tmpfs mount here (running as root)")
            mounts.append(target)
        if src is not None:
            shutil.copytree(src, target / src.name)
        if os.geteuid() == 0:
            subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        else:
            for folder, _, _ in os.walk(target):
                os.chmod(folder, 0o555)
        return target

    yield make
    for target in mounts:
        __import__("subprocess").run(["umount", str(target)])


@pytest.mark.slow
def test_export_to_and_eval_of_a_read_only_place_are_one_sentence(home, read_only, tmp_path):
    """Before: export into a read-only folder and eval of a read-only run (predictions written into it) ended in
    OSError tracebacks, the second after the whole evaluation."""
    folder = read_only(None, "out")
    r = run_cli("export", "--run", "s2", "--output", str(folder / "copy"), home=home)
    assert r.returncode == 2 and "Could not write" in r.stderr and "Traceback" not in r.stderr, r.stderr
    run = read_only(home / "runs" / "s2", "run") / "s2"
    r = run_cli("eval", "--run", str(run), "--max-samples", "2", home=home)
    assert r.returncode == 2 and "--predictions" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli("eval", "--run", str(run), "--max-samples", "2", "--predictions", str(tmp_path / "p.jsonl"), home=home)
    assert r.returncode == 0 and "card of" in r.stderr and (tmp_path / "p.jsonl").is_file(), r.stderr


@pytest.mark.slow
def test_a_truncated_backbone_is_one_sentence_in_train_and_recommend(home, tmp_path):
    """Before: a SafetensorError traceback from transformers."""
    backbone = tmp_path / "backbone"
    shutil.copytree(home / "tiny-backbone", backbone)
    _truncate(backbone / "model.safetensors")
    r = run_cli("train", "--dataset", "cyc", "--backbone", str(backbone), "--name", "tb", "--max-steps", "1",
                "--batch-size", "4", "candidates=6", home=home)  # fmt: skip
    assert r.returncode == 2 and "Could not load the backbone" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (home / "runs" / "tb").exists()
    run = _copy_run(home, tmp_path)
    _edit_info(run, lambda info: info["backbone"].__setitem__("name", str(backbone)))
    history = tmp_path / "h.json"
    history.write_text("[1, 2]")
    r = run_cli("recommend", "--run", str(run), "--user-history", str(history), home=home)
    assert r.returncode == 2 and "Could not load the backbone" in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- seeds and the Python API ----------------------------------------------------------------------------------------


def test_a_seed_of_2_to_the_32_is_one_sentence(data):
    """Before: train with --seed 4294967296 ended in numpy's ValueError from accelerate's set_seed."""
    from ilora_cli.ablation.analysis import AnalysisConfig
    from ilora_cli.ablation.config import resolve_ablation
    from ilora_cli.config import resolve
    from ilora_cli.data.prepare import PrepareConfig
    from ilora_cli.encoders.train import EncodeConfig

    for cls, extra in ((TrainConfig, []), (PrepareConfig, []), (EncodeConfig, []), (AnalysisConfig, ["run=x"])):
        with pytest.raises(UserError, match="seed must be from 0 to 4294967295"):
            resolve(cls, overrides=[*extra, "seed=4294967296"])
        resolve(cls, overrides=[*extra, "seed=4294967295"])
    for flags in ({"seed": 2**32}, {"seeds": f"1,{2**32}"}):
        with pytest.raises(UserError, match="4294967295"):
            resolve_ablation(None, {"dataset": "cyc", **flags}, None)
    r = run_cli("train", "--dataset", "cyc", "--backbone", str(data / "tiny-backbone"), "--seed", str(2**32),
                home=data)  # fmt: skip
    assert r.returncode == 2 and "seed must be" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_the_python_api_answers_wrong_types_with_a_user_error(home, tmp_path):
    """Before: TypeError for a config of another class or histories that are not a list, KeyError for a
    history object without "history", and paths made of whatever was passed (output={} wrote into '{}')."""
    import ilora_cli
    from ilora_cli.evaluation.evaluate import EvalConfig

    calls = {
        "a config of another class": lambda: ilora_cli.train(EvalConfig(runs=["x"])),
        "a string as the config": lambda: ilora_cli.train("cyc"),
        "histories that are a string": lambda: ilora_cli.recommend("s2", "abc"),
        "a history object without history": lambda: ilora_cli.recommend("s2", [{"foo": 1}]),
        "a run that is a number": lambda: ilora_cli.recommend(5, [[1]]),
        "a path that is a mapping": lambda: ilora_cli.export(run="s2", output={}),
        "a path that is a list": lambda: ilora_cli.recommend("s2", [[1]], candidates=[1, 2]),
        "a name that is a boolean": lambda: ilora_cli.train(dataset="cyc", name=True),
    }
    for what, call in calls.items():
        with pytest.raises(UserError):
            call()
            pytest.fail(what)
    assert not (Path.cwd() / "{}").exists()


def test_a_rank_wider_than_the_backbone_is_refused_before_allocating(data):
    """Before: rank=1000000 allocated 5.6 GB of LoRA weights before failing."""
    import resource

    with pytest.raises(UserError, match="rank 1000000 is wider than the backbone's hidden size \\(64\\)"):
        train(TrainConfig(backbone=str(data / "tiny-backbone"), name="wide", rank=1_000_000, experts=1, **FAST))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 << 20  # KiB: the process never grew to 4 GiB
    assert not (data / "runs" / "wide").exists()
