"""Whether the gate matters in trained runs: each user's own gate, another user's, the uniform one.

    python bench/bench_gate.py RUN [RUN ...] --out gate-lastfm

For every K > 1 run it calls ``ilora eval`` (the API, val split, predictions into a temporary folder so that
the run's own files stay as they are) and prints ``results.RUN.gate`` (evaluation/gate_report.py): the default
ranking and the language model alone with their own gates, gates shuffled across users and the uniform gate,
on the run's test metric (catalogue NDCG@10 for the item head), the p of own against shuffled, the gate's
entropy and what it knows of the user groups (trained and untrained gates). Mean over the runs at the end.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import write_result

KINDS = ("own", "shuffled", "uniform")


def gate_of(run: str, split: str) -> dict:
    from ilora_cli.evaluation.evaluate import EvalConfig, evaluate

    with tempfile.TemporaryDirectory() as tmp:
        out = evaluate(EvalConfig(runs=[run], split=split, quiet=True, predictions=Path(tmp) / "p.jsonl"))
    name = next(iter(out["results"]))
    gate = out["results"][name].get("gate")
    if gate is None:
        raise SystemExit(f"{run}: no gate to report (K = 1, the token gate, or the title head without the option)")
    m = gate["metric"]
    return {
        "run": name,
        "metric": m,
        "default": {k: gate["counterfactual"][k][m]["mean"] for k in KINDS},
        "llm": {k: gate["counterfactual_llm"][k][m]["mean"] for k in KINDS},
        "p_own_vs_shuffled": gate["p_own_vs_shuffled"],
        "p_own_vs_uniform": gate["p_own_vs_uniform"],
        "entropy": gate["entropy"],
        "entropy_uniform": gate["entropy_uniform"],
        "load": gate["load"],
        "group_information_bits": gate["group_information_bits"],
        "group_information_bits_untrained": gate["group_information_bits_untrained"],
        "groups": gate["groups"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", default="gate-lastfm")
    args = ap.parse_args()
    rows = [gate_of(r, args.split) for r in args.runs]
    print(f"{'run':<16}{'ranking':<9}{'own':>9}{'shuffled':>10}{'uniform':>9}{'p(own=shuf)':>13}{'H':>7}{'bits':>7}")
    for r in rows:
        for ranking in ("default", "llm"):
            v = r[ranking]
            tail = (
                f"{r['p_own_vs_shuffled']:>13.3g}{r['entropy']:>7.2f}{r['group_information_bits']:>7.2f}"
                if ranking == "default"
                else ""
            )
            print(f"{r['run']:<16}{ranking:<9}{v['own']:>9.4f}{v['shuffled']:>10.4f}{v['uniform']:>9.4f}{tail}")
    mean = {
        ranking: {k: float(np.mean([r[ranking][k] for r in rows])) for k in KINDS} for ranking in ("default", "llm")
    }
    print("mean over runs:", {g: {k: round(v, 4) for k, v in d.items()} for g, d in mean.items()})
    write_result(args.out, {"split": args.split, "runs": rows, "mean": mean})


if __name__ == "__main__":
    main()
