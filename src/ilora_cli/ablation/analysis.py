"""The negative-transfer analysis of the paper (METHOD.md §9): do users of different kinds pull the adapter
in conflicting directions, and does the gate route them to different experts?

1. k-means (8 clusters, scikit-learn) on the frozen encoder's user representations of the training rows.
2. For each cluster, a fixed number of its rows (seeded, the same rows for every run compared) and the
   gradient of the run's own training objective with respect to every LoRA weight (A and B of every
   adapted layer), summed over those rows, in eval mode (no dropout): one vector per cluster. Each row is
   the training sample of its first epoch (the same candidates and template; uniform negatives). With the
   ``generate`` objective, whose loss is a mean over the micro-batch's answer tokens, a micro-batch's
   mean times its rows stands for their sum.
3. The cosine similarity of every pair of cluster gradients (an 8 x 8 matrix) and its mean off the
   diagonal: negative entries are clusters whose updates conflict.
4. For runs with several experts, the mean gate weights of each cluster's rows (clusters x experts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import check_minimums, check_seed, resolve
from ..console import err
from ..data.prepared import PreparedDataset, SplitData
from ..errors import UserError


@dataclass
class AnalysisConfig:
    run: str | None = None  # the run to analyse (directory or name under $ILORA_HOME/runs)
    baseline: str | None = None  # a run to compare with on the same clusters and rows (e.g. plain LoRA)
    dataset: str | None = None  # the runs' training dataset (default: the one the run names)
    clusters: int = 8  # k-means clusters of the encoder's user representations
    rows_per_cluster: int = 32  # training rows per cluster whose gradients are summed
    cluster_rows: int | None = None  # cluster a seeded subset of this many training rows (None: all)
    batch_size: int = 8  # rows per forward and backward
    seed: int = 42  # k-means initialisation and the choice of rows
    device: str = "auto"  # auto, cpu, cuda
    name: str | None = None  # directory name under $ILORA_HOME/ablations
    output: Path | None = None  # write here instead of $ILORA_HOME/ablations/<name>
    overwrite: bool = False  # replace an existing analysis directory

    def validate(self) -> None:
        from ..devices import check_device
        from ..home import check_name

        if self.run is None:
            raise UserError("Pass --run RUN (and optionally --baseline RUN) to the gradient-conflict analysis.")
        check_minimums(self, {"clusters": 2, "rows_per_cluster": 1, "cluster_rows": 2, "batch_size": 1})
        check_device(self.device)
        check_seed(self)
        if self.name is not None:
            check_name(self.name, "analysis name")


def analysis_config(config_file: Path | None, flags: dict[str, Any], overrides: list[str] | None) -> AnalysisConfig:
    return resolve(AnalysisConfig, config_file, flags, overrides)


def gradient_conflict(config: AnalysisConfig) -> dict[str, Any]:
    """Run the analysis for ``config.run`` (and ``config.baseline``); write JSON and heatmaps; return the JSON."""
    from ..devices import resolve_device
    from ..evaluation.evaluate import resolve_run
    from ..home import atomic_directory, check_replaceable, ilora_home
    from ..training.run import load_run

    t0 = time.perf_counter()
    device = resolve_device(config.device)
    dirs = {"run": resolve_run(config.run)}
    if config.baseline is not None:
        dirs["baseline"] = resolve_run(config.baseline)
    dataset = _training_dataset(config, dirs)
    name = config.name or "gradient-conflict-" + "-vs-".join(d.name for d in dirs.values())
    out_dir = Path(config.output) if config.output else ilora_home() / "ablations" / name
    if out_dir.exists() and not config.overwrite:
        raise UserError(f"The output {out_dir} already exists; pass --overwrite to replace it.")
    check_replaceable(out_dir, "gradient-conflict analysis")
    split = dataset.split("train")
    results: dict[str, Any] = {}
    clusters = None
    for role, directory in dirs.items():
        err.print(f"Loading the {role} {directory} ...")
        run = load_run(directory, device=device)
        if clusters is None:  # the clusters of the analysed run's encoder, used for every run
            clusters = user_clusters(run.model.encoder, split, config, _trained_rows(dataset, directory))
        results[role] = {
            "run_dir": str(directory),
            **cluster_gradients(run, directory, split, clusters["rows"], config),
        }
        results[role]["encoder_sha256"] = run.info["encoder"]["sha256"]
        del run
    doc = {
        "analysis": "gradient-conflict",
        "dataset": dataset.name,
        "clusters": {k: v for k, v in clusters.items() if k != "rows"},
        "rows_per_cluster": config.rows_per_cluster,
        "rows": clusters["rows"],
        "runs": results,
        "same_encoder": len({r["encoder_sha256"] for r in results.values()}) == 1,
        "how": (
            "cosine similarity of LoRA gradients (the run's own objective, summed over the rows of each "
            "cluster, eval mode) between k-means clusters of the encoder's user representations of the training "
            "rows the run could learn on (those its encoder left out)"
        ),
    }
    with atomic_directory(out_dir, overwrite=config.overwrite) as tmp:
        doc["files"] = _write_outputs(tmp, out_dir, doc)
        doc["seconds"] = round(time.perf_counter() - t0, 3)
        _write(tmp / "gradient-conflict.json", doc)
    doc["output"] = str(out_dir)
    print_summary(doc)
    return doc


def _training_dataset(config: AnalysisConfig, dirs: dict[str, Path]) -> PreparedDataset:
    """The dataset the runs were trained on; every run must name the same one."""
    from ..training.run import read_info

    infos = {role: read_info(d) for role, d in dirs.items()}
    checksums = {info["dataset"]["checksum"] for info in infos.values()}
    if len(checksums) > 1:
        raise UserError("The run and the baseline were trained on different datasets; compare runs of one dataset.")
    name = config.dataset
    if name is None:
        from ..training.identity import saved_config

        saved = dirs["run"] / "config.yaml"
        name = saved_config(dirs["run"]).dataset if saved.is_file() else None
        name = name or infos["run"]["dataset"]["name"]
    dataset = PreparedDataset.open(str(name))
    if dataset.checksum not in checksums:
        raise UserError(
            f"The dataset {dataset.name!r} is not the one {dirs['run']} was trained on; pass it with --dataset."
        )
    return dataset


@torch.no_grad()
def user_representations(encoder, split: SplitData, batch_size: int = 1024) -> np.ndarray:
    """(N, d) the frozen encoder's user representation of every row."""
    device = encoder.item_embedding.weight.device
    out = []
    for start in range(0, len(split), batch_size):
        seq = torch.as_tensor(split.seq[start : start + batch_size], device=device)  # (b, L)
        lens = torch.as_tensor(split.len_seq[start : start + batch_size], device=device)  # (b,)
        out.append(encoder(seq, lens).float().cpu().numpy())  # (b, d)
    return np.concatenate(out)


