"""Rich tables for what commands report (printed on stderr; ``--json`` documents go to stdout)."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from .console import err, labelled

SAMPLED_ORDER = ("hr@1", "hr@3", "hr@5", "hr@10", "ndcg@3", "ndcg@5", "ndcg@10", "mrr")


def dataset_table(meta: dict[str, Any]) -> None:
    """Users, items, rows per split and the history-length distribution of a prepared dataset."""
    t = Table(title=f"Prepared dataset {meta['name']!r} ({meta['source'].get('format', '?')})")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("items", f"{meta['n_items']:,}")
    t.add_row("users", "unknown" if meta.get("n_users") is None else f"{meta['n_users']:,}")
    for split, n in meta["splits"].items():
        raw = meta.get("raw_rows", {}).get(split, n)
        t.add_row(
            f"{split} rows",
            f"{n:,}" + (f" (of {raw:,}; < {meta['min_history']} history items dropped)" if raw != n else ""),
        )
    t.add_row("candidates", f"{meta['n_candidates']} per row, {meta['draws']} draws (val/test)")
    err.print(t)
    h = Table(title="History length (items) per split")
    h.add_column("split")
    lengths = sorted({int(k) for d in meta["history_lengths"].values() for k in d})
    for n in lengths:
        h.add_column(str(n), justify="right")
    for split, dist in meta["history_lengths"].items():
        h.add_row(split, *[f"{dist.get(str(n), 0):,}" for n in lengths])
    err.print(h)
    for note in meta.get("notes", []):
        labelled("note", note)


def metrics_table(title: str, rows: dict[str, dict[str, Any]], protocol: str) -> None:
    """One row per system/split; sampled metrics as mean ± std over candidate draws."""
    names = [m for m in SAMPLED_ORDER if any(m in r for r in rows.values())]
    extra = sorted(
        {
            k
            for r in rows.values()
            for k, v in r.items()
            if k not in SAMPLED_ORDER and not k.startswith("full_") and isinstance(v, (dict, float, int))
        }
    )
    t = Table(title=Text.assemble(title, (f"  ({protocol}; mean ± std over draws)", "dim")))
    t.add_column("")
    for m in names + extra:
        t.add_column(m, justify="right")
    for label, r in rows.items():
        cells = []
        for m in names + extra:
            v = r.get(m)
            if v is None:
                cells.append("—")
            elif isinstance(v, dict):
                cells.append(f"{v['mean']:.4f} ± {v['std']:.4f}" if v.get("n_draws", 1) > 1 else f"{v['mean']:.4f}")
            else:
                cells.append(f"{v:.4f}")
        t.add_row(label, *cells)
    err.print(t)


def eval_rows(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Table rows of an ``eval`` result: each run's default ranking, its language model alone, the encoder."""
    rows: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        if r.get("ranking") == "fused":
            f = r["fusion"]
            rows[f"{name} ({f['llm']:.2f}·LLM + {f['encoder']:.2f}·encoder)"] = r["metrics"]
            rows[f"{name}: LLM alone"] = r["llm"]["metrics"]
        else:
            rows[name] = r["metrics"]
    return rows


CATALOGUE_ORDER = ("full_hr@10", "full_hr@20", "full_hr@50", "full_ndcg@10", "full_ndcg@20", "full_mrr")


def catalogue_table(title: str, rows: dict[str, dict[str, Any]]) -> None:
    """The whole-catalogue metrics (history excluded) of every row that has them: what ``recommend`` returns."""
    rows = {k: r for k, r in rows.items() if "full_ndcg@10" in r}
    if not rows:
        return
    t = Table(title=Text.assemble(title, ("  (whole catalogue, history excluded)", "dim")))
    t.add_column("")
    names = [m for m in CATALOGUE_ORDER if any(m in r for r in rows.values())]
    for m in names:
        t.add_column(m.removeprefix("full_"), justify="right")
    for label, r in rows.items():
        t.add_row(label, *[f"{r[m]['mean']:.4f}" if m in r else "—" for m in names])
    err.print(t)


def gate_line(name: str, gate: dict[str, Any]) -> str:
    """One line on whether a K > 1 run's gate matters: the default ranking with each user's own gate, another
    user's and the uniform one, the test of own against shuffled, and what the gate knows of the user groups."""
    m = gate["metric"]
    own, shuffled, uniform = (gate["counterfactual"][k][m]["mean"] for k in ("own", "shuffled", "uniform"))
    untrained = gate.get("group_information_bits_untrained")
    before = f" (untrained gates: {untrained:.2f})" if untrained is not None else ""
    return (
        f"{name}, the gate: {m} with its own gates {own:.4f}, shuffled across users {shuffled:.4f}, uniform "
        f"{uniform:.4f} (own − shuffled p = {gate['p_own_vs_shuffled']:.3g}); entropy {gate['entropy']:.2f} nats of "
        f"{gate['entropy_uniform']:.2f}; {gate['group_information_bits']:.2f} bits about the {gate['groups']}s{before}"
    )


def eval_report(result: dict[str, Any]) -> None:
    """What ``ilora eval`` prints: the sampled table, the catalogue table, and each run's paired tests."""
    title = f"{result['split']} ({result['n_rows']} rows, {result['mode']} mode)"
    rows = eval_rows(result["results"])
    metrics_table(title, rows, result["protocol"])
    catalogue_table(title, rows)
    for name, r in result["results"].items():
        tests = r.get("tests") or {}
        said = [
            f"{k.replace('_vs_', ' − ')} {v['mean_difference']:+.4f} (p = {v['p_value']:.3g})"
            for k, v in tests.items()
            if isinstance(v, dict)
        ]
        if said:
            err.print(f"{name}, paired over users on {tests['metric']}: " + "; ".join(said))
        if r.get("gate"):
            err.print(gate_line(name, r["gate"]))
