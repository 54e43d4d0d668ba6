"""What `recommend` returns: the whole-catalogue ranking of item-head runs, several configurations × seeds.

    for s in 1 2 3; do
      ilora encode --dataset lastfm --name lastfm-sasrec-s$s --seed $s                       # the run's encoder
      ilora encode --dataset lastfm --name lastfm-sasrec-full-s$s --seed $s holdout=none     # the bar to clear
      ilora train --dataset lastfm --encoder lastfm-sasrec-s$s --name mix-s$s --seed $s --max-steps 321 \
          loss_over=catalogue+candidates
      ilora eval --run mix-s$s --encoder lastfm-sasrec-full-s$s
    done
    python bench/bench_catalogue.py mix=mix-s1,mix-s2,mix-s3 --reference-encoder 'lastfm-sasrec-full-s{seed}'

Each group is LABEL=RUN,RUN,... (one run per seed). From the score-mode predictions that ``ilora eval`` wrote
(``predictions-SPLIT-score.jsonl``: each row's catalogue rank by each ranking, the history excluded) it reports,
per group (mean over its runs): full-catalogue NDCG@10/20, HR@10/20/50 and MRR of the default ranking, the LLM
alone, the run's own encoder and the reference encoder (fitted on every row, same seed, scored here on the same
rows), and the sampled HR@1 / MRR over the stored draws. Tests: paired sign-flip permutation tests over users of
each user's catalogue NDCG@10, averaged over the group's seeds first (``pooled``): default − reference, default −
own encoder, LLM − own encoder, and every group's default against the first group's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import write_result

CATALOGUE = ("full_ndcg@10", "full_ndcg@20", "full_hr@10", "full_hr@20", "full_hr@50", "full_mrr")
RANKINGS = ("default", "llm", "encoder", "reference")


def run_values(run_dir: Path, split: str, reference: str) -> dict:
    """One run: per-user catalogue ranks by each ranking (the reference encoder's computed here on the same rows),
    sampled HR@1 / MRR of each ranking over the draws, and what its training recorded."""
    import yaml

    from ilora_cli import metrics
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.encoders.evaluate import split_ranks
    from ilora_cli.encoders.io import load_encoder

    lines = [json.loads(x) for x in (run_dir / f"predictions-{split}-score.jsonl").read_text().splitlines()]
    first = [x for x in lines if x["draw"] == lines[0]["draw"]]
    if "catalogue_rank" not in first[0]:
        raise SystemExit(f"{run_dir.name}: its predictions carry no catalogue ranks (not an item-head run?)")
    ids = [x["sample_id"] for x in first]
    ranks = {r: np.array([x["catalogue_rank"][r] for x in first]) for r in ("default", "llm", "encoder")}
    seed = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("seed")
    encoder, info = load_encoder(reference.replace("{seed}", str(seed)))
    data = PreparedDataset.open(info["dataset"]["path"])
    part = data.split(split)
    index = {int(i): k for k, i in enumerate(part.sample_id)}
    _, full = split_ranks(encoder, part.select(np.array([index[i] for i in ids])), data.n_items)
    ranks["reference"] = full
    sampled: dict[str, list[dict]] = {"default": [], "llm": [], "encoder": []}
    for d in sorted({x["draw"] for x in lines}):
        rows = [x for x in lines if x["draw"] == d]
        cols = np.array([x["candidates"].index(x["target"]) for x in rows])
        for name, field in (("default", "scores"), ("llm", "llm_scores"), ("encoder", "encoder_scores")):
            ranks_d = metrics.rank_of_target(np.array([x[field] for x in rows]), cols)
            sampled[name].append(metrics.ranking_metrics(ranks_d))
    ilora = json.loads((run_dir / "ilora.json").read_text())
    log = [json.loads(x) for x in (run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    return {
        "run": run_dir.name,
        "seed": seed,
        "ids": ids,
        "ranks": ranks,
        "catalogue": {r: {m: v["mean"] for m, v in metrics.catalogue_metrics(ranks[r]).items()} for r in RANKINGS},
        "sampled": {r: {m: float(np.mean([x[m] for x in v])) for m in ("hr@1", "mrr")} for r, v in sampled.items()},
        "train_minutes": round(sum(r["seconds"] for r in log) / 60, 1),
        "fusion": ilora.get("fusion"),
        "reference": reference.replace("{seed}", str(seed)),
    }


def group_summary(label: str, runs: list[dict]) -> dict:
    """A group's means over its runs and the pooled paired tests (each user's NDCG@10 averaged over the seeds)."""
    from ilora_cli import metrics

    if len({tuple(r["ids"]) for r in runs}) != 1:
        raise SystemExit(f"{label}: the runs were evaluated on different rows; they cannot be pooled")
    ndcg = {k: np.mean([metrics.per_user_ndcg(r["ranks"][k], 10) for r in runs], axis=0) for k in RANKINGS}
    mean = {
        k: {m: float(np.mean([r["catalogue"][k][m] for r in runs])) for m in CATALOGUE}
        | ({m: float(np.mean([r["sampled"][k][m] for r in runs])) for m in ("hr@1", "mrr")} if k != "reference" else {})
        for k in RANKINGS
    }
    tests = {
        "default_vs_reference": metrics.paired_permutation_test(ndcg["default"], ndcg["reference"]),
        "default_vs_encoder": metrics.paired_permutation_test(ndcg["default"], ndcg["encoder"]),
        "llm_vs_encoder": metrics.paired_permutation_test(ndcg["llm"], ndcg["encoder"]),
        "llm_vs_reference": metrics.paired_permutation_test(ndcg["llm"], ndcg["reference"]),
    }
    per_seed = {
        r["run"]: {
            "default_ndcg@10": r["catalogue"]["default"]["full_ndcg@10"],
            "reference_ndcg@10": r["catalogue"]["reference"]["full_ndcg@10"],
            "fusion": r["fusion"],
            "train_minutes": r["train_minutes"],
        }
        for r in runs
    }
    return {"label": label, "runs": [r["run"] for r in runs], "mean": mean, "tests": tests, "per_seed": per_seed}


def print_group(g: dict) -> None:
    m, t = g["mean"], g["tests"]
    print(f"\n{g['label']}  ({', '.join(g['runs'])})")
    print(f"  {'ranking':<10}" + "".join(f"{c.replace('full_', ''):>9}" for c in CATALOGUE) + f"{'HR@1':>8}{'MRR':>8}")
    for k in RANKINGS:
        row = "".join(f"{m[k][c]:>9.4f}" for c in CATALOGUE)
        tail = f"{m[k]['hr@1']:>8.3f}{m[k]['mrr']:>8.3f}" if "hr@1" in m[k] else ""
        print(f"  {k:<10}{row}{tail}")
    ref = m["reference"]["full_ndcg@10"]
    for name, test in t.items():
        rel = f" ({test['mean_difference'] / ref:+.1%} of the reference)" if name.endswith("reference") else ""
        print(f"  {name:<22} NDCG@10 {test['mean_difference']:+.4f}{rel}, p = {test['p_value']:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="+", help="LABEL=RUN,RUN,... (run names under $ILORA_HOME/runs or directories)")
    ap.add_argument("--reference-encoder", required=True, help="the encoder to clear; {seed} stands for each run's")
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", default="catalogue-lastfm")
    args = ap.parse_args()
    from ilora_cli import metrics
    from ilora_cli.evaluation.evaluate import resolve_run

    groups, values = [], {}
    for spec in args.groups:
        label, _, names = spec.partition("=")
        runs = [run_values(resolve_run(n), args.split, args.reference_encoder) for n in names.split(",") if n]
        values[label] = runs
        groups.append(group_summary(label, runs))
        print_group(groups[-1])
    first = groups[0]["label"]
    against_first = {}
    for g in groups[1:]:
        a, b = values[g["label"]], values[first]
        if [r["seed"] for r in a] != [r["seed"] for r in b]:
            continue  # only groups over the same seeds are paired
        mine = np.mean([metrics.per_user_ndcg(r["ranks"]["default"], 10) for r in a], axis=0)
        theirs = np.mean([metrics.per_user_ndcg(r["ranks"]["default"], 10) for r in b], axis=0)
        against_first[g["label"]] = metrics.paired_permutation_test(mine, theirs)
        test = against_first[g["label"]]
        print(f"\n{g['label']} − {first}, default NDCG@10 {test['mean_difference']:+.4f}, p = {test['p_value']:.3g}")
    write_result(args.out, {"split": args.split, "groups": groups, "default_vs_first_group": against_first})


if __name__ == "__main__":
    main()