def _trained_rows(dataset: PreparedDataset, run_dir: Path) -> np.ndarray | None:
    """The train rows the run could train on (those its encoder left out), or None for every row."""
    from ..data.holdout import second_stage_rows
    from ..encoders.io import load_encoder

    _, info = load_encoder(run_dir / "encoder")
    return None if not isinstance(info.get("holdout"), dict) else second_stage_rows(dataset, info, None)[0]


def user_clusters(encoder, split: SplitData, config: AnalysisConfig, allowed: np.ndarray | None = None) -> dict:
    """k-means clusters of the user representations of the training rows (``allowed``: of these rows only, the
    ones the run trained on), and the rows chosen from each."""
    from sklearn.cluster import KMeans

    rows = np.arange(len(split)) if allowed is None else np.sort(np.asarray(allowed))
    if config.cluster_rows is not None and config.cluster_rows < len(rows):
        rows = np.sort(np.random.default_rng([config.seed, 0xC1]).permutation(rows)[: config.cluster_rows])
    if len(rows) < config.clusters:
        raise UserError(f"{len(rows)} training rows are too few for {config.clusters} clusters.")
    reps = user_representations(encoder, split)[rows]  # (n, d)
    distinct = len(np.unique(reps, axis=0))
    if distinct < config.clusters:  # k-means would leave clusters empty, with no rows and no gradient
        raise UserError(
            f"The encoder gives {distinct} distinct user representations of the {len(rows)} rows clustered, fewer "
            f"than the {config.clusters} clusters asked for; lower clusters (or raise cluster_rows)."
        )
    kmeans = KMeans(n_clusters=config.clusters, n_init=10, random_state=config.seed).fit(reps)
    labels = kmeans.labels_
    chosen = []
    for k in range(config.clusters):
        members = rows[labels == k]
        rng = np.random.default_rng([config.seed, k])
        take = min(config.rows_per_cluster, len(members))
        chosen.append(np.sort(rng.choice(members, size=take, replace=False)).tolist())
    return {
        "k": config.clusters,
        "clustered_rows": int(len(rows)),
        "sizes": np.bincount(labels, minlength=config.clusters).tolist(),
        "rows_used": [len(c) for c in chosen],
        "inertia": float(kmeans.inertia_),
        "rows": chosen,
    }


