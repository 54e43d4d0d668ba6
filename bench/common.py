"""Shared helpers of the benchmarks: timing, datasets from ../shared, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ILORA_SHARED", ROOT.parent / "shared")) / "datasets"
RESULTS = ROOT / "bench" / "results"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ensure_dataset(name: str) -> bool:
    """Prepare ``lastfm`` from ../shared when it is not in $ILORA_HOME yet; False when the data is absent."""
    from ilora_cli.data.prepare import PrepareConfig, prepare
    from ilora_cli.home import dataset_dir

    if (dataset_dir(name) / "meta.json").is_file():
        return True
    if name == "synthetic":
        prepare(PrepareConfig(dataset="synthetic"))
        return True
    if name == "synthetic-conflict":
        # A small catalogue: with 20 candidates out of the ~30 items outside a history, the next items of the
        # other groups' cycles are almost always among the candidates, so every prompt carries the conflict.
        prepare(PrepareConfig(dataset=name, synthetic_items=40, synthetic_groups=4, synthetic_users=600))
        return True
    if name == "lastfm" and (SHARED / "lastfm" / "train_data.df").is_file():
        prepare(PrepareConfig(dataset="lastfm", format="llara", input=SHARED / "lastfm", trust_pickle=True))
        return True
    return False


def normalisation_metrics(predictions: Path, builder) -> dict:
    """Ranking metrics (mean ± std over draws) of a score-mode predictions file with the stored sum scores
    and with the same scores divided by each title's token count (mean normalisation)."""
    import numpy as np

    from ilora_cli import metrics

    lines = [json.loads(x) for x in open(predictions, encoding="utf-8")]
    out = {}
    for mode in ("sum", "mean"):
        per_draw = []
        for d in sorted({x["draw"] for x in lines}):
            rows = [x for x in lines if x["draw"] == d]
            s = np.array([x["scores"] for x in rows])
            if mode == "mean":
                s = s / np.array([[len(builder.answer_ids(c)) for c in x["candidates"]] for x in rows])
            cols = np.array([x["candidates"].index(x["target"]) for x in rows])
            per_draw.append(metrics.ranking_metrics(metrics.rank_of_target(s, cols)))
        agg = metrics.aggregate(per_draw)
        out[mode] = {k: {"mean": round(v["mean"], 4), "std": round(v["std"], 4)} for k, v in agg.items()}
    return out


def write_result(name: str, doc: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **doc}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return path


def ensure_encoder(dataset: str) -> None:
    """Train the dataset's default SASRec encoder once, before parallel workers need it."""
    from ilora_cli.encoders.train import EncodeConfig, encode
    from ilora_cli.home import encoder_dir

    if not (encoder_dir(f"{dataset}-sasrec") / "encoder.json").is_file():
        encode(EncodeConfig(dataset=dataset, quiet=True))
