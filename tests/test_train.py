"""ilora train on a tiny backbone: run directory, reload in a fresh process, exact resume, DDP, 4-bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ilora_cli.errors import UserError
from ilora_cli.training.checkpoint import list_checkpoints
from ilora_cli.training.loop import TrainConfig, train, weights_digest

from conftest import run_cli

pytestmark = pytest.mark.slow  # end-to-end training, DDP, 4-bit

FAST = dict(dataset="cyc", batch_size=4, candidates=6, checkpoint_every=2, quiet=True, seed=5)


@pytest.fixture
def world(tiny_world, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    return tiny_world


def _cfg(world, **kw):
    return TrainConfig(backbone=str(world / "tiny-backbone"), **{**FAST, **kw})


# What eval and recommend compute from a run (the item head: candidate scores, the whole catalogue's, the gates,
# recommend's ranking), in a fresh process that has only the run directory.
HISTORIES, CANDIDATES = [[0, 1, 2], [5, 6, 7, 8]], [[[3, 4, 9, 10, 11, 12]], [[9, 1, 2, 3, 4, 5]]]  # (N, D, C)
RELOAD = r"""
import json, sys
import numpy as np
from ilora_cli import recommend
from ilora_cli.evaluation.llm import score_rows
from ilora_cli.training.run import load_run
histories, candidates = json.loads(sys.argv[2]), np.array(json.loads(sys.argv[3]))
out = score_rows(load_run(sys.argv[1]), histories, candidates, catalogue=True)
ranked = recommend(sys.argv[1], histories, top_k=5)
recs = [[[r["item_id"], r["score"], r["llm_score"]] for r in user["recommendations"]] for user in ranked]
print(json.dumps({k: out[k].tolist() for k in ("draws", "catalogue", "gates")} | {"recommend": recs}))
"""


def test_train_writes_a_complete_run_that_reloads_identically(world, tmp_path):
    """The run directory holds the trained weights, and what eval and recommend compute from it after a reload, in
    this process or a fresh one, is what the trained model computed before it was saved."""
    import numpy as np

    from ilora_cli.evaluation.llm import score_rows
    from ilora_cli.training.loop import Trainer
    from ilora_cli.training.validation import run_view

    trainer = Trainer(_cfg(world, name="r1", max_steps=3, experts=4))
    result = trainer.run()
    trained = trainer.unwrapped.eval()  # the model in memory, as training left it
    assert trained.item_head is not None and trained.fusion is not None  # the default head, with fusion weights
    before = score_rows(run_view(trainer), HISTORIES, np.array(CANDIDATES), catalogue=True)
    prefix = trainer.builder.batch(HISTORIES, [[]] * 2, None, None, trainer.dataset.pad_id, padding_side="left")
    with torch.no_grad():
        encoder_scores = (trained.user_representation(prefix) @ trained.encoder.item_embeddings().float().T).numpy()
    run_dir = world / "runs" / "r1"
    assert result["run_dir"] == str(run_dir) and result["steps"] == 3 and result["complete"]
    assert result["train_samples_per_second"] > 0 and result["final_loss"] is not None
    for name in (
        "ilora.json",
        "config.yaml",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "projector.safetensors",
        "gate.safetensors",
        "encoder/encoder.safetensors",
        "items.json",
        "logs/train.jsonl",
    ):
        assert (run_dir / name).exists(), name
    info = json.loads((run_dir / "ilora.json").read_text())
    assert info["experts"]["experts"] == 4 and info["dataset"]["name"] == "cyc"
    log = [json.loads(line) for line in (run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all("samples_per_second" in r for r in log)
    # the saved weights are the trained ones
    ckpt = load_file(list_checkpoints(run_dir / "checkpoints")[-1] / "trainable.safetensors")
    from ilora_cli.training.run import load_run

    run = load_run(run_dir)
    params = dict(run.model.named_parameters())
    for name, value in ckpt.items():
        assert torch.equal(params[name].detach(), value), name
    from ilora_cli.training.loop import is_trained_weight, weights_digest

    # the fusion is fitted on the users set apart after the last step (the default), so no checkpoint holds it
    assert info["fusion_fit"]["on"] == "apart" and run.fusion == info["fusion"]
    assert set(ckpt) == {n for n in params if is_trained_weight(n) and not n.startswith("fusion.")}

    stored = (run_dir / "logs" / "weights-rank0.sha256").read_text().strip()
    assert weights_digest(run.model) == stored
    # a reload in this process, and in two fresh ones, scores candidates and the catalogue as the trained model did
    here = score_rows(run, HISTORIES, np.array(CANDIDATES), catalogue=True)
    outs = []
    for _ in range(2):
        r = subprocess.run(
            [sys.executable, "-c", RELOAD, str(run_dir), json.dumps(HISTORIES), json.dumps(CANDIDATES)],
            capture_output=True,
            text=True,
            env=dict(os.environ),
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1]
    for key in ("draws", "catalogue", "gates"):
        assert outs[0][key] == here[key].tolist(), key
        np.testing.assert_allclose(here[key], before[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert np.ptp(before["catalogue"], axis=1).min() > 1e-3  # scores that rank something
    # recommend after the reload: the trained model's fused catalogue ranking, the history left out
    fused = info["fusion"]["llm"] * before["catalogue"] + info["fusion"]["encoder"] * encoder_scores  # (N, n_items)
    for b, (history, recs) in enumerate(zip(HISTORIES, outs[0]["recommend"])):
        order = [int(i) for i in np.argsort(-fused[b], kind="stable") if i not in history][:5]
        assert [item for item, _, _ in recs] == order, b
        for item, score, llm_score in recs:
            assert score == pytest.approx(float(fused[b, item]), rel=1e-5, abs=1e-6)
            assert llm_score == pytest.approx(float(before["catalogue"][b, item]), rel=1e-5, abs=1e-6)
    # eval after the reload: the val catalogue metrics that training measured on the model in memory
    from ilora_cli.evaluation.evaluate import EvalConfig, evaluate

    check = info["catalogue_check"]
    res = evaluate(EvalConfig(runs=["r1"], batch_size=16, quiet=True))["results"]["r1"]
    assert check["split"] == "val" and check["metric"] == "full_ndcg@10"
    assert res["metrics"]["full_ndcg@10"]["mean"] == pytest.approx(check["default"], abs=1e-9)
    assert res["encoder"]["metrics"]["full_ndcg@10"]["mean"] == pytest.approx(check["encoder"], abs=1e-9)


def test_resume_continues_exactly(world):
    full = train(_cfg(world, name="full", max_steps=5, lora_dropout=0.1))
    part = train(_cfg(world, name="part", max_steps=5, lora_dropout=0.1, stop_after=2))
    assert part["steps"] == 2 and not part["complete"]
    assert not (world / "runs" / "part" / "ilora.json").exists()
    log = world / "runs" / "part" / "logs" / "train.jsonl"
    with open(log, "a", encoding="utf-8") as fh:  # what a process killed during step 3 leaves behind
        fh.write(json.dumps({"step": 3, "loss": 9.9}) + "\n")
    resumed = train(_cfg(world, name="part", max_steps=5, lora_dropout=0.1, resume=True))
    assert resumed["steps"] == 5 and resumed["resumed_from"].endswith("step-000002")
    assert resumed["weights_sha256"] == full["weights_sha256"]
    assert resumed["final_loss"] == full["final_loss"]
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_generate_objective_and_text_prompt(world):
    r = train(_cfg(world, name="gen", max_steps=2, objective="generate", prompt="text", experts=1))
    assert r["complete"] and not (world / "runs" / "gen" / "projector.safetensors").exists()


def test_rank_levers_train_save_and_reload(world):
    """Compact templates, distillation, hard negatives and a learned fusion weight, end to end."""
    from ilora_cli.training.loop import weights_digest
    from ilora_cli.training.run import load_run

    r = train(
        _cfg(
            world,
            name="levers",
            max_steps=3,
            templates="compact",
            distill_weight=0.5,
            distill_temperature=2.0,
            hard_negatives=0.5,
            hard_pool=8,
            fusion_lr=0.1,
            apart_users=0,  # the fusion trained on the batches, by the optimizer (its loss term is logged)
            validate_at=[1, 3],
            validate_rows=3,
            validate_draws=1,
        )
    )
    run_dir = world / "runs" / "levers"
    info = json.loads((run_dir / "ilora.json").read_text())
    assert info["templates"] == "compact" and r["complete"]
    fusion = info["fusion"]
    assert fusion == pytest.approx(r["fusion"]) and fusion["llm"] != 0.0  # trained away from the encoder alone
    log = [json.loads(x) for x in (run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert {"loss_listwise", "loss_distill", "loss_fused", "fusion"} <= set(log[-1])
    run = load_run(run_dir)
    assert run.fusion == fusion and run.builder.template_set == "compact"
    val = [json.loads(x) for x in (run_dir / "logs" / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [1, 3] and set(val[0]["val"]) == {"llm", "fused", "encoder"}
    assert val[0]["val_rows"] == 3 and val[0]["val_draws"] == 1
    # the last validation is what `eval` reports for the finished run on the same rows and draws
    from ilora_cli.evaluation.evaluate import EvalConfig, evaluate

    ev = evaluate(EvalConfig(runs=["levers"], max_samples=3, draws=1, quiet=True))
    assert ev["results"]["levers"]["llm"]["metrics"]["mrr"]["mean"] == pytest.approx(val[-1]["val"]["llm"]["mrr"])
    assert ev["metrics"]["mrr"]["mean"] == pytest.approx(val[-1]["val"]["fused"]["mrr"], abs=1e-6)
    assert weights_digest(run.model) == r["weights_sha256"]  # β is among the saved, reloaded weights


def test_rank_only_settings_are_refused_with_the_generate_objective(world):
    ok = TrainConfig(objective="generate")
    ok.validate()
    assert ok.fusion == "none" and ok.distill_weight == 0.0
    for bad, msg in (
        (dict(objective="generate", fusion="learned"), "only the rank objective"),
        (dict(objective="generate", distill_weight=0.3), "only the rank objective"),
        (dict(distill_weight=-1), "distill_weight"),
        (dict(distill_temperature=0), "distill_temperature"),
        (dict(hard_negatives=1.5), "hard_negatives"),
        (dict(fusion="maybe"), "Unknown fusion"),
        (dict(templates="long"), "template set"),
    ):
        with pytest.raises(UserError, match=msg):
            TrainConfig(**bad).validate()


def test_existing_run_is_refused_and_bad_config_is_one_sentence(world):
    train(_cfg(world, name="dup", max_steps=1))
    with pytest.raises(Exception, match="already exists"):
        train(_cfg(world, name="dup", max_steps=1))
    r = run_cli("train", "--dataset", "cyc", "--experts", "3", "--backbone", str(world / "tiny-backbone"), home=world)
    assert r.returncode == 2 and "multiple of experts" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "--dataset", "nope", home=world)
    assert r.returncode == 2 and "No prepared dataset" in r.stderr


def test_cli_train_json_and_resume_after_stop(world):
    args = [
        "train",
        "--dataset",
        "cyc",
        "--backbone",
        str(world / "tiny-backbone"),
        "--name",
        "cli",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "candidates=6",
        "quiet=true",
    ]
    r = run_cli(*args, "--stop-after", "1", "--json", home=world)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 1
    r = run_cli("train", "--name", "cli", "--dataset", "cyc", "--resume", "--json", home=world)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["steps"] == 3 and doc["complete"] and {"run_dir", "final_loss", "train_samples_per_second"} <= set(doc)


def test_two_process_ddp_gives_identical_weights(world, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun comes with torch"
    env = dict(os.environ, ILORA_HOME=str(world), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "ilora_cli.cli",
            "train",
            "--dataset",
            "cyc",
            "--backbone",
            str(world / "tiny-backbone"),
            "--name",
            "ddp",
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "candidates=6",
            "quiet=true",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["processes"] == 2  # one JSON document: only the main process prints
    logs = world / "runs" / "ddp" / "logs"
    digests = {p.read_text().strip() for p in logs.glob("weights-rank*.sha256")}
    assert len(list(logs.glob("weights-rank*.sha256"))) == 2 and len(digests) == 1
    info = json.loads((world / "runs" / "ddp" / "ilora.json").read_text())
    assert info["training"]["processes"] == 2


def test_4bit_backbone_forward_and_backward_on_cpu(world):
    pytest.importorskip("bitsandbytes")
    from ilora_cli.encoders.io import load_encoder
    from ilora_cli.llm.backbone import BackboneSpec, load_backbone, prepare_for_training
    from ilora_cli.llm.model import ExpertConfig, ILoraModel, attach_lora
    from ilora_cli.llm.prompt import PromptBuilder

    base, tok = load_backbone(BackboneSpec(str(world / "tiny-backbone"), load_in_4bit=True))
    assert getattr(base, "is_loaded_in_4bit", False)
    base = prepare_for_training(base)
    encoder, _ = load_encoder("cyc-sasrec")
    cfg = ExpertConfig(experts=2, rank=4)
    model = ILoraModel(attach_lora(base, cfg), tok, encoder, cfg)
    q_proj = next(m for n, m in model.llm.named_modules() if n.endswith("q_proj"))
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    builder = PromptBuilder(tok, [f"Item {chr(65 + i % 26)}{i}" for i in range(30)])
    model.train()
    out, gates = model(builder.batch([[0, 1, 2]], [[3, 4, 5]], [3], pad_id=30))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.trainable_parameters()["lora"])


def _trained_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}


def test_gradient_accumulation_equals_the_larger_batch_and_resumes_mid_cycle_exactly(world):
    """batch_size=4 grad_accum=2 takes the same steps as batch_size=8 (the same rows, the mean loss of each
    micro-batch halved and summed), so the weights agree to rounding; and a run resumed after being abandoned
    in the middle of an accumulation cycle (gradients of one micro-batch accumulated, no step taken) ends
    bit for bit where the uninterrupted run ends."""
    from ilora_cli.training.loop import Trainer

    # 24 rows (the held users' last 4, none set apart): epochs of 3 steps of 8 or 6 of 2 × 4 end at the same row
    common = dict(
        max_steps=4, experts=2, lora_dropout=0.0, checkpoint_every=1, holdout="users:0.2+last:4", apart_users=0
    )
    big = Trainer(_cfg(world, name="ga-big", batch_size=8, **common))
    big.run()
    accumulated = Trainer(_cfg(world, name="ga-acc", batch_size=4, grad_accum=2, **common))
    accumulated.run()
    a, b = _trained_weights(big), _trained_weights(accumulated)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    # resumed from step 2 after a half cycle that was thrown away
    Trainer(_cfg(world, name="ga-part", batch_size=4, grad_accum=2, stop_after=2, **common)).run()
    abandoned = Trainer(_cfg(world, name="ga-part", batch_size=4, grad_accum=2, resume=True, **common))
    assert abandoned.step_count == 2
    with abandoned.accelerator.accumulate(abandoned.model):  # micro-step 0 of step 3, then the process "dies"
        from ilora_cli.training.loop import batch_loss

        batch, target_index = abandoned.step_batches(abandoned.step_count)[0]
        a = abandoned
        loss, _, _ = batch_loss(a.model, a.unwrapped, a.scorer, a.builder, batch, target_index, a.config)
        abandoned.accelerator.backward(loss)
    assert not abandoned.accelerator.sync_gradients
    del abandoned
    resumed = Trainer(_cfg(world, name="ga-part", batch_size=4, grad_accum=2, resume=True, **common))
    summary = resumed.run()
    assert summary["resumed_from"].endswith("step-000002") and summary["complete"]
    c = _trained_weights(resumed)
    assert all(torch.equal(c[n], b[n]) for n in b)
    assert summary["weights_sha256"] == weights_digest(accumulated.unwrapped)
