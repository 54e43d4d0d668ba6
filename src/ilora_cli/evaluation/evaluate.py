"""``ilora eval``: trained runs (and the encoder alone) on the same frozen candidate draws."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics
from ..console import err, labelled, progress
from ..data.prepared import PreparedDataset, SplitData
from ..devices import check_device, resolve_device
from ..errors import UserError
from ..training.objectives import fused_scores
from .llm import generate_answers, match_answer, score_rows

MODES = ("score", "generate")


@dataclass
class EvalConfig:
    runs: list[str] = field(default_factory=list)  # run directories or names under $ILORA_HOME/runs
    encoder: bool | str = False  # also evaluate an encoder alone: true = the first run's (or the dataset's default);
    # a name or path = that encoder besides (e.g. one fitted on every training row, the strongest first stage)
    dataset: str | None = None  # prepared dataset (default: the one the first run was trained on)
    split: str = "val"  # val or test
    mode: str = "score"  # score (log-likelihood ranking) or generate (the paper's protocol)
    candidates: str = "stored"  # stored (the frozen draws) or retrieve:N (encoder top-N, LLM rerank)
    normalize: str | None = None  # score mode: sum or mean of title token log-probs (default: the run's)
    batch_size: int = 8  # prompts per forward
    num_beams: int = 1  # generate mode: beams (1 = greedy)
    draws: int | None = None  # use only the first N stored draws
    max_samples: int | None = None  # evaluate only the first N rows (quick checks; reported as such)
    test_file: Path | None = None  # a LLaRA-format .df split to score instead (needs trust_pickle)
    trust_pickle: bool = False  # allow reading --test-file (a pandas pickle)
    predictions: Path | None = None  # JSONL of per-sample predictions (default: in the run directory)
    gate_counterfactual: bool | None = None  # a K > 1 run also scored with shuffled and uniform gates
    # (evaluation/gate_report.py); None: for the item head (two more passes over the rows), not for the title head
    # (twice the draws' forwards again)
    device: str = "auto"  # auto (cuda when available, else cpu), cpu, cuda or cuda:N
    quiet: bool = False  # no progress bar

    def validate(self) -> None:
        check_device(self.device)
        if self.mode not in MODES:
            raise UserError(f"Unknown mode {self.mode!r}; choose score or generate.")
        if self.split not in ("val", "test"):
            raise UserError(f"Unknown split {self.split!r}; choose val or test.")
        if self.normalize not in (None, "sum", "mean"):
            raise UserError(f"normalize must be sum or mean; got {self.normalize!r}.")
        if self.candidates != "stored" and not _retrieve_n(self.candidates):
            raise UserError(f"--candidates must be 'stored' or 'retrieve:N'; got {self.candidates!r}.")
        if not self.runs and not self.encoder:
            raise UserError("Nothing to evaluate: pass --run RUN_DIR (several allowed) and/or --encoder.")
        if self.mode == "generate" and self.candidates != "stored":
            raise UserError("Generate mode uses the stored candidate draws; drop --candidates retrieve:N.")
        for name in ("batch_size", "num_beams"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1.")
        for name in ("draws", "max_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1; got {getattr(self, name)}.")


def _retrieve_n(spec: str) -> int | None:
    if spec.startswith("retrieve:") and spec[9:].isdigit() and int(spec[9:]) >= 1:
        return int(spec[9:])
    return None


def resolve_run(name_or_path: str) -> Path:
    from ..home import run_dir

    p = Path(name_or_path)
    if (p / "ilora.json").is_file():
        return p
    if "/" not in name_or_path:
        d = run_dir(name_or_path)
        if (d / "ilora.json").is_file():
            return d
    raise UserError(f"{name_or_path} is not a finished iLoRA run (no ilora.json).")


def load_split(config: EvalConfig, dataset: PreparedDataset) -> SplitData:
    """The rows to evaluate: a split of the prepared dataset, or an external LLaRA test file."""
    if config.test_file is None:
        split = dataset.split(config.split)
    else:
        split = _external_split(config, dataset)
    if split.candidates is None:
        raise UserError(f"The {split.name} split has no stored candidate draws.")
    if config.draws is not None:
        split.candidates = split.candidates[:, : config.draws]
    if config.max_samples is not None:
        n = min(config.max_samples, len(split))
        split = SplitData(
            split.name, split.sample_id[:n], split.seq[:n], split.len_seq[:n], split.next[:n], split.candidates[:n]
        )
    return split


def _external_split(config: EvalConfig, dataset: PreparedDataset) -> SplitData:
    from ..data.candidates import draw_candidates
    from ..data.formats.llara import _rows
    from ..data.safe_pickle import load_dataframe
    from ..data.source import validate_rows

    path = Path(config.test_file)
    if not path.is_file():
        raise UserError(f"The test file {path} does not exist.")
    if not config.trust_pickle:
        raise UserError(f"{path} is a pandas pickle, which can run code when loaded; pass --trust-pickle to read it.")
    rows = _rows(load_dataframe(path), path, dataset.max_history)
    rows = rows.select(rows.len_seq >= dataset.meta.get("min_history", 3))
    validate_rows(rows, dataset.n_items, "test file", dataset.pad_id)
    sample_id = np.arange(len(rows))
    cands = draw_candidates(
        rows.seq,
        rows.len_seq,
        rows.next,
        sample_id,
        dataset.n_items,
        int(dataset.meta["n_candidates"]),
        int(dataset.meta["draws"]),
        int(dataset.meta["seed"]),
        "test",
    )
    return SplitData("test-file", sample_id, rows.seq, rows.len_seq, rows.next, cands)


def _target_columns(cands: np.ndarray, target: np.ndarray) -> np.ndarray:
    return (cands == target[:, None]).argmax(axis=1)


def evaluate_run(
    run, split: SplitData, config: EvalConfig, label: str, pred_file: Path | None, meta: dict | None = None
) -> dict[str, Any]:
    """One run on one split: metrics (mean ± std over draws) and per-sample predictions.

    In score mode the run's default ranking is reported under ``metrics`` — the fused score
    ``a · LLM + b · encoder`` for a run trained with fusion weights, else the LLM's score — and the language
    model alone under ``llm``, so that what the LLM learned is never hidden behind the encoder. A run whose
    head ranks the whole catalogue (the item head) also reports full-catalogue HR@10 / NDCG@10 (history
    excluded) for each ranking, beside the sampled metrics. A K > 1 run gets ``gate`` (gate_report.py): its gate's
    statistics and the counterfactual of shuffled and uniform gates; ``meta`` (the dataset's) names its groups.
    """
    n, draws = len(split), split.candidates.shape[1]
    retrieve = _retrieve_n(config.candidates)
    total = n if (retrieve or run.scorer.ranks_catalogue) and config.mode == "score" else n * draws
    t0 = time.perf_counter()
    with progress(disable=config.quiet) as bar:
        task = bar.add_task(f"{label} ({config.mode})", total=total, info="")

        def tick(k):
            bar.advance(task, k)

        if config.mode == "score":
            out, lines = _score_mode(run, split, config, retrieve, tick, meta or {})
        else:
            out, lines = _generate_mode(run, split, config, tick)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    if pred_file is not None:
        _write_lines(pred_file, lines)
    out["predictions"] = str(pred_file) if pred_file else None
    return out


def _score_mode(run, split: SplitData, config: EvalConfig, retrieve: int | None, tick, meta) -> tuple[dict, list]:
    """Every ranking (the LLM alone, fused when the run has weights, the encoder) on every candidate draw (or the
    encoder's top-N with ``retrieve``), plus the whole catalogue for heads that rank it."""
    histories = split.histories()
    fusion = run.fusion
    rankings = ("llm", "fused") if fusion is not None else ("llm",)
    normalize = config.normalize or run.normalize
    encoder = run.model.encoder
    sets = retrieve_candidates(encoder, split, retrieve)[:, None] if retrieve else split.candidates  # (N, D, C)
    full = run.scorer.ranks_catalogue and not retrieve
    llm = score_rows(run, histories, sets, config.batch_size, normalize, tick, catalogue=full)
    per_draw: dict[str, list[dict[str, float]]] = {r: [] for r in (*rankings, "encoder")}
    rr = {r: np.zeros(len(split)) for r in per_draw}  # (N,) each user's reciprocal rank, mean over the draws
    catalogue_ranks = None
    if full:
        by = _rankings(llm["catalogue"], encoder_catalogue_scores(encoder, split), fusion)
        catalogue_ranks = {r: metrics.full_ranking_ranks(s, split.next, exclude=histories) for r, s in by.items()}
    lines: list[dict[str, Any]] = []
    agree = []  # per draw: how often the LLM's top candidate is the encoder's
    for d in range(sets.shape[1]):
        cands = sets[:, d]  # (N, C)
        by = _rankings(llm["draws"][:, d], encoder_candidate_scores(encoder, split, cands), fusion)
        agree.append(float((by["llm"].argmax(1) == by["encoder"].argmax(1)).mean()))
        for r in by:
            if retrieve:
                ranks = _rerank_ranks(by[r], cands, split.next)
                per_draw[r].append(metrics.ranking_metrics(ranks, ks=(1, 5, 10), ndcg_ks=(5, 10)))
            else:
                ranks = metrics.rank_of_target(by[r], _target_columns(cands, split.next))
                per_draw[r].append(metrics.ranking_metrics(ranks))
            rr[r] += np.where(ranks >= 0, 1.0 / (np.maximum(ranks, 0) + 1.0), 0.0) / sets.shape[1]
        lines += _draw_lines(split, d, cands, by, by[rankings[-1]], llm["gates"], catalogue_ranks, rankings[-1])
    result = {r: metrics.aggregate(per_draw[r]) for r in per_draw}
    if full:
        for r, ranks in catalogue_ranks.items():
            result[r].update(metrics.catalogue_metrics(ranks))
    out = {
        "metrics": result[rankings[-1]],
        "ranking": "fused" if fusion is not None else "llm",
        "fusion": fusion,
        "normalize": normalize if run.scorer.kind == "title" else None,
        "head": run.scorer.kind,
        "llm_encoder_top1_agreement": float(np.mean(agree)),
    }
    if fusion is not None:
        out["llm"] = {"metrics": result["llm"]}
    out["encoder"] = {"metrics": result["encoder"]}  # on the same rows and candidates
    # per user, for the paired tests of evaluate(); taken out of the document before it is printed
    out["_per_user"] = {"sample_id": split.sample_id, "rr": rr | {"default": rr[rankings[-1]]}}
    if catalogue_ranks is not None:
        out["_per_user"]["catalogue_ranks"] = catalogue_ranks | {"default": catalogue_ranks[rankings[-1]]}
    if _wants_counterfactual(run, config, retrieve):
        out["gate"] = _gate_document(run, split, config, sets, llm, normalize, meta)
    return out, lines


def _wants_counterfactual(run, config: EvalConfig, retrieve: int | None) -> bool:
    if config.gate_counterfactual is False:
        return False
    experts = run.info["experts"]
    if retrieve or experts["experts"] < 2 or experts["gate"] == "token":
        return False  # nothing to mix, or a gate that routes per token rather than per user
    return config.gate_counterfactual if config.gate_counterfactual is not None else run.scorer.ranks_catalogue


def _gate_document(run, split: SplitData, config: EvalConfig, sets, llm, normalize, meta) -> dict[str, Any]:
    """``gate`` of a K > 1 run (gate_report.py): the same rows and draws scored again with other users' gates and
    with the uniform one, each judged by the default ranking, with the gate's statistics."""
    from .gate_report import gate_document

    encoder, histories, fusion = run.model.encoder, split.histories(), run.fusion
    full = llm["catalogue"] is not None
    enc_draws = [encoder_candidate_scores(encoder, split, sets[:, d]) for d in range(sets.shape[1])]
    enc_catalogue = encoder_catalogue_scores(encoder, split) if full else None
    default = "fused" if fusion is not None else "llm"

    def score(gates: np.ndarray) -> dict[str, Any]:
        return score_rows(run, histories, sets, config.batch_size, normalize, None, catalogue=full, gates_in=gates)

    def judge(scores: dict[str, Any], ranking: str) -> tuple[dict[str, Any], str, np.ndarray]:
        name = default if ranking == "default" else "llm"
        per_draw, rr = [], np.zeros(len(split))
        for d in range(sets.shape[1]):
            ranking = _rankings(scores["draws"][:, d], enc_draws[d], fusion)[name]
            ranks = metrics.rank_of_target(ranking, _target_columns(sets[:, d], split.next))
            per_draw.append(metrics.ranking_metrics(ranks))
            rr += 1.0 / (ranks + 1.0) / sets.shape[1]
        doc = metrics.aggregate(per_draw)
        if not full:
            return doc, "mrr", rr
        ranking = _rankings(scores["catalogue"], enc_catalogue, fusion)[name]
        ranks = metrics.full_ranking_ranks(ranking, split.next, exclude=histories)
        doc.update(metrics.catalogue_metrics(ranks))
        return doc, metrics.CATALOGUE_METRIC, metrics.per_user_ndcg(ranks, 10)

    return gate_document(run, split, meta, llm, score, judge, seed=0)


def _draw_lines(split, d, cands, by, default, gates, catalogue_ranks, default_name) -> list[dict[str, Any]]:
    """The predictions file's lines of one draw: candidates, the default scores, each ranking's scores, the gate, and
    for a head that ranks the catalogue the target's rank there by each ranking (``catalogue_rank``, 0-based, the
    history excluded: the same in every draw's line of a row)."""
    lines = []
    for i in range(len(split)):
        line = _line(split, i, d, cands[i], default[i], gates[i])
        line["llm_scores"] = [round(float(x), 5) for x in by["llm"][i]]
        line["encoder_scores"] = [round(float(x), 5) for x in by["encoder"][i]]
        if catalogue_ranks is not None:
            line["catalogue_rank"] = {r: int(v[i]) for r, v in catalogue_ranks.items()}
            line["catalogue_rank"]["default"] = line["catalogue_rank"][default_name]
        lines.append(line)
    return lines


def _rankings(llm: np.ndarray, encoder: np.ndarray, fusion: dict[str, float] | None) -> dict[str, np.ndarray]:
    """The scores of every ranking of the same items: the LLM alone, the encoder alone, fused when weighted."""
    by = {"llm": llm, "encoder": encoder}
    if fusion is not None:
        by["fused"] = fused_scores(llm, encoder, fusion["llm"], fusion["encoder"])
    return by


def _generate_mode(run, split: SplitData, config: EvalConfig, tick) -> tuple[dict, list]:
    """The paper's protocol on every stored draw: greedy generation, valid iff exactly one title occurs."""
    histories = split.histories()
    n = len(split)
    per_draw, lines = [], []
    for d in range(split.candidates.shape[1]):
        cands = split.candidates[:, d]  # (N, C)
        texts, gates = generate_answers(run, histories, cands, config.batch_size, config.num_beams, tick)
        valid = np.zeros(n, dtype=bool)
        hits = np.zeros(n, dtype=bool)
        for i, text in enumerate(texts):
            k = match_answer(text, [run.titles[c] for c in cands[i]])
            valid[i] = k is not None
            hits[i] = k is not None and cands[i, k] == split.next[i]
            lines.append(
                {
                    **_line(split, i, d, cands[i], None, gates[i]),
                    "output": text,
                    "prediction": int(cands[i, k]) if k is not None else None,
                    "valid": bool(valid[i]),
                }
            )
        per_draw.append(
            {
                "valid_ratio": metrics.valid_ratio(valid),
                "hr@1": float(hits.mean()),  # hits / all samples
                "hr@1_valid": float(hits.sum() / max(1, valid.sum())),  # hits / valid outputs (the paper's)
            }
        )
    out = {"metrics": metrics.aggregate(per_draw), "ranking": "llm", "fusion": None, "normalize": None}
    return out, lines


def _predictions_path(config: EvalConfig, n_runs: int, run_dir: Path, suffix: str) -> Path:
    """One run: ``--predictions`` is the file, unless it names an existing folder; several runs: a folder."""
    if not config.predictions:
        return run_dir / f"predictions-{suffix}.jsonl"
    given = Path(config.predictions)
    if n_runs == 1 and not given.is_dir():
        return given
    return given / f"{run_dir.name}-{suffix}.jsonl"


def _check_predictions_target(config: EvalConfig, n_runs: int) -> None:
    """Refuse a predictions path that cannot be written before the evaluation starts, not after it."""
    if not config.predictions:
        return
    given = Path(config.predictions)
    folder = given if (n_runs > 1 or given.is_dir()) else given.parent
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--predictions {given} cannot be written: {parent} is a file, not a folder.")
            break


def _check_writable(config: EvalConfig, run_dirs: list[Path]) -> None:
    """Where the predictions go must be writable, checked before the evaluation rather than after it: by default
    each run's own directory, which may be a read-only copy."""
    import os

    folders = [Path(config.predictions)] if config.predictions else run_dirs
    for folder in folders:
        folder = folder if folder.is_dir() else next((p for p in folder.parents if p.exists()), folder.parent)
        if not os.access(folder, os.W_OK):
            hint = "" if config.predictions else "; pass --predictions FILE to write them elsewhere"
            raise UserError(f"The predictions cannot be written into {folder} (it is read-only){hint}.")


def _write_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    """Write the predictions through a temporary of a name no other file has, renamed into place at the end."""
    from ..home import write_text_durably

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_durably(path, "".join(json.dumps(line) + "\n" for line in lines))


def _line(split: SplitData, i: int, draw: int, cands, scores, gates) -> dict[str, Any]:
    line = {
        "sample_id": int(split.sample_id[i]),
        "draw": draw,
        "candidates": [int(c) for c in cands],
        "target": int(split.next[i]),
        "gate": [round(float(g), 6) for g in gates],
    }
    if scores is not None:
        line["scores"] = [round(float(s), 5) for s in scores]
        line["prediction"] = int(cands[int(np.argmax(scores))])
    return line


def encoder_candidate_scores(encoder, split: SplitData, cands: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """(N, C) the encoder's score of each row's candidates (user representation · item embedding)."""
    import torch

    device = encoder.item_embedding.weight.device
    out = []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            stop = start + batch_size
            seq = torch.as_tensor(split.seq[start:stop], device=device)  # (b, L)
            lens = torch.as_tensor(split.len_seq[start:stop], device=device)  # (b,)
            c = torch.as_tensor(cands[start:stop], device=device)  # (b, C)
            out.append(encoder.score_candidates(seq, lens, c).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, cands.shape[1]), dtype=np.float32)


def encoder_catalogue_scores(encoder, split: SplitData, batch_size: int = 1024) -> np.ndarray:
    """(N, n_items) the encoder's score of every catalogue item for each row."""
    import torch

    device = encoder.item_embedding.weight.device
    out = []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            seq = torch.as_tensor(split.seq[start : start + batch_size], device=device)  # (b, L)
            lens = torch.as_tensor(split.len_seq[start : start + batch_size], device=device)  # (b,)
            out.append(encoder.score_all(seq, lens).float().cpu().numpy())  # (b, n_items)
    return np.concatenate(out) if out else np.zeros((0, encoder.n_items), dtype=np.float32)


def retrieve_candidates(encoder, split: SplitData, n: int) -> np.ndarray:
    """(N, n) the encoder's top-n items of the whole catalogue for each row, history excluded."""
    return encoder.top_items(split.seq, split.len_seq, n)


def _rerank_ranks(scores: np.ndarray, cands: np.ndarray, target: np.ndarray) -> np.ndarray:
    present = (cands == target[:, None]).any(axis=1)
    ranks = metrics.rank_of_target(scores, _target_columns(cands, target))
    return np.where(present, ranks, metrics.MISSING)


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Evaluate every run (and optionally the encoder) on the same rows and candidates."""
    from ..training.run import load_run, read_info

    run_dirs = [resolve_run(r) for r in config.runs]
    infos = [read_info(d) for d in run_dirs]
    dataset_name = config.dataset or (infos[0]["dataset"]["name"] if infos else None)
    if dataset_name is None:
        raise UserError("Pass --dataset to evaluate the encoder alone.")
    dataset = PreparedDataset.open(dataset_name)
    for d, info in zip(run_dirs, infos):
        if info["dataset"]["checksum"] != dataset.checksum:
            raise UserError(
                f"The run {d} was trained on a different dataset ({info['dataset']['name']!r}) "
                f"than {dataset.name!r}; evaluate it on its own dataset."
            )
        head = info["experts"].get("head", "title")
        if config.mode == "generate" and head != "title":
            raise UserError(
                f"Generate mode writes titles, but the run {d.name} has the {head} head, which scores items; "
                "evaluate it in score mode."
            )
    named = _named_encoder(config, dataset)
    _check_predictions_target(config, len(run_dirs))
    _check_writable(config, run_dirs)
    split = load_split(config, dataset)
    retrieve = _retrieve_n(config.candidates)
    if retrieve and retrieve > dataset.n_items - dataset.max_history:
        raise UserError(
            f"retrieve:{retrieve} asks for more items than the catalogue of {dataset.n_items} holds beyond a "
            f"history of {dataset.max_history}; use at most retrieve:{max(1, dataset.n_items - dataset.max_history)}."
        )
    protocol = (
        f"full ranking, encoder top-{retrieve} reranked" if retrieve else metrics.label(split.candidates.shape[2])
    )
    results: dict[str, dict[str, Any]] = {}
    encoder = None
    for d in run_dirs:
        err.print(f"Loading run {d} ...")
        run = load_run(d, device=resolve_device(config.device))
        encoder = encoder or run.model.encoder
        suffix = f"{split.name}-{config.mode}" + (f"-retrieve{retrieve}" if retrieve else "")
        pred = _predictions_path(config, len(run_dirs), d, suffix)
        results[d.name] = evaluate_run(run, split, config, d.name, pred, dataset.meta)
        results[d.name]["holdout"] = _holdout_note(d, run.info)
        del run
    if run_dirs or config.encoder:
        # The encoder alone is always reported beside runs: it is what a run must beat. Without runs, a named
        # encoder is the encoder; without either, the dataset's default.
        own = encoder if encoder is not None or named is None else named[0]
        results["encoder"] = {"metrics": _encoder_metrics(config, dataset, split, own, retrieve)}
    if named is not None and run_dirs:
        results[f"encoder:{named[1]}"] = {"metrics": _encoder_metrics(config, dataset, split, named[0], retrieve)}
    if config.mode == "score" and not retrieve and config.test_file is None:
        results["popularity"] = {"metrics": popularity_metrics(dataset, split)}
    per_user = {name: _take_per_user(r) for name, r in results.items()}
    for d in run_dirs:
        results[d.name]["tests"] = run_tests(per_user, d.name, [n for n in results if n.startswith("encoder:")])
        results[d.name]["below_encoder"] = below_encoder(results[d.name], per_user[d.name])
        _say_if_below(d.name, results[d.name]["below_encoder"], split.name)
    first = next(iter(results.values()))
    return {
        "mode": config.mode if not retrieve else "score",
        "split": split.name,
        "protocol": protocol,
        "n_rows": len(split),
        "draws": 1 if retrieve else int(split.candidates.shape[1]),
        "normalize": first.get("normalize"),
        "metrics": first["metrics"],
        "results": results,
    }


def _take_per_user(result: dict[str, Any]) -> dict[str, Any]:
    """The per-user values a result carries for the tests (``_per_user``), taken out of the printed document."""
    return result.pop("_per_user", None) or result["metrics"].pop("_per_user", None) or {}


def _paired_values(per_user: dict[str, Any], ranking: str) -> tuple[str, np.ndarray] | None:
    """The per-user values a ranking is tested on: catalogue NDCG@10 where the catalogue was ranked, else the
    reciprocal rank on the stored draws (mean over the draws)."""
    ranks = per_user.get("catalogue_ranks", {})
    ranks = ranks.get(ranking) if isinstance(ranks, dict) else ranks
    if ranks is not None:
        return metrics.CATALOGUE_METRIC, metrics.per_user_ndcg(ranks, 10)
    rr = per_user.get("rr", {})
    rr = rr.get(ranking) if isinstance(rr, dict) else rr
    return ("mrr", np.asarray(rr)) if rr is not None else None


def run_tests(per_user: dict[str, dict[str, Any]], run: str, named: list[str]) -> dict[str, Any]:
    """Paired sign-flip permutation tests over users (metrics.paired_permutation_test) of a run's default ranking and
    its language model alone against its own encoder, against each ``--encoder NAME`` and against popularity, on
    catalogue NDCG@10 for a head that ranks the catalogue, else on MRR over the stored draws."""
    own = per_user[run]
    out: dict[str, Any] = {}
    for ranking in ("default", "llm"):
        mine = _paired_values(own, ranking)
        if mine is None:
            continue
        out["metric"] = mine[0]
        others = [("encoder", own, "encoder")] + [
            (n, per_user[n], None) for n in (*named, "popularity") if n in per_user
        ]
        for name, theirs, key in others:
            ref = _paired_values(theirs, key) if key else _paired_values(theirs, None)
            if ref is None or ref[0] != mine[0]:
                continue
            out[f"{ranking}_vs_{name}"] = metrics.paired_permutation_test(mine[1], ref[1])
    return out


def below_encoder(result: dict[str, Any], per_user: dict[str, Any]) -> dict[str, Any] | None:
    """Whether the run's default ranking is below its own encoder on the catalogue metric (NDCG@10) of these rows —
    what ``recommend`` returns ranked worse than the encoder alone would rank it — with both values and the p of
    the paired test. None where the catalogue was not ranked (the title head)."""
    m = metrics.CATALOGUE_METRIC
    if m not in result.get("metrics", {}) or "catalogue_ranks" not in per_user:
        return None
    default, encoder = result["metrics"][m]["mean"], result["encoder"]["metrics"][m]["mean"]
    test = result.get("tests", {}).get("default_vs_encoder", {})
    return {
        "metric": m,
        "default": default,
        "encoder": encoder,
        "below": default < encoder,
        "p_value": test.get("p_value"),
    }


def _say_if_below(run: str, below: dict[str, Any] | None, split: str) -> None:
    if below and below["below"]:
        labelled(
            "note",
            f"the default ranking of {run} is below its own encoder on the {split} catalogue "
            f"({below['metric']} {below['default']:.4f} against {below['encoder']:.4f}, p = {below['p_value']:.3g}): "
            "what recommend returns is ranked worse than the encoder alone would rank it.",
        )


def _named_encoder(config: EvalConfig, dataset: PreparedDataset):
    """The encoder ``--encoder NAME`` names, loaded and checked against the dataset, and its name; else None."""
    if not isinstance(config.encoder, str):
        return None
    from ..encoders.io import check_compatible, load_encoder

    encoder, info = load_encoder(config.encoder)
    check_compatible(info, dataset)
    return encoder, Path(info["path"]).name


def _holdout_note(run_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """What the run records of its training rows; a note when its encoder had been fitted on them."""
    holdout = info.get("holdout")
    if holdout is None:
        labelled(
            "note",
            f"the run {run_dir.name} predates holdouts: its encoder was most likely fitted on the "
            "rows the run trained on, where its scores are far better than on new users.",
        )
        return {"recorded": False, "encoder_saw_training_rows": None}
    if holdout.get("encoder_saw_training_rows"):
        labelled(
            "note",
            f"the encoder of the run {run_dir.name} was fitted on the rows the run trained on "
            f"(holdout {holdout.get('spec')}), so its fusion weights and what the LLM learned from the encoder's "
            "vectors come from rows where the encoder is almost always right.",
        )
    return holdout


def _encoder_metrics(config, dataset, split, encoder, retrieve) -> dict[str, Any]:
    """An encoder alone on the same rows: the sampled metrics of every draw and the catalogue's (or, with
    ``retrieve``, the reranking protocol's), with its per-user values for the paired tests (``_per_user``)."""
    from ..encoders.evaluate import split_ranks
    from ..encoders.io import check_compatible, load_encoder

    if encoder is None:
        encoder, info = load_encoder(f"{dataset.name}-sasrec")
        check_compatible(info, dataset)
    sampled, full = split_ranks(encoder, split, dataset.n_items)
    if retrieve:
        ranks = np.where(full < retrieve, full, metrics.MISSING)  # the encoder's own order of its top-N
        out = metrics.aggregate([metrics.ranking_metrics(ranks, ks=(1, 5, 10), ndcg_ks=(5, 10))])
        return out | {"_per_user": {"rr": np.where(ranks >= 0, 1.0 / (np.maximum(ranks, 0) + 1.0), 0.0)}}
    if config.mode == "generate":
        return metrics.aggregate(
            [
                {
                    "valid_ratio": 1.0,
                    "hr@1": metrics.hit_ratio(sampled[:, d], 1),
                    "hr@1_valid": metrics.hit_ratio(sampled[:, d], 1),
                }
                for d in range(sampled.shape[1])
            ]
        )
    out = metrics.aggregate([metrics.ranking_metrics(sampled[:, d]) for d in range(sampled.shape[1])])
    out.update(metrics.catalogue_metrics(full))
    rr = (1.0 / (sampled + 1.0)).mean(axis=1)  # (N,) mean over the draws
    return out | {"_per_user": {"rr": rr, "catalogue_ranks": full}}


def popularity_metrics(dataset: PreparedDataset, split: SplitData) -> dict[str, Any]:
    """The popularity baseline on the same rows: every item scored by how often it is a training row's next item,
    on the stored draws and over the whole catalogue (history excluded; ties ranked pessimistically)."""
    popularity = np.bincount(dataset.split("train").next, minlength=dataset.n_items).astype(np.float64)  # (N,)
    per_draw = []
    for d in range(split.candidates.shape[1]):
        cands = split.candidates[:, d]  # (R, C)
        per_draw.append(
            metrics.ranking_metrics(metrics.rank_of_target(popularity[cands], _target_columns(cands, split.next)))
        )
    full = metrics.full_ranking_ranks(
        np.broadcast_to(popularity, (len(split), len(popularity))), split.next, split.histories()
    )
    return metrics.aggregate(per_draw) | metrics.catalogue_metrics(full) | {"_per_user": {"catalogue_ranks": full}}
