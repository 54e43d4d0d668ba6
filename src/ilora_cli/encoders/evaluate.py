"""Evaluate an encoder alone: sampled metrics over the stored candidate draws, plus full-catalogue ranking."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import metrics
from ..data.prepared import SplitData
from .base import SequentialEncoder


@torch.no_grad()
def split_ranks(
    model: SequentialEncoder, split: SplitData, n_items: int, batch_size: int = 1024
) -> tuple[np.ndarray | None, np.ndarray]:
    """The target's 0-based ranks: (N, draws) among each stored candidate draw (None without candidates),
    and (N,) among the whole catalogue with the row's history excluded."""
    if model.n_items != n_items:
        raise ValueError(f"the encoder scores {model.n_items} items but the split's catalogue has {n_items}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sampled, full = [], []
    try:
        for start in range(0, len(split), batch_size):
            stop = min(start + batch_size, len(split))
            seq = torch.as_tensor(split.seq[start:stop], device=device)  # (b, L)
            len_seq = torch.as_tensor(split.len_seq[start:stop], device=device)  # (b,)
            scores = model.score_all(seq, len_seq).float().cpu().numpy()  # (b, n_items)
            target = split.next[start:stop]  # (b,)
            history = [split.seq[i, : split.len_seq[i]].tolist() for i in range(start, stop)]
            full.append(metrics.full_ranking_ranks(scores, target, exclude=history))
            if split.candidates is not None:
                cands = split.candidates[start:stop]  # (b, draws, C)
                b, draws, C = cands.shape
                cand_scores = np.take_along_axis(scores, cands.reshape(b, draws * C), axis=1).reshape(b, draws, C)
                target_col = (cands == target[:, None, None]).argmax(axis=2)  # (b, draws)
                sampled.append(
                    np.stack(
                        [metrics.rank_of_target(cand_scores[:, d], target_col[:, d]) for d in range(draws)],
                        axis=1,
                    )
                )  # (b, draws)
    finally:
        model.train(was_training)
    full_ranks = np.concatenate(full) if full else np.zeros(0, dtype=np.int64)
    if split.candidates is None:
        return None, full_ranks
    sampled_ranks = np.concatenate(sampled) if sampled else np.zeros((0, split.candidates.shape[1]), dtype=np.int64)
    return sampled_ranks, full_ranks


def evaluate_encoder(
    model: SequentialEncoder, split: SplitData, n_items: int, batch_size: int = 1024
) -> dict[str, Any]:
    """Sampled HR@1/3/5/10, NDCG@3/5/10 and MRR as mean ± std over the stored draws, full-ranking HR@10/20/50,
    NDCG@10/20 and MRR (history excluded: :func:`metrics.catalogue_metrics`), and the sampled metrics' protocol."""
    sampled, full = split_ranks(model, split, n_items, batch_size)
    out: dict[str, Any] = {}
    if sampled is not None:
        out["protocol"] = metrics.label(split.candidates.shape[2])
        out.update(metrics.aggregate([metrics.ranking_metrics(sampled[:, d]) for d in range(sampled.shape[1])]))
    else:
        out["protocol"] = metrics.label(None)
    out.update(metrics.catalogue_metrics(full))
    return out


def training_rows_metrics(
    model: SequentialEncoder,
    split: SplitData,
    rows: np.ndarray,
    n_items: int,
    n_candidates: int,
    seed: int,
    max_rows: int = 2000,
) -> dict[str, Any]:
    """Sampled metrics on training rows (one seeded draw of uniform candidates, at most ``max_rows`` rows).

    What the encoder's scores look like on the rows a second stage learns from: on rows it was fitted on they
    all but give the answer away (data/holdout.py); on held-out rows they should look like validation.
    """
    from ..data.candidates import draw_candidates

    rows = np.asarray(rows)
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng([seed, 0xD1A6]).choice(rows, size=max_rows, replace=False))
    part = split.select(rows)
    part.candidates = draw_candidates(
        part.seq, part.len_seq, part.next, part.sample_id, n_items, n_candidates, 1, seed, "train"
    )
    out = {"rows": int(len(rows))}
    out.update(evaluate_encoder(model, part, n_items))
    return out
