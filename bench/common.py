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
    if name == "lastfm" and (SHARED / "lastfm" / "train_data.df").is_file():
        prepare(PrepareConfig(dataset="lastfm", format="llara", input=SHARED / "lastfm", trust_pickle=True))
        return True
    return False


def write_result(name: str, doc: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **doc}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return path
