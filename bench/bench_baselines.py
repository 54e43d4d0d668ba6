"""The rankings an LLM-alone number must beat to mean anything: candidates ranked by training popularity, and at
random, on the same stored candidate draws the runs are evaluated on.

    python bench/bench_baselines.py [--dataset lastfm] [--split val]

Popularity is how often an item is the next item of a training row. It is reported twice: with ties ranked
pessimistically (the target behind every candidate as popular as it), as every ranking of this tool is
measured, and as the expected value with ties broken at random. Writes ``bench/results/baselines-DATASET.json``;
prints a note and exits 0 when the dataset is not prepared and its source is absent.
"""

from __future__ import annotations

import argparse

from common import ensure_dataset, popularity_baseline, random_baseline, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="lastfm")
    ap.add_argument("--split", default="val")
    args = ap.parse_args()
    from ilora_cli.data.prepared import PreparedDataset

    if not ensure_dataset(args.dataset):
        print(f"dataset {args.dataset} not available; skipping")
        return
    dataset = PreparedDataset.open(args.dataset)
    pop = popularity_baseline(dataset, args.split)
    rnd = random_baseline(pop["candidates"])
    p, r = pop["pessimistic"], pop["random_ties"]
    print(f"{args.dataset} {args.split}: {pop['rows']} rows x {pop['draws']} stored draws of {pop['candidates']}")
    print(f"{'ranking':<40}{'HR@1':>16}{'MRR':>16}")
    print(f"{'popularity (ties pessimistic)':<40}{p['hr@1']['mean']:>9.4f} ± {p['hr@1']['std']:.3f}"
          f"{p['mrr']['mean']:>9.4f} ± {p['mrr']['std']:.3f}")  # fmt: skip
    print(f"{'popularity (ties at random, expected)':<40}{r['hr@1']['mean']:>9.4f} ± {r['hr@1']['std']:.3f}"
          f"{r['mrr']['mean']:>9.4f} ± {r['mrr']['std']:.3f}")  # fmt: skip
    print(f"{'random order (expected)':<40}{rnd['hr@1']:>9.4f}{'':>8}{rnd['mrr']:>9.4f}")
    write_result(f"baselines-{args.dataset}", {"dataset": args.dataset, "popularity": pop, "random": rnd})


if __name__ == "__main__":
    main()
