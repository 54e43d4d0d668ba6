"""A training step's batches: the prompts of a list of samples (:func:`build_batch`), built ahead on a background
thread while the previous step runs (:class:`Prefetcher`)."""

from __future__ import annotations

import torch


def build_batch(builder, samples, objective: str, pad_id: int, max_history: int):
    """The PromptBatch (and targets) of a list of samples for one objective, on the host; for title scoring with
    the layout of the candidates' answers (llm/packing.py)."""
    from ..llm.scoring import with_answers

    hist = [s.history for s in samples]
    cands = [s.candidates for s in samples]
    templates = [s.template for s in samples]
    if objective == "generate":
        return builder.batch(hist, cands, [s.target for s in samples], templates, pad_id, max_history), None
    prefix = builder.batch(hist, cands, None, templates, pad_id, max_history, padding_side="left")
    if builder.list_candidates:  # the title head scores the titles of the candidates it lists
        prefix = with_answers(builder, prefix)
    return prefix, torch.tensor([s.target_index for s in samples])


class Prefetcher:
    """Builds the batches of the next optimisation step on a background thread while the current step runs.

    A step's batches depend on the seed, the epoch and the rows only (training/samples.py), never on the model,
    so building them ahead changes nothing that is computed; on a GPU the host's tokenizing and padding then
    overlap the device's work instead of idling it between steps.
    """

    def __init__(self, build):
        from concurrent.futures import ThreadPoolExecutor

        self._build = build  # step -> that step's batches
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ilora-batches")
        self._next = None  # (step, future) being built

    def get(self, step: int, ahead: bool = True):
        """The batches of ``step`` (built ahead when it is the step that was expected), and with ``ahead`` the
        next step's started."""
        pending, self._next = self._next, None
        batches = pending[1].result() if pending is not None and pending[0] == step else self._build(step)
        if ahead:
            self._next = (step + 1, self._pool.submit(self._build, step + 1))
        return batches

    def close(self) -> None:
        """Wait for a batch in the making and stop the thread."""
        self._next = None
        self._pool.shutdown(wait=True)
