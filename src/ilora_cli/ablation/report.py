"""What an ablation reports: one table (stderr), ``results.json``, ``results.csv`` and the plots."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from rich.table import Table

from ..console import err, labelled
from ..report import gate_line
from .grid import axes_of
from .layout import run_dir, write_json
from .significance import ALPHA, TEST_NAME, compare

METRICS = ("hr@1", "hr@3", "hr@5", "hr@10", "ndcg@3", "ndcg@5", "ndcg@10", "mrr")
CATALOGUE = ("full_hr@10", "full_hr@20", "full_hr@50", "full_ndcg@10", "full_ndcg@20", "full_mrr")
TABLE_METRICS = ("hr@1", "mrr", "full_ndcg@10", "full_hr@10")  # sampled, then the catalogue's (item head)


def write_results(p, status: dict[str, str], seconds: float, docs: dict, curves: dict) -> dict[str, Any]:
    """Collect every finished cell (``docs``: each cell's document, None when unfinished; ``curves``: each run's
    training loss), test it against the reference cell, write the files, print the table."""
    from .plots import write_plots

    config = p.config
    ref = docs[p.reference.name]
    cells = [_cell_row(p, c, docs[c.name], ref, status) for c in p.cells]
    doc = {
        "ablation": p.directory.name,
        "directory": str(p.directory),
        "dataset": p.dataset.name,
        "eval_dataset": p.eval_dataset.name if p.eval_dataset else p.dataset.name,
        "split": config.split,
        "axes": axes_of(config),
        "train": config.train,
        "reference": p.reference.name,
        "significance": {
            "test": TEST_NAME,
            "statistic": "per-user reciprocal rank",
            "alpha": ALPHA,
            "random_sign_flips": config.permutations,
            "seed": config.seed,
        },
        "rankings": {
            "default": "the run's default ranking: a·LLM + b·encoder for runs trained with fusion, else the LLM's",
            "llm": "the language model's candidate scores alone",
        },
        "cells": cells,
        "encoders": _encoder_rows(p, docs),
        "cross_domain": _cross_domain(docs),
        "unfinished": [c["name"] for c in cells if c["metrics"] is None],
        "wall_minutes": round(seconds / 60, 3),
    }
    doc["plots"] = write_plots(p.directory / "plots", doc, curves)
    write_json(p.directory / "results.json", doc)
    tmp = p.directory / ".results.csv.tmp"
    tmp.write_text(results_csv(doc), encoding="utf-8")
    os.replace(tmp, p.directory / "results.csv")
    print_table(doc)
    return doc


def _cell_row(p, cell, doc, ref, status) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": cell.name,
        "axes": cell.axes,
        "settings": cell.train,
        "status": status.get(cell.name, "unfinished"),
        "run_dir": str(run_dir(p, cell)),
        "metrics": None,
    }
    if doc is None:
        return row
    config = p.config
    row.update(
        {
            "protocol": doc["protocol"],
            "split": doc["split"],
            "rows": doc["rows"],
            "draws": doc["draws"],
            "ranking": doc["ranking"],
            "fusion": doc["fusion"],
            "metrics": doc["metrics"],
            "llm_metrics": doc["llm_metrics"],
            "encoder": doc["encoder"],
            "encoder_metrics": doc["encoder_metrics"],
            "minutes": round(doc["train_minutes"] + doc["eval_minutes"], 3),
            "train_minutes": doc["train_minutes"],
            "eval_minutes": doc["eval_minutes"],
            "gate": doc.get("gate"),
        }
    )
    args = dict(permutations=config.permutations, seed=config.seed)
    if ref is not None and cell.name != p.reference.name:
        row["vs_reference"] = {
            "default": compare(doc, ref, "default", **args),
            "llm": compare(doc, ref, "llm", **args),
            "delta_mrr": doc["metrics"]["mrr"]["mean"] - ref["metrics"]["mrr"]["mean"],
            "delta_llm_mrr": doc["llm_metrics"]["mrr"]["mean"] - ref["llm_metrics"]["mrr"]["mean"],
        }
        metric = row["vs_reference"]["default"].get("metric")
        if metric and metric in doc["metrics"] and metric in ref["metrics"]:
            row["vs_reference"]["metric"] = metric
            row["vs_reference"]["delta"] = doc["metrics"][metric]["mean"] - ref["metrics"][metric]["mean"]
            row["vs_reference"]["delta_llm"] = doc["llm_metrics"][metric]["mean"] - ref["llm_metrics"][metric]["mean"]
    row["vs_encoder"] = compare(doc, doc, "default", reference_ranking="encoder", **args)
    return row


def _encoder_rows(p, docs) -> list[dict[str, Any]]:
    """The encoder alone on the same rows and candidates, once per (encoder, train fraction, candidates)."""
    rows, seen = [], set()
    axes = {a for c in p.cells for a in c.axes}
    for cell in p.cells:
        doc = docs[cell.name]
        key = (cell.encoder, cell.train_fraction, cell.candidates)
        if doc is None or key in seen:
            continue
        seen.add(key)
        parts = [
            f"users{cell.train_fraction:g}" if "train_fraction" in axes else None,
            f"c{cell.candidates}" if "candidates" in axes else None,
        ]
        label = f"{cell.encoder} alone" + "".join(f" ({x})" for x in parts if x)
        rows.append(
            {
                "name": label,
                "encoder": cell.encoder,
                "train_fraction": cell.train_fraction,
                "candidates": cell.candidates,
                "protocol": doc["protocol"],
                "metrics": doc["encoder_metrics"],
            }
        )
    return rows


def _cross_domain(docs) -> dict[str, Any] | None:
    report = next((d["cross_domain"] for d in docs.values() if d and d.get("cross_domain")), None)
    if report is None:
        return None
    return {
        **report,
        "comparable": (
            f"Runs trained on {report['catalogue']!r} are evaluated on the {report['split']} rows of "
            f"{report['rows_from']!r} whose target and at least 3 history items have a title in "
            f"{report['catalogue']!r} ({report['rows_kept']} of {report['rows']} rows); history items without a "
            f"counterpart are dropped and the candidates are drawn again among the {report['candidate_pool']} "
            "shared items. These numbers compare the cells with each other and with the encoder alone on the "
            f"same rows; they are not comparable with in-domain results on {report['rows_from']!r}'s whole "
            "split, nor with the paper's."
        ),
    }


# -- the table ------------------------------------------------------------------------------------------
def _pm(m: dict[str, Any] | None) -> str:
    if m is None:
        return "—"
    return f"{m['mean']:.4f} ± {m['std']:.4f}" if m.get("n_draws", 1) > 1 else f"{m['mean']:.4f}"


def _header(metric: str) -> str:
    return f"catalogue {metric[5:].upper()}" if metric.startswith("full_") else metric.upper()


def print_table(doc: dict[str, Any]) -> None:
    finished = [c for c in doc["cells"] if c["metrics"] is not None]
    protocols = sorted({c["protocol"] for c in finished})
    where = f"{doc['eval_dataset']} {doc['split']}" + (
        f", trained on {doc['dataset']}" if doc["eval_dataset"] != doc["dataset"] else ""
    )
    how = protocols[0] if len(protocols) == 1 else "sampled, candidates as named"
    draws = sorted({c["draws"] for c in finished})
    rows = sorted({c["rows"] for c in finished})
    t = Table(
        title=f"Ablation {doc['ablation']}: {where} ({how}; {', '.join(map(str, rows))} rows; mean ± std over "
        f"{', '.join(map(str, draws))} draws)"
        if finished
        else f"Ablation {doc['ablation']}: no finished cell yet"
    )
    catalogue = any("full_ndcg@10" in c["metrics"] for c in finished)
    shown = TABLE_METRICS if catalogue else TABLE_METRICS[:2]
    llm_shown = ("hr@1", "mrr", "full_ndcg@10") if catalogue else ("hr@1", "mrr")
    t.add_column("cell")
    for m in shown:
        t.add_column(_header(m), justify="right")
    for m in llm_shown:
        t.add_column(f"LLM alone {_header(m)}", justify="right")
    t.add_column("Δ " + ("catalogue NDCG@10" if catalogue else "MRR"), justify="right")
    t.add_column("p", justify="right")
    t.add_column("min", justify="right")
    for c in doc["cells"]:
        if c["metrics"] is None:
            t.add_row(c["name"], *["—"] * (len(shown) + len(llm_shown) + 2), c["status"])
            continue
        vs = c.get("vs_reference")
        if vs is None:
            delta, p = "ref", "ref"
        else:
            delta = f"{vs.get('delta', vs['delta_mrr']):+.4f}"
            pv = vs["default"]["p_value"]
            p = "n/a" if pv is None else f"{pv:.3f}" + (" *" if vs["default"]["significant"] else "")
        name = c["name"] + (" (fused)" if c["ranking"] == "fused" else "")
        llm = c["llm_metrics"]
        t.add_row(
            name,
            *[_pm(c["metrics"].get(m)) for m in shown],
            *[_pm(llm.get(m)) for m in llm_shown],
            delta,
            p,
            f"{c['minutes']:.1f}",
        )
    for e in doc["encoders"]:
        blanks = ["—"] * len(llm_shown) + ["", "", ""]
        t.add_row(e["name"], *[_pm(e["metrics"].get(m)) for m in shown], *blanks)
    err.print(t)
    err.print(
        f"p: {doc['significance']['test']}, of each cell's default ranking against the reference cell "
        f"{doc['reference']}; * p < {ALPHA}. (fused): ranked by a·LLM + b·encoder; LLM alone: the language model's "
        "scores without the encoder; catalogue: the whole catalogue, history excluded (what recommend returns)."
    )
    for c in finished:
        if c.get("gate"):
            err.print(gate_line(c["name"], c["gate"]))
    if doc.get("cross_domain"):
        labelled("cross-domain", doc["cross_domain"]["comparable"])
    if doc["unfinished"]:
        labelled(
            "note",
            f"{len(doc['unfinished'])} cell(s) unfinished: {', '.join(doc['unfinished'])}; "
            "run the same command again to resume them.",
        )


# -- results.csv ------------------------------------------------------------------------------------------
def results_csv(doc: dict[str, Any]) -> str:
    axes = list(doc["axes"])
    header = ["name", "status", *axes, "ranking"]
    header += [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    header += list(CATALOGUE)
    header += [f"llm_{m}_{s}" for m in ("hr@1", "mrr") for s in ("mean", "std")]
    header += [f"llm_{m}" for m in CATALOGUE]
    header += ["test_metric", "delta", "delta_mrr", "p_value", "significant", "llm_p_value", "minutes", "run_dir"]
    header += list(GATE_COLUMNS)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for c in doc["cells"]:
        m, llm = c["metrics"] or {}, c.get("llm_metrics") or {}
        vs = c.get("vs_reference") or {}
        row = [c["name"], c["status"], *[c["axes"].get(a, "") for a in axes], c.get("ranking", "")]
        row += [_num(m.get(k, {}).get(s)) for k in METRICS for s in ("mean", "std")]
        row += [_num(m.get(k, {}).get("mean")) for k in CATALOGUE]
        row += [_num(llm.get(k, {}).get(s)) for k in ("hr@1", "mrr") for s in ("mean", "std")]
        row += [_num(llm.get(k, {}).get("mean")) for k in CATALOGUE]
        row += [
            (vs.get("default") or {}).get("metric", ""),
            _num(vs.get("delta")),
            _num(vs.get("delta_mrr")),
            _num((vs.get("default") or {}).get("p_value")),
            (vs.get("default") or {}).get("significant", ""),
            _num((vs.get("llm") or {}).get("p_value")),
            _num(c.get("minutes")),
            c["run_dir"],
        ]
        row += _gate_cells(c.get("gate"))
        w.writerow(row)
    for e in doc["encoders"]:
        row = [e["name"], "reference", *[""] * len(axes), "encoder"]
        row += [_num(e["metrics"].get(k, {}).get(s)) for k in METRICS for s in ("mean", "std")]
        row += [_num(e["metrics"].get(k, {}).get("mean")) for k in CATALOGUE]
        row += [""] * (4 + len(CATALOGUE) + 8 + len(GATE_COLUMNS))
        w.writerow(row)
    return buf.getvalue()


GATE_COLUMNS = ("gate_entropy", "gate_bits", "gate_own", "gate_shuffled", "gate_uniform", "gate_p_own_vs_shuffled")


def _gate_cells(gate: dict[str, Any] | None) -> list[str]:
    """A K > 1 cell's gate in results.csv: entropy, group information, the default ranking's test metric with its
    own, shuffled and uniform gates, and the p of own against shuffled (evaluation/gate_report.py)."""
    if not gate:
        return [""] * len(GATE_COLUMNS)
    means = [gate["counterfactual"][k][gate["metric"]]["mean"] for k in ("own", "shuffled", "uniform")]
    return [_num(v) for v in (gate["entropy"], gate["group_information_bits"], *means, gate["p_own_vs_shuffled"])]


def _num(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def print_plan(plan: dict[str, Any]) -> None:
    """The table of ``--dry-run``: each cell, its run, status, steps and estimated minutes."""
    t = Table(title=f"Ablation {plan['directory']} (dry run; reference cell {plan['reference']})")
    for col in ("cell", "run", "status", "steps", "train min", "eval min"):
        t.add_column(col, justify="left" if col in ("cell", "run", "status") else "right")
    for c in plan["cells"]:
        est = [c["train_minutes_estimate"], c["eval_minutes_estimate"]]
        t.add_row(
            c["name"],
            c["run"],
            c["status"],
            f"{c['steps']} x {c['samples_per_step']}",
            *("?" if v is None else f"{v:.1f}" for v in est),
        )
    err.print(t)
    total = plan["total_minutes_estimate"]
    err.print(
        f"{len(plan['cells'])} cells; estimated "
        + ("time unknown" if total is None else f"{total:.1f} minutes")
        + f" ({plan['estimate_basis']}; {plan['note']})."
    )