def cluster_gradients(run, directory: Path, split: SplitData, rows: list[list[int]], config: AnalysisConfig):
    """Per cluster: the summed LoRA gradient of the run's objective; their cosine matrix, norms and mean gates."""
    from ..llm.prompt import TEMPLATE_SETS
    from ..training.identity import saved_config
    from ..training.samples import TrainSamples

    train = saved_config(directory)
    model = run.model.eval()
    lora = [p for n, p in sorted(model.named_parameters()) if "lora_" in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora:
        p.requires_grad_(True)
    samples = TrainSamples(
        split, len(run.titles), train.candidates, train.seed, n_templates=len(TEMPLATE_SETS[train.templates])
    )
    grads, gates, losses = [], [], []
    for members in rows:
        for p in lora:
            p.grad = None
        gate_sum, loss_sum = None, 0.0
        for start in range(0, len(members), config.batch_size):
            chunk = [samples.sample(r, 0) for r in members[start : start + config.batch_size]]
            loss, g = objective_loss(run, train, chunk)
            (loss * len(chunk)).backward()  # the micro-batch mean times its rows: a sum over rows
            loss_sum += float(loss.detach()) * len(chunk)
            gate_sum = g.detach().float().sum(0) if gate_sum is None else gate_sum + g.detach().float().sum(0)
        grads.append(torch.cat([p.grad.detach().float().flatten() for p in lora]).cpu())  # (P,)
        gates.append((gate_sum / len(members)).cpu().numpy())
        losses.append(loss_sum / len(members))
    g = torch.stack(grads)  # (k, P)
    similarity = cosine_matrix(g)  # (k, k)
    k = len(rows)
    off = similarity[~np.eye(k, dtype=bool)]
    experts = run.info["experts"]
    return {
        "experts": experts["experts"],
        "gate": experts["gate"] if experts["experts"] > 1 else "none (K = 1)",
        "objective": train.objective,
        "lora_parameters": int(g.shape[1]),
        "similarity": similarity.round(6).tolist(),
        "mean_off_diagonal": float(off.mean()),
        "min_off_diagonal": float(off.min()),
        "negative_pairs": int((off < 0).sum() // 2),
        "gradient_norms": g.norm(dim=1).tolist(),
        "mean_loss": losses,
        "gates": np.stack(gates).round(6).tolist() if experts["experts"] > 1 else None,
    }


def cosine_matrix(g: torch.Tensor) -> np.ndarray:
    """Cosine similarity of every pair of rows of ``g`` (k, P), in float64: float32 sums over millions of
    weights are off by about 1e-4 (a vector's cosine with itself came out 0.9989)."""
    g = g.double()
    unit = g / g.norm(dim=1, keepdim=True).clamp(min=1e-300)  # (k, P)
    return (unit @ unit.T).clamp(-1.0, 1.0).numpy()  # (k, k)


def objective_loss(run, train, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's training objective on one micro-batch (as the training loop computes it), and the gates."""
    from ..training.batches import build_batch
    from ..training.loss import batch_loss

    info = run.info["dataset"]
    batch, target_index = build_batch(run.builder, samples, train.objective, info["pad_id"], info["max_history"])
    loss, _, gates = batch_loss(
        run.model, run.model, run.scorer, run.builder, batch.to(run.model.device), target_index, train
    )
    return loss, gates


def _write(path: Path, doc: Any) -> None:
    import json

    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _write_outputs(tmp: Path, final: Path, doc: dict[str, Any]) -> dict[str, str]:
    """The heatmaps: cosine similarity per run, and cluster x expert gate means per run with experts."""
    from .plots import heatmap

    files = {}
    labels = [f"c{k} ({n})" for k, n in enumerate(doc["clusters"]["sizes"])]
    for role, r in doc["runs"].items():
        name = Path(r["run_dir"]).name
        title = (
            f"{role} {name}: K={r['experts']}, cosine of cluster LoRA gradients\n"
            f"mean off-diagonal {r['mean_off_diagonal']:.3f}"
        )
        f = f"conflict-{role}-{name}.png"
        heatmap(tmp / f, np.array(r["similarity"]), title, labels, labels, vmin=-1, vmax=1)
        files[f"{role}_similarity"] = str(final / f)
        if r["gates"] is not None:
            f = f"gates-{role}-{name}.png"
            experts = [f"e{k}" for k in range(r["experts"])]
            title = f"{role} {name}: mean gate weight per cluster ({r['gate']} gate)"
            heatmap(tmp / f, np.array(r["gates"]), title, experts, labels, vmin=0, vmax=1, cmap="viridis")
            files[f"{role}_gates"] = str(final / f)
    return files


def print_summary(doc: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"Gradient conflict between {doc['clusters']['k']} user clusters ({doc['dataset']})")
    for col in ("run", "K", "gate", "objective", "mean off-diag cos", "min", "negative pairs"):
        t.add_column(col, justify="left" if col in ("run", "gate", "objective") else "right")
    for role, r in doc["runs"].items():
        t.add_row(
            f"{role}: {Path(r['run_dir']).name}",
            str(r["experts"]),
            r["gate"],
            r["objective"],
            f"{r['mean_off_diagonal']:.4f}",
            f"{r['min_off_diagonal']:.4f}",
            str(r["negative_pairs"]),
        )
    err.print(t)
    for role, r in doc["runs"].items():
        if r["gates"] is not None:
            g = Table(title=f"Mean gate weights per cluster ({role})")
            g.add_column("cluster (rows)")
            for k in range(r["experts"]):
                g.add_column(f"expert {k}", justify="right")
            for c, row in enumerate(r["gates"]):
                g.add_row(f"c{c} ({doc['clusters']['sizes'][c]})", *(f"{x:.3f}" for x in row))
            err.print(g)
    err.print(f"Wrote {doc['output']}.")
