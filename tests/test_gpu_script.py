"""The prepared GPU script (bench/gpu_lastfm.sh) runs end to end in miniature: both phases, every output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_in_miniature(tiny_world, tmp_path):
    out = tmp_path / "out"
    env = dict(
        os.environ,
        ILORA_HOME=str(tiny_world),
        OUT=str(out),
        PYTHON=sys.executable,
        PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    r = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_lastfm.sh"), "--tiny", "cyc", str(tiny_world / "tiny-backbone")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "gpu-lastfm.json").read_text())
    for k in ("k1", "k4"):
        run = doc["runs"][k]
        assert run["train"]["complete"] and run["train"]["steps"] == 2, r.stdout
        m = run["metrics"]
        assert {"hr@1", "mrr"} <= set(m["default"]) and {"hr@1", "mrr"} <= set(m["llm"]) and "hr@1" in m["encoder"]
    assert doc["runs"]["k4"]["metrics"]["ranking"] == "fused"
    for name in ("levers.json", "mechanism.json"):
        sweep = json.loads((out / name).read_text())
        assert sweep["runs"] and all(x["final"] for x in sweep["runs"].values()), name
    assert set(json.loads((out / "mechanism.json").read_text())["summary"]) == {"k4-user", "k1"}
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"./train-k1.log", "./eval-k4.json"} <= set(tar.getnames())


def _reference_budget(tiny_world, out, **env_extra):
    env = dict(
        os.environ,
        ILORA_HOME=str(tiny_world),
        OUT=str(out),
        PYTHON=sys.executable,
        PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **env_extra,
    )
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_reference_budget.sh"), "--tiny", "cyc", str(tiny_world / "tiny-backbone")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_reference_budget_script_in_miniature(tiny_world, tmp_path):
    """bench/gpu_reference_budget.sh: the profile of both heads, both runs validated at every step, the curves."""
    out = tmp_path / "out"
    r = _reference_budget(tiny_world, out)
    assert r.returncode == 0, r.stdout + r.stderr
    profile = json.loads((out / "profile-step.json").read_text())
    for head in ("title", "item"):
        p = profile["heads"][head]
        assert p["samples_per_second"] > 0 and p["host"] and p["model_tflops_per_second"] > 0
    assert profile["heads"]["title"]["scored_positions_per_step"] > 0 and profile["eval"]["rows_per_second"] > 0
    curves = json.loads((out / "curves.json").read_text())
    for head in ("title", "item"):
        c = curves[head]
        assert c["steps"] == [1, 2, 3] and c["samples"] == [4, 8, 12] and not c["stopped_by_budget"]
        assert all(len(c[f"{r}_{m}"]) == 3 for r in ("llm", "fused", "encoder") for m in ("hr@1", "mrr"))
    assert (out / "curves.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by_budget"] == [] and summary["train"]["item"]["complete"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./train-title.log", "./run-item/logs/validation.jsonl"} <= names
    assert not any(n.endswith(".safetensors") for n in names)


@pytest.mark.slow
def test_reference_budget_guard_stops_cleanly_and_keeps_what_was_measured(tiny_world, tmp_path):
    """Runs far longer than their time limit are interrupted; the script still ends well, with the validations made
    until then in the curves and both runs marked as stopped by the budget."""
    out = tmp_path / "out"
    r = _reference_budget(tiny_world, out, STEPS="100000", TRAIN_LIMIT="20", PROFILE_LIMIT="3")
    assert r.returncode == 0, r.stdout + r.stderr
    curves = json.loads((out / "curves.json").read_text())
    assert all(curves[h]["stopped_by_budget"] for h in ("title", "item")), r.stdout
    assert all(curves[h]["last_step"] < 100000 for h in ("title", "item"))
    assert json.loads((out / "summary.json").read_text())["stopped_by_budget"] == ["title", "item"]
    assert (out / "curves.png").is_file() and "stopped by the budget" in r.stdout
