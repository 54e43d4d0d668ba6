"""Artifacts travel: the Python API, the run's card, a portable adapter config, ilora export (and --merge)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ilora_cli
from ilora_cli.errors import UserError

from conftest import run_cli

FAST = dict(dataset="cyc", batch_size=4, candidates=6, checkpoint_every=2, quiet=True, seed=5, max_steps=2)


@pytest.fixture
def world(tiny_world, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    return tiny_world


def test_api_validates_like_the_command_line(world):
    from ilora_cli import TrainConfig, train

    with pytest.raises(UserError, match="Unknown gate 'nope'"):
        train(dataset="cyc", gate="nope")
    with pytest.raises(UserError, match="lr must be a number"):
        train(TrainConfig(dataset="cyc"), lr="fast")
    with pytest.raises(UserError, match="Unknown key colour"):
        train(dataset="cyc", colour="red")
    cli = run_cli("train", "gate=nope", home=world)
    assert cli.returncode == 2 and "Unknown gate 'nope'" in cli.stderr


@pytest.mark.slow
def test_api_train_evaluate_recommend_export_and_merge(world, tmp_path):
    from ilora_cli import TrainConfig, evaluate, export, recommend, train

    backbone = str(world / "tiny-backbone")
    result = train(TrainConfig(backbone=backbone, name="api-k1", experts=1, **FAST))
    run_dir = world / "runs" / "api-k1"
    assert result["run_dir"] == str(run_dir) and result["complete"]

    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == backbone  # the path the user gave

    card = (run_dir / "README.md").read_text()
    assert f"`{backbone}`" in card and "K = 1" in card and "Not evaluated yet" in card
    ev = evaluate(runs=["api-k1"], encoder=True, max_samples=4)
    assert set(ev["results"]) == {"api-k1", "encoder", "popularity"}
    card = (run_dir / "README.md").read_text()
    assert "`ilora eval` on val / score /" in card and "| encoder |" in card

    recs = recommend("api-k1", [[0, 1, 2], ["Item D3", 4]], top_k=3)
    assert [len(r["recommendations"]) for r in recs] == [3, 3] and recs[1]["history"][0]["item_id"] == 3

    out = tmp_path / "shared"
    doc = export(run="api-k1", output=out, merge=True)
    assert "checkpoints" not in " ".join(doc["files"]) and "merged/model.safetensors" in doc["files"]
    for name in (
        "ilora.json",
        "adapter/adapter_model.safetensors",
        "gate.safetensors",
        "encoder/encoder.json",
        "items.json",
        "README.md",
        "plots/loss.png",
    ):
        assert (out / name).is_file(), name

    # The copy is a run of its own: it evaluates without the original.
    copied = evaluate(runs=[str(out)], max_samples=4)
    assert copied["results"]["shared"]["metrics"] == ev["results"]["api-k1"]["metrics"]

    # merged/ is a plain causal LM whose logits equal the backbone + LoRA.
    from transformers import AutoModelForCausalLM

    from ilora_cli.training.run import load_run

    run = load_run(out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([[1, 5, 7, 9, 2, 4]])
    with torch.no_grad():
        want = run.model.llm(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_export_refuses_merge_with_experts_and_an_existing_output(world, tmp_path):
    from ilora_cli import TrainConfig, export, train

    train(TrainConfig(backbone=str(world / "tiny-backbone"), name="api-k2", experts=2, **FAST))
    with pytest.raises(UserError, match="--merge needs a single LoRA"):
        export(run="api-k2", output=tmp_path / "x", merge=True)
    assert not (tmp_path / "x").exists()
    r = run_cli("export", "--run", "api-k2", "--output", str(tmp_path / "y"), "--json", home=world)
    assert r.returncode == 0, r.stderr
    assert "adapter/adapter_config.json" in json.loads(r.stdout)["files"]
    again = run_cli("export", "--run", "api-k2", "--output", str(tmp_path / "y"), home=world)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.slow
def test_backbone_without_a_slash_is_a_local_path_or_a_hub_id(world):
    """A relative directory name is read as such; any other name is a hub id (here offline: one sentence)."""
    r = run_cli(
        "train",
        "--dataset",
        "cyc",
        "--backbone",
        "tiny-backbone",
        "--name",
        "rel",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "candidates=6",
        "quiet=true",
        home=world,
        cwd=world,
    )
    assert r.returncode == 0, r.stderr
    adapter = json.loads((world / "runs" / "rel" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-backbone"
    env = dict(os.environ, ILORA_HOME=str(world), HF_HUB_OFFLINE="1")
    hub = subprocess.run(
        [sys.executable, "-m", "ilora_cli.cli", "train", "--dataset", "cyc", "--backbone", "gpt2", "--name", "hub"],
        capture_output=True,
        text=True,
        env=env,
        cwd=world,
    )
    assert hub.returncode == 2 and hub.stderr.startswith("error: Could not load the backbone gpt2"), hub.stderr


def test_package_exports_the_api_without_loading_torch():
    code = (
        "import sys, ilora_cli; from ilora_cli import prepare, encode, train, evaluate, recommend; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
    assert ilora_cli.__all__[:6] == ["__version__", "prepare", "encode", "train", "evaluate", "recommend"]
