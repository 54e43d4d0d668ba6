"""What a :class:`~ilora_cli.training.trainer.Trainer` checks while and after it trains: validation on the val
rows, the best checkpoint of ``--keep-best``, and the pictures of plots/ (the loss, validation and gate pictures).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..console import err
from ..home import append_json_line

_RESUME_HINT = "the last checkpoint is intact: free some space and pass --resume."


def pictures(trainer) -> None:
    """plots/: the loss curve, the validation curves when validation ran, and the gate picture."""
    from .. import plots

    written = plots.training_plots(trainer.run_dir)
    gates = gate_picture(trainer)
    if gates is not None:
        written.append(gates)
    err.print(f"Pictures: {', '.join(str(p.relative_to(trainer.run_dir)) for p in written)}.")


@torch.no_grad()
def gate_picture(trainer, max_rows: int = 2000) -> Path | None:
    """plots/gates.png (+ gates.json): the mean expert weights of the val rows per group of users — the
    synthetic groups when known, else k-means clusters of the encoder's user representations. Not drawn for
    K = 1 or the token gate (which routes per token, not per user)."""
    from .. import plots

    config, model, dataset = trainer.config, trainer.unwrapped, trainer.dataset
    if config.experts == 1 or config.gate == "token" or "val" not in dataset.splits:
        return None
    split = dataset.split("val")
    if split.candidates is None or len(split) == 0:
        return None
    n = min(len(split), max_rows)
    histories, targets = split.histories()[:n], split.next[:n]
    gates, users = [], []
    model.eval()
    try:
        for start in range(0, n, 64):
            batch = trainer.builder.batch(
                histories[start : start + 64],
                split.candidates[start : start + 64, 0].tolist(),
                None,
                None,
                dataset.pad_id,
                dataset.max_history,
                padding_side="left",
            ).to(trainer.accelerator.device)
            gates.append(model.gates(batch, model.embed(batch)).float().cpu().numpy())  # (b, K)
            users.append(model.user_representation(batch).float().cpu().numpy())  # (b, d)
    finally:
        model.train()
    gate_rows, user_rows = np.concatenate(gates), np.concatenate(users)  # (n, K), (n, d)
    groups, kind = plots.user_groups(dataset.meta, histories, targets, user_rows, seed=config.seed)
    path = trainer.run_dir / "plots" / "gates.png"
    plots.gate_heatmap(
        gate_rows,
        groups,
        path,
        f"{trainer.run_dir.name}: K={config.experts}, gate {config.gate}, {n} val rows",
        kind,
    )
    doc = {
        "groups": kind,
        "rows": n,
        "mean_gate": {str(g): [round(float(x), 5) for x in gate_rows[groups == g].mean(0)] for g in np.unique(groups)},
        "size": {str(g): int((groups == g).sum()) for g in np.unique(groups)},
    }
    (path.parent / "gates.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def validates_at(trainer, step: int) -> bool:
    config = trainer.config
    return bool(
        (config.validate_every and step % config.validate_every == 0)
        or (config.validate_at and step in config.validate_at)
        or (config.keep_best and step == trainer.total_steps)  # the last weights compete too
    )


def best_dir(trainer) -> Path:
    return trainer.run_dir / "checkpoints" / "best"


def keep_if_best(trainer, result: dict[str, Any] | None) -> None:
    """Keep the weights when the run's default ranking (fused, else the LLM's) has its best val MRR so far."""
    if not trainer.config.keep_best or result is None:
        return
    from .checkpoint import save_checkpoint

    ranking = "fused" if "fused" in result["val"] else "llm"
    mrr = result["val"][ranking]["mrr"]
    kept = best(trainer)
    if kept is None or mrr > kept["val_mrr"]:
        trainable = {n: p for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
        state = {"step": trainer.step_count, "val_mrr": mrr, "ranking": ranking, "losses": trainer.losses}
        save_checkpoint(best_dir(trainer), trainable, trainer.optimizer, trainer.scheduler, state, keep=1)


def best(trainer) -> dict[str, Any] | None:
    """The kept best checkpoint's state (step, val_mrr, ranking) and path, or None."""
    from .checkpoint import list_checkpoints

    found = list_checkpoints(best_dir(trainer))
    if not found:
        return None
    state = json.loads((found[-1] / "state.json").read_text(encoding="utf-8"))
    return {"step": state["step"], "val_mrr": state["val_mrr"], "ranking": state["ranking"], "path": found[-1]}


