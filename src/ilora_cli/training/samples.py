"""Training samples: history, candidates and template of each row, reproducible from (seed, epoch, row).

Nothing here keeps state between calls, so a resumed run rebuilds exactly the batches it would have seen.
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

    def __init__(self, split: SplitData, n_items: int, n_candidates: int, seed: int, max_samples: int | None = None):
        if n_items - 1 - split.seq.shape[1] < n_candidates - 1:
            raise UserError(f"The catalogue ({n_items} items) is too small for {n_candidates} candidates.")
        self.split, self.n_items, self.n_candidates, self.seed = split, n_items, n_candidates, seed
        rows = np.arange(len(split))
        if max_samples is not None and max_samples < len(rows):
            rows = np.sort(np.random.default_rng([seed, 0xC0FFEE]).permutation(rows)[:max_samples])
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, epoch: int) -> np.ndarray:
        """The rows in the order epoch ``epoch`` visits them."""
        return np.random.default_rng([self.seed, epoch, 0xBA7C4]).permutation(self.rows)

    def sample(self, row: int, epoch: int, n_templates: int = len(TEMPLATES)) -> Sample:
        s = self.split
        history = s.seq[row, : s.len_seq[row]].tolist()
        target = int(s.next[row])
        rng = np.random.default_rng([self.seed, epoch, int(s.sample_id[row])])
        cands = candidate_set(rng, set(history) | {target}, target, self.n_items, self.n_candidates)
        return Sample(
            row=int(row),
            history=history,
            candidates=cands.tolist(),
            target=target,
            target_index=int(np.flatnonzero(cands == target)[0]),
            template=int(rng.integers(n_templates)),
        )
