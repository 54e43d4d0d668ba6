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
    """Ranking metrics (mean ± std over draws) of a score-mode predictions file with the LLM's stored sum scores
    (``llm_scores``: the language model alone, also where the run's default ranking is fused) and with the same
    scores divided by each title's token count (mean normalisation)."""
    import numpy as np

    from ilora_cli import metrics

    lines = [json.loads(x) for x in open(predictions, encoding="utf-8")]
    out = {}
    for mode in ("sum", "mean"):
        per_draw = []
        for d in sorted({x["draw"] for x in lines}):
            rows = [x for x in lines if x["draw"] == d]
            s = np.array([x.get("llm_scores", x["scores"]) for x in rows])
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


def popularity_baseline(dataset, split: str = "val", draws: int | None = None, rows: int | None = None) -> dict:
    """The stored candidates of ``split`` ranked by how often each item is the next item of a training row.

    Two readings of the same ranking, each mean ± std over the stored draws: ``pessimistic`` ranks a target
    behind every candidate of equal popularity, as every ranking of this tool is measured (``metrics``);
    ``random_ties`` is the expected value when ties are broken at random (many candidates of a large catalogue
    share a count). The LLM-alone numbers are quoted beside both: a ranking of the LLM that does not beat this
    has learned popularity at most.
    """
    import numpy as np

    from ilora_cli import metrics

    popularity = np.bincount(dataset.split("train").next, minlength=dataset.n_items).astype(np.float64)  # (N,)
    data = dataset.split(split)
    n = min(rows, len(data)) if rows else len(data)  # the first rows, as validate_rows and max_samples take them
    cands = (data.candidates[:, :draws] if draws else data.candidates)[:n]  # (R, D, C)
    targets = data.next[:n]  # (R,)
    pessimistic, random_ties = [], []
    for d in range(cands.shape[1]):
        scores = popularity[cands[:, d]]  # (R, C)
        target = (cands[:, d] == targets[:, None]).argmax(axis=1)  # (R,)
        pessimistic.append(metrics.ranking_metrics(metrics.rank_of_target(scores, target)))
        own = scores[np.arange(len(target)), target][:, None]  # (R, 1)
        ahead = (scores > own).sum(axis=1)  # (R,) strictly more popular
        tied = (scores == own).sum(axis=1)  # (R,) the target and its ties: it lands at ahead + j, j < tied
        hr1 = np.where(ahead == 0, 1.0 / tied, 0.0)
        mrr = np.array([np.mean(1.0 / (a + 1 + np.arange(t))) for a, t in zip(ahead, tied)])
        random_ties.append({"hr@1": float(hr1.mean()), "mrr": float(mrr.mean())})
    agg = metrics.aggregate(pessimistic)
    return {
        "split": split,
        "rows": n,
        "draws": int(cands.shape[1]),
        "candidates": int(cands.shape[2]),
        "pessimistic": {m: agg[m] for m in ("hr@1", "hr@5", "ndcg@5", "mrr")},
        "random_ties": metrics.aggregate(random_ties),
    }


def random_baseline(n_candidates: int) -> dict:
    """The expected HR@1 and MRR of a random order of ``n_candidates``: 1/C and (1/C) Σ_k 1/k."""
    return {"hr@1": 1.0 / n_candidates, "mrr": sum(1.0 / k for k in range(1, n_candidates + 1)) / n_candidates}


def baseline_line(dataset, split: str = "val", draws: int | None = None, rows: int | None = None) -> str:
    """``popularity 0.072 / 0.183 (ties at random 0.074 / 0.189); random 0.050 / 0.180`` for a results table."""
    pop = popularity_baseline(dataset, split, draws, rows)
    p, r = pop["pessimistic"], pop["random_ties"]
    rnd = random_baseline(pop["candidates"])
    return (
        f"popularity {p['hr@1']['mean']:.3f} / {p['mrr']['mean']:.3f} (ties at random {r['hr@1']['mean']:.3f} / "
        f"{r['mrr']['mean']:.3f}); random {rnd['hr@1']:.3f} / {rnd['mrr']:.3f}  (HR@1 / MRR)"
    )
