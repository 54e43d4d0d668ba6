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
