"""The holdout of the second stage's rows: what each option costs the encoder, and how honest its rows are.

    python bench/bench_holdout.py --dataset lastfm --specs none users:0.1 users:0.2 last:1 last:3 --seeds 1 2 3

For every holdout spec and seed, trains the encoder (``ilora encode``, SASRec defaults, early stopping on val)
on the rows the spec leaves it, then reports side by side:

- val HR@1 / MRR (all stored draws): what the holdout costs the first stage (paired sign-flip permutation
  test over val users of the per-user reciprocal rank against the encoder that fitted every row, same seed);
- HR@1 / MRR on the rows the second stage trains on (one seeded draw of 20 uniform candidates, at most 2,000
  rows): an honest holdout scores them about as well as val, not as well as the rows the encoder fitted;
- HR@1 on a sample of the rows the encoder fitted, and the counts of rows and users on each side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ensure_dataset, write_result


def per_user_rr(encoder_dir: Path, dataset) -> np.ndarray:
    """(N,) each val user's reciprocal rank, mean over the stored draws."""
    from ilora_cli.encoders.evaluate import split_ranks
    from ilora_cli.encoders.io import load_encoder

    model, _ = load_encoder(encoder_dir)
    sampled, _ = split_ranks(model, dataset.split("val"), dataset.n_items)
    return (1.0 / (sampled + 1)).mean(axis=1)


def late_rows_metrics(encoder_dir: Path, dataset, spec: str, seed: int) -> tuple[dict, dict]:
    """The encoder on the second-stage rows of ``spec`` (a subset of the rows it left out), and their counts."""
    from ilora_cli.data.holdout import partition
    from ilora_cli.encoders.evaluate import training_rows_metrics
    from ilora_cli.encoders.io import load_encoder

    model, _ = load_encoder(encoder_dir)
    part = partition(dataset, spec)
    n_candidates = int(dataset.meta.get("n_candidates", 20))
    metrics = training_rows_metrics(
        model, dataset.split("train"), part.second_stage_rows, dataset.n_items, n_candidates, seed
    )
    return metrics, part.describe()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="lastfm")
    parser.add_argument("--specs", nargs="+", default=["none", "users:0.1", "users:0.2", "last:1", "last:3"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--out", default="holdout-lastfm")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the trained encoders in this folder")
    args = parser.parse_args()

    from ilora_cli import metrics
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.encoders.train import EncodeConfig, encode

    if not ensure_dataset(args.dataset):
        print(f"skipped: the {args.dataset} data is not available")
        return
    dataset = PreparedDataset.open(args.dataset)
    specs = list(dict.fromkeys(["none", *args.specs]))  # the full-data encoder is the reference
    rows, rr, trained = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for spec in specs:
                # users:F+last:N uses the users:F encoder: the same rows are left out, fewer of them are used
                encoder_spec = spec.split("+")[0]
                t0 = time.perf_counter()
                if (encoder_spec, seed) not in trained:
                    out = (args.keep or Path(tmp)) / f"{encoder_spec.replace(':', '-')}-s{seed}"
                    res = encode(
                        EncodeConfig(
                            dataset=args.dataset,
                            holdout=encoder_spec,
                            seed=seed,
                            output=out,
                            overwrite=True,
                            quiet=True,
                            threads=args.threads,
                        )
                    )
                    trained[encoder_spec, seed] = (out, res)
                out, res = trained[encoder_spec, seed]
                rr[spec, seed] = per_user_rr(out, dataset)
                m = dict(res["metrics"])
                held = res["holdout"]
                if spec != encoder_spec:
                    m["second_stage"], held = late_rows_metrics(out, dataset, spec, seed)
                second = m.get("second_stage", m["fitted"])  # none: the second stage trains on the fitted rows
                row = {
                    "spec": spec,
                    "seed": seed,
                    "encoder_rows": held["encoder_rows"],
                    "second_stage_rows": held["second_stage_rows"],
                    "second_stage_users": held["second_stage_users"],
                    "users": held["users"],
                    "val": {k: m["val"][k]["mean"] for k in ("hr@1", "mrr")},
                    "second_stage": {k: second[k]["mean"] for k in ("hr@1", "mrr")},
                    "fitted": {k: m["fitted"][k]["mean"] for k in ("hr@1", "mrr")},
                    "best_epoch": res["best_epoch"],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                if spec != "none":
                    test = metrics.paired_permutation_test(rr[spec, seed], rr["none", seed])
                    row["val_mrr_vs_full"] = {k: test[k] for k in ("mean_difference", "p_value", "n_nonzero")}
                rows.append(row)
                print(_line(row), flush=True)
    print()
    print(
        f"{'spec':>10} {'val HR@1':>9} {'val MRR':>8} {'2nd HR@1':>9} {'gap':>7} {'fitted HR@1':>11}  (mean over seeds)"
    )
    summary = {}
    for spec in specs:
        mine = [r for r in rows if r["spec"] == spec]
        s = {
            part: {k: float(np.mean([r[part][k] for r in mine])) for k in ("hr@1", "mrr")}
            for part in ("val", "second_stage", "fitted")
        }
        if spec != "none":
            pooled = metrics.paired_permutation_test(
                np.mean([rr[spec, seed] for seed in args.seeds], axis=0),
                np.mean([rr["none", seed] for seed in args.seeds], axis=0),
            )
            s["val_mrr_vs_full_pooled"] = {k: pooled[k] for k in ("mean_difference", "p_value")}
        summary[spec] = s
        gap = s["second_stage"]["hr@1"] - s["val"]["hr@1"]
        print(
            f"{spec:>10} {s['val']['hr@1']:9.4f} {s['val']['mrr']:8.4f} {s['second_stage']['hr@1']:9.4f} "
            f"{gap:+7.4f} {s['fitted']['hr@1']:11.4f}"
            + (
                f"   val MRR vs full {s['val_mrr_vs_full_pooled']['mean_difference']:+.4f} "
                f"(p = {s['val_mrr_vs_full_pooled']['p_value']:.3g})"
                if spec != "none"
                else ""
            )
        )
    write_result(
        args.out,
        {"dataset": args.dataset, "seeds": args.seeds, "runs": rows, "summary": summary},
    )


def _line(r: dict) -> str:
    vs = r.get("val_mrr_vs_full")
    return (
        f"{r['spec']:>10} seed {r['seed']}: encoder rows {r['encoder_rows']:,}, second-stage rows "
        f"{r['second_stage_rows']:,} ({r['second_stage_users']} of {r['users']} users); val HR@1/MRR "
        f"{r['val']['hr@1']:.4f}/{r['val']['mrr']:.4f}, second-stage {r['second_stage']['hr@1']:.4f}/"
        f"{r['second_stage']['mrr']:.4f}, fitted {r['fitted']['hr@1']:.4f}; best epoch {r['best_epoch']}, "
        f"{r['seconds']:.0f} s"
        + (f"; val MRR vs full {vs['mean_difference']:+.4f} (p = {vs['p_value']:.3g})" if vs else "")
    )


if __name__ == "__main__":
    main()
