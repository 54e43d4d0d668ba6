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
    """Keep the weights when the run's default ranking (fused, else the LLM's) has its best selection metric so far
    (:func:`selection`): on the rows set apart when there are any, else on val."""
    if not trainer.config.keep_best or result is None:
        return
    from .checkpoint import save_checkpoint

    chosen = result["selection"]
    kept = best(trainer)
    if kept is None or chosen["value"] > kept["value"]:
        trainable = {n: p for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
        state = {"step": trainer.step_count, **chosen, "losses": trainer.losses}
        save_checkpoint(best_dir(trainer), trainable, trainer.optimizer, trainer.scheduler, state, keep=1)


KEPT_KEYS = ("step", "metric", "value", "chosen_on", "ranking")


def best(trainer) -> dict[str, Any] | None:
    """The kept best checkpoint's state (step, metric, value, chosen_on, ranking) and path, or None."""
    from .checkpoint import list_checkpoints

    found = list_checkpoints(best_dir(trainer))
    if not found:
        return None
    state = json.loads((found[-1] / "state.json").read_text(encoding="utf-8"))
    return {k: state[k] for k in KEPT_KEYS} | {"path": found[-1]}


def load_best(trainer) -> None:
    """Every process loads the kept best weights, so that the run directory holds them."""
    from .checkpoint import load_checkpoint

    kept = best(trainer)
    if kept is None:
        return
    trainer.kept = {k: kept[k] for k in KEPT_KEYS} | {"last_step": trainer.step_count}
    if kept["step"] != trainer.step_count:
        trainable = load_checkpoint(kept["path"])["trainable"]
        params = dict(trainer.unwrapped.named_parameters())
        with torch.no_grad():
            for name, value in trainable.items():
                params[name].copy_(value)
    if trainer.main:
        err.print(
            f"Keeping the weights of step {kept['step']} (best {kept['metric']} {kept['value']:.4f} of the "
            f"{kept['ranking']} ranking on the {kept['chosen_on']} rows) in the run directory; the last step's "
            f"({trainer.step_count}) stay in checkpoints/."
        )


def run_view(trainer):
    """The model in training seen as a loaded run (training/run.py), so that evaluation's code scores it."""
    from .run import LoadedRun

    config, model = trainer.config, trainer.unwrapped
    info = {
        "experts": {"head": config.head},
        "dataset": {"pad_id": trainer.dataset.pad_id, "max_history": trainer.dataset.max_history},
        "normalize": config.normalize,
        "fusion": model.fusion.weights() if model.fusion is not None else None,
    }
    return LoadedRun(model, trainer.builder.tokenizer, trainer.builder, info, trainer.dataset.titles)


def fit_apart_fusion(trainer) -> dict[str, Any] | None:
    """Fit the fusion weights on the rows set apart with the model as it is now (fusion_fit.py), set them, and return
    what the run records: the weights, the rows and users, and the rankings' metrics on those rows. None when no rows
    are set apart. Run by every process (the weights are part of every process's digest); no RNG is drawn."""
    apart, model = trainer.apart, trainer.unwrapped
    if apart is None:
        return None
    model.eval()
    try:
        weights, on_apart = apart.fit(run_view(trainer), batch_size=max(16, trainer.config.batch_size))
    finally:
        model.train()
    if model.fusion is not None:
        with torch.no_grad():
            model.fusion.llm_weight.fill_(weights["llm"])
            model.fusion.encoder_weight.fill_(weights["encoder"])
    return {
        "rows": len(apart),
        "users": int(trainer.apart_users),
        "weights": {"llm": weights["llm"], "encoder": weights["encoder"]} if model.fusion is not None else None,
        "loss": weights["loss"],
        "over": "catalogue" if apart.catalogue else f"{apart.split.candidates.shape[2]} candidates",
        "metrics": on_apart,
    }


def selection(trainer, val: dict[str, Any], apart: dict[str, Any] | None) -> dict[str, Any]:
    """What ``--keep-best`` compares: the default ranking's catalogue NDCG@10 (item head) or MRR (title head) on the
    rows set apart, where there are any (no stage was fitted on them), else on val."""
    ranking = "fused" if trainer.unwrapped.fusion is not None else "llm"
    if apart is not None:
        metric = "ndcg@10" if trainer.apart.catalogue else "mrr"
        return {"metric": metric, "value": apart["metrics"][ranking][metric], "chosen_on": "apart", "ranking": ranking}
    metric = "full_ndcg@10" if trainer.config.head == "item" else "mrr"
    return {"metric": metric, "value": val[ranking][metric], "chosen_on": "val", "ranking": ranking}


def validate(trainer, step: int) -> dict[str, Any] | None:
    """Score the val rows with the model as it is now (main process): HR@1, HR@5, NDCG@5 and MRR of the LLM alone,
    the fused ranking and the encoder (mean over the candidate draws), and for the item head the catalogue's
    NDCG@10, HR@10 and MRR; with rows set apart, the fusion is first fitted there and the selection of
    ``--keep-best`` is made there. Training is not disturbed: no RNG is drawn and the model goes back to training
    mode."""
    from ..evaluation.evaluate import EvalConfig, evaluate_run, load_split

    result = None
    if trainer.main:
        config, model = trainer.config, trainer.unwrapped
        if not hasattr(trainer, "_val_split"):
            ev = EvalConfig(runs=["training"], draws=config.validate_draws, max_samples=config.validate_rows)
            trainer._val_split = load_split(ev, trainer.dataset)
        t0 = time.perf_counter()
        apart = fit_apart_fusion(trainer)
        model.eval()
        try:
            ev = EvalConfig(
                runs=["training"], batch_size=max(16, config.batch_size), quiet=True, gate_counterfactual=False
            )
            out = evaluate_run(run_view(trainer), trainer._val_split, ev, "validation", None)
        finally:
            model.train()
        val = _val_metrics(out)
        result = {
            "step": step,
            "samples": step * trainer.per_step,
            "llm_encoder_top1_agreement": out.get("llm_encoder_top1_agreement"),
            "val": val,
            "val_rows": len(trainer._val_split),
            "val_draws": int(trainer._val_split.candidates.shape[1]),
            "apart": apart,
            "selection": selection(trainer, val, apart),
            "val_seconds": round(time.perf_counter() - t0, 3),
        }
        append_json_line(trainer.run_dir / "logs" / "validation.jsonl", result, _RESUME_HINT)
        trainer.accelerator.log({f"val/{name}_{m}": v for name, ms in val.items() for m, v in ms.items()}, step=step)
        err.print(_val_line(step, val, result["val_seconds"]))
    trainer.accelerator.wait_for_everyone()
    return result


_VAL_SAMPLED = ("hr@1", "hr@5", "ndcg@5", "mrr")
_VAL_CATALOGUE = ("full_ndcg@10", "full_hr@10", "full_mrr")


def _val_metrics(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{ranking: {metric: mean over the draws}} of an evaluation: the sampled metrics, and the catalogue's where the
    head ranks it."""
    rankings = {"llm": out["llm"] if "llm" in out else out, "encoder": out["encoder"]}
    if out["ranking"] == "fused":
        rankings["fused"] = out
    names = _VAL_SAMPLED + tuple(m for m in _VAL_CATALOGUE if m in out["metrics"])
    return {name: {m: r["metrics"][m]["mean"] for m in names} for name, r in rankings.items()}


def _val_line(step: int, val: dict[str, dict[str, float]], seconds: float) -> str:
    """The progress line of one validation: HR@1 / MRR per ranking, and the catalogue's NDCG@10 where measured."""

    def one(name: str) -> str:
        m = val[name]
        text = f"{name} {m['hr@1']:.3f} / {m['mrr']:.3f}"
        return text + (f" / {m['full_ndcg@10']:.3f}" if "full_ndcg@10" in m else "")

    what = "HR@1 / MRR" + (" / catalogue NDCG@10" if "full_ndcg@10" in val["llm"] else "")
    shown = [n for n in ("llm", "fused", "encoder") if n in val]
    return f"step {step}: val {what}  " + "  ".join(one(n) for n in shown) + f"  ({seconds:.0f} s)"


def catalogue_check(trainer) -> dict[str, Any] | None:
    """At the end of training (main process), for a head that ranks the catalogue: the default ranking against the
    run's own encoder on the val catalogue (NDCG@10, the history excluded), with the paired test over users — what
    ``recommend`` and the card report as ``below_encoder``. A report only: nothing is chosen on it. None for the
    title head (its catalogue ranking needs a forward per candidate) or without val rows."""
    from .. import metrics
    from ..evaluation.evaluate import EvalConfig, evaluate_run, load_split

    if not trainer.main or trainer.config.head != "item" or "val" not in trainer.dataset.splits:
        return None
    split = load_split(EvalConfig(runs=["training"]), trainer.dataset)
    if len(split) == 0:
        return None
    model = trainer.unwrapped
    model.eval()
    try:
        ev = EvalConfig(
            runs=["training"], batch_size=max(16, trainer.config.batch_size), quiet=True, gate_counterfactual=False
        )
        out = evaluate_run(run_view(trainer), split, ev, "check", None)
    finally:
        model.train()
    ranks = out["_per_user"]["catalogue_ranks"]
    default, encoder = (metrics.per_user_ndcg(ranks[r], 10) for r in ("default", "encoder"))
    test = metrics.paired_permutation_test(default, encoder)
    return {
        "split": split.name,
        "rows": len(split),
        "metric": metrics.CATALOGUE_METRIC,
        "default": float(default.mean()),
        "encoder": float(encoder.mean()),
        "below": bool(default.mean() < encoder.mean()),
        "p_value": test["p_value"],
    }
