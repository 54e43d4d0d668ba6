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

from conftest import run_cli

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


def test_recommend_json_is_valid_json_when_fusion_weights_are_extreme(home, tmp_path):
    """Before: `recommend --json` printed -Infinity for the scores of a run with extreme (finite) fusion weights."""
    run = _copy_run(home, tmp_path)
    _edit_info(run, lambda info: info.__setitem__("fusion", {"llm": 1e308, "encoder": 1e308}))
    history = tmp_path / "h.json"
    history.write_text("[1, 2, 3]")
    r = run_cli("recommend", "--run", str(run), "--user-history", str(history), "--json", home=home)
    assert r.returncode == 0, r.stderr
    doc = _strict_json(r.stdout)
    assert all(x["score"] is None for x in doc["recommendations"]) and "written as null" in r.stderr
    batch = tmp_path / "h.jsonl"
    batch.write_text("[1, 2, 3]\n[4, 5]\n")
    r = run_cli("recommend", "--run", str(run), "--user-history", str(batch), home=home)
    assert r.returncode == 0 and [len(_strict_json(line)["recommendations"]) for line in r.stdout.splitlines()] == [
        10,
        10,
    ]


def test_json_text_writes_non_finite_numbers_as_null():
    import numpy as np

    from ilora_cli.console import json_text

    doc = {"a": float("nan"), "b": [1.0, float("-inf"), np.float32(2.5)], "c": {"d": np.float64("inf")}, "e": "x"}
    assert _strict_json(json_text(doc)) == {"a": None, "b": [1.0, None, 2.5], "c": {"d": None}, "e": "x"}


# -- messages are printed literally ----------------------------------------------------------------------------------


def test_messages_keep_their_square_brackets(home, tmp_path):
    """Before: error sentences were read as rich markup, so `[nan]`, `'a[b]'` and `'ilora[wandb]'` vanished."""
    r = run_cli("ablate", "--dataset", "cyc", "--train-fraction", "nan", "--dry-run", home=home)
    assert r.returncode == 2 and "got [nan]." in r.stderr, r.stderr
    r = run_cli("train", "--name", "a[b]", home=home)
    assert r.returncode == 2 and "'a[b]'" in r.stderr, r.stderr
    history = tmp_path / "h.json"
    history.write_text("[1, 2]")
    r = run_cli("recommend", "--run", "s2", "--user-history", str(history), "--candidates", "absent.json", home=home)
    assert r.returncode == 2 and "The candidates file absent.json is missing." in r.stderr, r.stderr


def test_the_install_hint_of_a_missing_tracker_names_the_extra(home):
    pytest.importorskip("tensorboard")
    if __import__("importlib").util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed: its hint cannot be seen")
    r = run_cli("train", "--dataset", "cyc", "--backbone", str(home / "tiny-backbone"), "--name", "w",
                "--report-to", "wandb", "--max-steps", "1", home=home)  # fmt: skip
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


def test_a_run_named_007_is_called_007(home):
    r = run_cli("train", "--dataset", "cyc", "name=007", "--print-config", home=home)
    assert r.returncode == 0 and "name: '007'" in r.stdout, r.stderr


# -- ablate: the size of a grid, cells that would share a name, candidates the catalogue cannot fill ----------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seeds", [10_000, 250_000], ids=["40,000 cells", "1,000,000 cells"])
def test_a_huge_grid_is_refused_at_once(home, seeds):
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


def test_grid_values_that_would_share_a_cell_name_are_refused(home):
    """Before: --train-fraction 0.5,0.5000001 made two cells named users0.5 that shared one run."""
    from ilora_cli.ablation.config import resolve_ablation

    with pytest.raises(UserError, match="0.5 and 0.5000001 would both be named 'users0.5'"):
        resolve_ablation(None, {"dataset": "cyc", "train_fraction": "0.5,0.5000001"}, None)
    assert resolve_ablation(None, {"dataset": "cyc", "train_fraction": "0.5,0.500001"}, None).train_fraction


def test_candidates_the_catalogue_cannot_fill_are_refused_by_the_dry_run(home):
    """Before: --dry-run accepted --candidates 100000, which the real run refused only after training the cell."""
    r = run_cli("ablate", "--dataset", "cyc", "--candidates", "6,100000", "--dry-run", home=home)
    assert r.returncode == 2 and "--candidates 100000 is more than the catalogue can fill" in r.stderr, r.stderr
    r = run_cli("ablate", "--dataset", "cyc", "--candidates", "6,20", "--dry-run", "--json", home=home)
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
