"""The fusion weights fitted on rows set apart, after training: the stacking rule one stage further.

A fusion ``a · s + b · e`` of the language model's score s and the encoder's e, fitted on rows the language model
trained on, sees the model's in-sample scores there and learns to trust it more than it should (from the second
epoch on, the weights fitted on every training batch did). ``apart_users`` sets a fraction of the second stage's
users apart: neither the encoder (their rows are its holdout) nor the language model trains on their rows, so the
scores of both there look like the scores of new users. After training (and at every validation, for
``--keep-best``) the weights are fitted on those rows by the listwise loss the run's ranking is judged by — over
the whole catalogue with the history excluded for the item head, over one seeded draw of candidates for the title
head — which is convex in (a, b).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import metrics
from ..data.prepared import SplitData


def fit_fusion(
    llm: np.ndarray, encoder: np.ndarray, target: np.ndarray, excluded: np.ndarray | None = None, steps: int = 100
) -> dict[str, float]:
    """(a, b) minimising mean_i CE(softmax(a · s_i + b · e_i), y_i) by L-BFGS from (0, 1), the encoder's ranking.

    ``llm`` and ``encoder`` (N, C) scores of the same items, ``target`` (N,) column of each row's true item,
    ``excluded`` (N, C) True where an item is out of the softmax (the history). Returns ``llm``, ``encoder`` (the
    weights), ``loss`` (the mean cross-entropy at them) and ``rows``.
    """
    s = torch.as_tensor(np.asarray(llm), dtype=torch.float64)  # (N, C)
    e = torch.as_tensor(np.asarray(encoder), dtype=torch.float64)  # (N, C)
    y = torch.as_tensor(np.asarray(target), dtype=torch.long)  # (N,)
    mask = torch.as_tensor(np.asarray(excluded)) if excluded is not None else None
    # Excluded entries as -inf on both sides; the target's own column is never excluded.
    if mask is not None:
        s, e = s.masked_fill(mask, 0.0), e.masked_fill(mask, 0.0)
    w = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def loss_at() -> torch.Tensor:
        z = w[0] * s + w[1] * e  # (N, C)
        if mask is not None:
            z = z.masked_fill(mask, float("-inf"))
        return torch.nn.functional.cross_entropy(z, y)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_at()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        loss = float(loss_at())
    return {"llm": float(w[0].detach()), "encoder": float(w[1].detach()), "loss": loss, "rows": int(len(y))}


@dataclass
class ApartRows:
    """The rows set apart (a :class:`SplitData` of train rows), and how the run's ranking is scored on them."""

    split: SplitData
    rows: np.ndarray  # (N,) their indices in the train split
    catalogue: bool  # the item head ranks the whole catalogue; the title head the rows' candidates
    n_items: int

    @classmethod
    def build(cls, train: SplitData, rows: np.ndarray, catalogue: bool, n_items: int, n_candidates: int, seed: int):
        """The apart ``rows`` of the train split; for the title head with one seeded draw of candidates each."""
        from ..data.candidates import draw_candidates

        part = train.select(np.asarray(rows))
        if not catalogue:
            part.candidates = draw_candidates(
                part.seq, part.len_seq, part.next, part.sample_id, n_items, n_candidates, 1, seed, "apart"
            )
        return cls(part, np.asarray(rows), catalogue, n_items)

    def __len__(self) -> int:
        return len(self.split)

    def scores(self, run, batch_size: int = 16) -> dict[str, np.ndarray]:
        """The LLM's and the encoder's scores on these rows (N, C), each row's target column and exclusions."""
        from ..evaluation.evaluate import encoder_candidate_scores, encoder_catalogue_scores
        from ..evaluation.llm import score_rows

        split, histories = self.split, self.split.histories()
        if self.catalogue:
            empty = np.zeros((len(split), 1, 0), dtype=np.int64)
            llm = score_rows(run, histories, empty, batch_size, run.normalize, catalogue=True)["catalogue"]
            encoder = encoder_catalogue_scores(run.model.encoder, split)
            excluded = np.zeros(llm.shape, dtype=bool)
            for i, items in enumerate(histories):
                excluded[i, [j for j in items if j != split.next[i]]] = True
            return {"llm": llm, "encoder": encoder, "target": split.next.copy(), "excluded": excluded}
        cands = split.candidates[:, 0]  # (N, C)
        llm = score_rows(run, histories, cands[:, None], batch_size, run.normalize)["draws"][:, 0]
        target = (cands == split.next[:, None]).argmax(axis=1)
        return {"llm": llm, "encoder": encoder_candidate_scores(run.model.encoder, split, cands), "target": target}

    def fit(self, run, batch_size: int = 16) -> tuple[dict[str, float], dict[str, Any]]:
        """The fusion weights fitted on these rows, and the rankings' metrics there with them (:meth:`metrics`)."""
        scored = self.scores(run, batch_size)
        weights = fit_fusion(scored["llm"], scored["encoder"], scored["target"], scored.get("excluded"))
        return weights, self.metrics(scored, weights)

    def metrics(self, scored: dict[str, np.ndarray], weights: dict[str, float]) -> dict[str, dict[str, float]]:
        """NDCG@10, HR@10 and MRR (over the catalogue, or the rows' candidates) of the fused ranking, the LLM alone
        and the encoder alone on these rows."""
        by = {
            "fused": weights["llm"] * scored["llm"] + weights["encoder"] * scored["encoder"],
            "llm": scored["llm"],
            "encoder": scored["encoder"],
        }
        out = {}
        for name, s in by.items():
            s = np.where(scored["excluded"], -np.inf, s) if "excluded" in scored else s
            ranks = metrics.rank_of_target(s, scored["target"])
            out[name] = {
                "ndcg@10": metrics.ndcg(ranks, 10),
                "hr@10": metrics.hit_ratio(ranks, 10),
                "mrr": metrics.mrr(ranks),
            }
        return out
