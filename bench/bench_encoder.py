"""Benchmark: SASRec with the default `ilora encode` settings on prepared LastFM.

Measures validation HR@1 (20 stored candidates, mean ± std over the draws), full-ranking HR@10, and
training seconds per epoch, side by side with LLaRA's published SASRec checkpoint and the targets.

    python bench/bench_encoder.py                                       # uses $ILORA_HOME/datasets/lastfm
    python bench/bench_encoder.py --prepare-from ../shared/datasets/lastfm   # prepares it first (llara format)
    python bench/bench_encoder.py lr=2e-3 batch_size=512                # override training settings

Writes bench/results/encoder.json. Exits 0 with a message when the data is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from ilora_cli.config import resolve, to_dict
from ilora_cli.data.prepared import PreparedDataset
from ilora_cli.encoders.train import EncodeConfig, encode
from ilora_cli.errors import UserError
from ilora_cli.home import dataset_dir

# LLaRA's published SASRec checkpoint, measured on the same LastFM val rows and 20-candidate protocol
# (METHOD.md §8: 0.260 ± 0.031 over 20 draws).
REFERENCE_VAL_HR1 = 0.260
TARGET_VAL_HR1 = 0.34
TARGET_SECONDS_PER_EPOCH = 10.0
RESULTS = Path(__file__).resolve().parent / "results" / "encoder.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="lastfm", help="prepared dataset name in $ILORA_HOME (default lastfm)")
    parser.add_argument("--prepare-from", type=Path, help="LLaRA-format directory to prepare the dataset from")
    parser.add_argument("--model", default="sasrec", help="encoder type (default sasrec)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"result file (default {RESULTS})")
    parser.add_argument("overrides", nargs="*", help="EncodeConfig key=value overrides")
    args = parser.parse_args(argv)

    if not (dataset_dir(args.dataset) / "meta.json").is_file():
        if args.prepare_from is None:
            print(
                f"skip: no prepared dataset {args.dataset!r} in {dataset_dir(args.dataset).parent}; "
                "pass --prepare-from /path/to/shared/datasets/lastfm",
                file=sys.stderr,
            )
            return 0
        if not args.prepare_from.is_dir():
            print(f"skip: {args.prepare_from} does not exist", file=sys.stderr)
            return 0
        from ilora_cli.data.prepare import PrepareConfig, prepare

        prepare(PrepareConfig(dataset=args.dataset, format="llara", input=args.prepare_from, trust_pickle=True))
    dataset = PreparedDataset.open(args.dataset)

    with tempfile.TemporaryDirectory(prefix="bench-encoder-") as tmp:
        config = resolve(
            EncodeConfig,
            flags={"dataset": args.dataset, "model": args.model, "output": Path(tmp) / "encoder", "quiet": True},
            overrides=args.overrides,
        )
        started = time.perf_counter()
        result = encode(config)
        wall = time.perf_counter() - started

    val = result["metrics"]["val"]
    hr1, full_hr10 = val["hr@1"], val["full_hr@10"]["mean"]
    spe = result["seconds_per_epoch"]
    doc = {
        "benchmark": "encoder",
        "command": " ".join(["python", "bench/bench_encoder.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "dataset": {
            "name": dataset.name,
            "checksum": dataset.checksum,
            "train_rows": result["train_rows"],
            "val_rows": dataset.meta["splits"].get("val"),
        },
        "config": to_dict(config),
        "protocol": val["protocol"],
        "val": val,
        "epochs_run": result["epochs_run"],
        "best_epoch": result["best_epoch"],
        "seconds_per_epoch": spe,
        "wall_seconds": wall,
        "reference": {"llara_sasrec_val_hr@1": REFERENCE_VAL_HR1},
        "targets": {"val_hr@1": TARGET_VAL_HR1, "seconds_per_epoch": TARGET_SECONDS_PER_EPOCH},
        "ratios": {
            "val_hr@1 / reference": hr1["mean"] / REFERENCE_VAL_HR1,
            "val_hr@1 / target": hr1["mean"] / TARGET_VAL_HR1,
            "seconds_per_epoch / target": spe / TARGET_SECONDS_PER_EPOCH,
        },
        "meets_targets": hr1["mean"] >= TARGET_VAL_HR1 and spe <= TARGET_SECONDS_PER_EPOCH,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_out, args.out)

    print(f"dataset          {dataset.name}: {result['train_rows']} train rows, {doc['dataset']['val_rows']} val rows")
    print(
        f"encoder          {config.model}, loss {config.loss}, lr {config.lr}, batch {config.batch_size}, "
        f"monitor val {config.monitor}, patience {config.patience}"
    )
    print(f"val HR@1         {hr1['mean']:.4f} ± {hr1['std']:.4f} ({val['protocol']}, {hr1['n_draws']} stored draws)")
    print(f"val full HR@10   {full_hr10:.4f} (whole catalogue, history excluded)")
    print(f"epochs           {result['epochs_run']} run, best {result['best_epoch']}")
    print(f"seconds/epoch    {spe:.2f} (training only; {wall:.0f} s wall in all, {doc['machine']['cpus']} CPUs)")
    print(
        f"vs reference     HR@1 {hr1['mean']:.4f} / {REFERENCE_VAL_HR1:.3f} "
        f"= {doc['ratios']['val_hr@1 / reference']:.2f}x (LLaRA's published SASRec)"
    )
    print(
        f"vs targets       HR@1 {hr1['mean']:.4f} / {TARGET_VAL_HR1:.2f} = {doc['ratios']['val_hr@1 / target']:.2f}x; "
        f"s/epoch {spe:.2f} / {TARGET_SECONDS_PER_EPOCH:.0f} = {doc['ratios']['seconds_per_epoch / target']:.2f}x "
        f"-> {'meets' if doc['meets_targets'] else 'MISSES'} both targets"
    )
    print(f"wrote            {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
