"""Training samples: history, candidates and template of each row, reproducible from (seed, epoch, row).

Nothing here keeps state between calls, so a resumed run rebuilds exactly the batches it would have seen.

Negatives are uniform over the catalogue (outside the history and the target), as in evaluation, or — with
hard negatives — partly drawn from the frozen encoder's top items for the row: candidates the encoder
finds plausible, so that each prompt asks the language model a harder question than 19 random items.
Evaluation always keeps its frozen uniform draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.candidates import candidate_set
from ..data.prepared import SplitData
from ..errors import UserError
from ..llm.prompt import TEMPLATES


@dataclass
class Sample:
    row: int  # index into the split
    history: list[int]
    candidates: list[int]  # the target among shuffled negatives
    target: int
    target_index: int  # position of the target in candidates
    template: int


class TrainSamples:
    """The rows one run trains on, their per-epoch order, and the sample built from each row."""

    def __init__(
        self,
        split: SplitData,
        n_items: int,
        n_candidates: int,
        seed: int,
        max_samples: int | None = None,
        n_templates: int = len(TEMPLATES),
        rows: np.ndarray | None = None,
    ):
        """``rows``: the split's rows this run may train on (the second stage's rows of the holdout; default all);
        ``max_samples`` then keeps a seeded subset of them."""
        if n_items - 1 - split.seq.shape[1] < n_candidates - 1:
            raise UserError(f"The catalogue ({n_items} items) is too small for {n_candidates} candidates.")
        self.split, self.n_items, self.n_candidates, self.seed = split, n_items, n_candidates, seed
        self.n_templates = n_templates
        rows = np.arange(len(split)) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        if max_samples is not None and max_samples < len(rows):
            rows = np.sort(np.random.default_rng([seed, 0xC0FFEE]).permutation(rows)[:max_samples])
        self.rows = rows
        self.hard_pool: np.ndarray | None = None  # (len(rows), P) the encoder's top items of each row
        self.n_hard = 0  # negatives per sample drawn from the pool
        self.popularity: np.ndarray | None = None  # (n_items,) cumulative sampling probabilities (popularity)
        self.log_q: np.ndarray | None = None  # (n_items,) log-probability of drawing each item as a negative

    def use_popularity(self, targets: np.ndarray) -> None:
        """Draw negatives in proportion to how often each item is a target of ``targets`` (the train split's, plus
        one each), with replacement, so that an item's expected count is proportional to its probability q and the
        softmax's logQ correction ``s − log q`` is exact (Bengio & Senécal, 2008; Yi et al., 2019)."""
        counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=self.n_items)[: self.n_items] + 1.0
        q = counts / counts.sum()
        self.popularity, self.log_q = np.cumsum(q), np.log(q)

    def use_hard_negatives(self, encoder, fraction: float, pool: int) -> None:
        """Draw ``round(fraction · (C − 1))`` negatives of every sample from the encoder's top ``pool`` items
        of its row (history excluded), the rest uniformly."""
        self.n_hard = int(round(fraction * (self.n_candidates - 1)))
        if self.n_hard == 0:
            return
        if pool < self.n_hard + 1:
            raise UserError(f"hard_pool ({pool}) must exceed the hard negatives per sample ({self.n_hard}).")
        s = self.split
        self.hard_pool = encoder.top_items(
            s.seq[self.rows], s.len_seq[self.rows], min(pool, self.n_items - s.seq.shape[1])
        )

    def _popular_set(self, rng: np.random.Generator, excluded: set[int], target: int) -> np.ndarray:
        """The target and ``n_candidates - 1`` negatives drawn by popularity with replacement, outside ``excluded``."""
        need, negatives = self.n_candidates - 1, []
        while len(negatives) < need:
            draw = np.searchsorted(self.popularity, rng.random(2 * (need - len(negatives)) + 8) * self.popularity[-1])
            negatives.extend(x for x in np.minimum(draw, self.n_items - 1).tolist() if x not in excluded)
        return rng.permutation(np.array(negatives[:need] + [target], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, epoch: int) -> np.ndarray:
        """The rows in the order epoch ``epoch`` visits them."""
        return np.random.default_rng([self.seed, epoch, 0xBA7C4]).permutation(self.rows)

    def sample(self, row: int, epoch: int) -> Sample:
        s = self.split
        history = s.seq[row, : s.len_seq[row]].tolist()
        target = int(s.next[row])
        rng = np.random.default_rng([self.seed, epoch, int(s.sample_id[row])])
        excluded = set(history) | {target}
        if self.popularity is not None:
            cands = self._popular_set(rng, excluded, target)
        elif self.hard_pool is None:
            cands = candidate_set(rng, excluded, target, self.n_items, self.n_candidates)
        else:
            pool = self.hard_pool[np.searchsorted(self.rows, row)]
            pool = pool[pool != target]  # the history is already out of the pool
            hard = rng.choice(pool, size=self.n_hard, replace=False)
            rest = candidate_set(
                rng, excluded | set(hard.tolist()), target, self.n_items, self.n_candidates - self.n_hard
            )
            cands = rng.permutation(np.concatenate([rest, hard]))
        return Sample(
            row=int(row),
            history=history,
            candidates=cands.tolist(),
            target=target,
            target_index=int(np.flatnonzero(cands == target)[0]),
            template=int(rng.integers(self.n_templates)),
        )