def load_best(trainer) -> None:
    """Every process loads the kept best weights, so that the run directory holds them."""
    from .checkpoint import load_checkpoint

    kept = best(trainer)
    if kept is None:
        return
    trainer.kept = {k: kept[k] for k in ("step", "val_mrr", "ranking")} | {"last_step": trainer.step_count}
    if kept["step"] != trainer.step_count:
        trainable = load_checkpoint(kept["path"])["trainable"]
        params = dict(trainer.unwrapped.named_parameters())
        with torch.no_grad():
            for name, value in trainable.items():
                params[name].copy_(value)
    if trainer.main:
        err.print(
            f"Keeping the weights of step {kept['step']} (best val MRR {kept['val_mrr']:.4f}, {kept['ranking']} "
            f"ranking) in the run directory; the last step's ({trainer.step_count}) stay in checkpoints/."
        )


def validate(trainer, step: int) -> dict[str, Any] | None:
    """Score the val rows with the model as it is now (main process); log HR@1 and MRR of the LLM alone,
    the fused ranking and the encoder, mean over the candidate draws. Training is not disturbed: no RNG
    is drawn and the model goes back to training mode."""
    from ..evaluation.evaluate import EvalConfig, evaluate_run, load_split
    from .run import LoadedRun

    result = None
    if trainer.main:
        config, model = trainer.config, trainer.unwrapped
        if not hasattr(trainer, "_val_split"):
            ev = EvalConfig(runs=["training"], draws=config.validate_draws, max_samples=config.validate_rows)
            trainer._val_split = load_split(ev, trainer.dataset)
        info = {
            "experts": {"head": config.head},
            "dataset": {"pad_id": trainer.dataset.pad_id, "max_history": trainer.dataset.max_history},
            "normalize": config.normalize,
            "fusion": model.fusion.weights() if model.fusion is not None else None,
        }
        run = LoadedRun(model, trainer.builder.tokenizer, trainer.builder, info, trainer.dataset.titles)
        t0 = time.perf_counter()
        model.eval()
        try:
            ev = EvalConfig(runs=["training"], batch_size=max(16, config.batch_size), quiet=True)
            out = evaluate_run(run, trainer._val_split, ev, "validation", None)
        finally:
            model.train()
        rankings = {"llm": out["llm"] if "llm" in out else out, "encoder": out["encoder"]}
        if out["ranking"] == "fused":
            rankings["fused"] = out
        result = {
            "step": step,
            "samples": step * trainer.per_step,
            "llm_encoder_top1_agreement": out.get("llm_encoder_top1_agreement"),
            "val": {
                name: {m: r["metrics"][m]["mean"] for m in ("hr@1", "hr@5", "ndcg@5", "mrr")}
                for name, r in rankings.items()
            },
            "val_rows": len(trainer._val_split),
            "val_draws": int(trainer._val_split.candidates.shape[1]),
            "val_seconds": round(time.perf_counter() - t0, 3),
        }
        append_json_line(trainer.run_dir / "logs" / "validation.jsonl", result, _RESUME_HINT)
        trainer.accelerator.log(
            {f"val/{name}_{m}": v for name, ms in result["val"].items() for m, v in ms.items()}, step=step
        )
        llm, fused = result["val"]["llm"], result["val"].get("fused")
        err.print(
            f"step {step}: val HR@1 / MRR  LLM {llm['hr@1']:.3f} / {llm['mrr']:.3f}"
            + (f"  fused {fused['hr@1']:.3f} / {fused['mrr']:.3f}" if fused else "")
            + f"  encoder {result['val']['encoder']['hr@1']:.3f} / {result['val']['encoder']['mrr']:.3f}"
            + f"  ({result['val_seconds']:.0f} s)"
        )
    trainer.accelerator.wait_for_everyone()
    return result
