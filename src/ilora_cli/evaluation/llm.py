"""What a trained run says about candidates: their scores by the run's head (llm/heads.py), or greedy generations."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UserError


def _prefix(run, histories, candidates, answers: bool = False):
    """The left-padded prompts on the model's device; with ``answers``, with the layout of the candidates' titles
    packed behind them (laid out on the host, llm/packing.py)."""
    from ..llm.scoring import with_answers

    info = run.info["dataset"]
    prefix = run.builder.batch(
        histories, candidates, None, None, info["pad_id"], info["max_history"], padding_side="left"
    )
    return (with_answers(run.builder, prefix) if answers else prefix).to(run.model.device)


def _forced(run, gates: np.ndarray | None, start: int, size: int):
    """The block in which a batch of rows ``start:start + size`` is routed by ``gates`` (N, K) instead of its own
    gate (evaluation's counterfactual); with None, by its own."""
    if gates is None:
        return contextlib.nullcontext()
    forced = torch.as_tensor(gates[start : start + size], dtype=torch.float32, device=run.model.device)
    return run.model.forcing_gates(forced)


@torch.no_grad()
def item_queries(run, histories: Sequence[Sequence[int]], batch_size: int = 8, on_batch=None, gates_in=None):
    """Item head: (N, d) query vectors ``W h`` of each history's prompt and (N, K) gates, as tensors on the CPU;
    ``gates_in`` (N, K): each row routed by these weights instead of its own gate's."""
    queries, gates = [], []
    for start in range(0, len(histories), batch_size):
        hist = histories[start : start + batch_size]
        with _forced(run, gates_in, start, len(hist)):
            q, g = run.scorer.queries(run.model, _prefix(run, hist, [[] for _ in hist]))
        queries.append(q.float().cpu())
        gates.append(g.float().cpu())
        if on_batch:
            on_batch(len(hist))
    return torch.cat(queries), torch.cat(gates)


@torch.no_grad()
def score_rows(
    run,
    histories: Sequence[Sequence[int]],
    candidate_sets: np.ndarray,
    batch_size: int = 8,
    normalize: str = "sum",
    on_batch=None,
    catalogue: bool = False,
    gates_in: np.ndarray | None = None,
) -> dict[str, np.ndarray | None]:
    """The run's LLM scores of every row's candidate sets, (N, D, C) for ``candidate_sets`` (N, D, C), its gates
    (N, K), and with ``catalogue`` (item head only) the (N, n_items) scores of the whole catalogue.

    The title head scores each draw in a forward of its own (the candidates are in the prompt); the item head
    encodes each history once and scores every draw and the catalogue from the same query vector.
    ``on_batch`` is called with the rows done: N · D rows for the title head, N for the item head. ``gates_in``
    (N, K): every row routed by these weights instead of its own gate's (the counterfactual).
    """
    n, draws, _ = candidate_sets.shape
    if run.scorer.ranks_catalogue:
        q, gates = item_queries(run, histories, batch_size, on_batch, gates_in)  # (N, d), (N, K)
        items = run.model.encoder.item_embedding.weight.detach().float().cpu()  # (n_items + 1, d)
        cands = torch.as_tensor(candidate_sets, dtype=torch.long, device="cpu")  # (N, D, C), beside q and items
        scores = torch.einsum("nd,nkcd->nkc", q, items[cands])  # (N, D, C)
        full = q @ items[: run.model.encoder.n_items].T if catalogue else None  # (N, n_items)
        return {
            "draws": scores.numpy(),
            "gates": gates.numpy(),
            "catalogue": None if full is None else full.numpy(),
        }
    if catalogue:
        raise ValueError(f"the {run.scorer.kind} head cannot score the whole catalogue")
    per_draw, gates = [], None
    for d in range(draws):
        s, g = score_candidates(run, histories, candidate_sets[:, d], batch_size, normalize, on_batch, gates_in)
        per_draw.append(s)
        gates = g if gates is None else gates
    return {"draws": np.stack(per_draw, axis=1), "gates": gates, "catalogue": None}


@torch.no_grad()
def score_candidates(
    run,
    histories: Sequence[Sequence[int]],
    candidates: np.ndarray,
    batch_size: int = 8,
    normalize: str = "sum",
    on_batch=None,
    gates_in: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) scores of each row's candidates by the run's head (the title head: log-likelihood of each title
    after the prompt, normalised), and (N, K) gates (``gates_in``: used instead of each row's own)."""
    scores, gates = [], []
    for start in range(0, len(histories), batch_size):
        hist = histories[start : start + batch_size]
        cands = candidates[start : start + batch_size]
        prefix = _prefix(run, hist, cands.tolist(), answers=run.scorer.lists_candidates)
        with _forced(run, gates_in, start, len(hist)):
            s, g = run.scorer.candidate_scores(run.model, run.builder, prefix, normalize)
        scores.append(s.float().cpu().numpy())
        gates.append(g.float().cpu().numpy())
        if on_batch:
            on_batch(len(hist))
    return np.concatenate(scores), np.concatenate(gates)


@torch.no_grad()
def generate_answers(
    run,
    histories: Sequence[Sequence[int]],
    candidates: np.ndarray,
    batch_size: int = 8,
    num_beams: int = 1,
    on_batch=None,
) -> tuple[list[str], np.ndarray]:
    """Greedy (or beam) generations after each prompt, stopped at the end-of-answer token, and the gates."""
    if run.scorer.kind != "title":
        raise UserError(
            f"Generate mode writes titles, but this run has the {run.scorer.kind} head, which scores items; "
            "evaluate it in score mode."
        )
    model, builder = run.model, run.builder
    longest = max(len(builder.answer_ids(int(i))) for i in np.unique(candidates))
    texts, gates = [], []
    for start in range(0, len(histories), batch_size):
        hist = histories[start : start + batch_size]
        prefix = _prefix(run, hist, candidates[start : start + batch_size].tolist())
        embeds = model.embed(prefix)
        g = model.gates(prefix, embeds)
        with model.gated(g):  # gates repeat per beam inside the hooks
            out = model.llm.generate(
                inputs_embeds=embeds,
                attention_mask=prefix.attention_mask,
                max_new_tokens=longest + 2,
                do_sample=False,
                num_beams=num_beams,
                eos_token_id=builder.eos_id,
                pad_token_id=builder.pad_id,
            )
        texts += run.tokenizer.batch_decode(out, skip_special_tokens=True)
        gates.append(g.float().cpu().numpy())
        if on_batch:
            on_batch(len(hist))
    return texts, np.concatenate(gates)


def match_answer(text: str, candidate_titles: Sequence[str]) -> int | None:
    """METHOD.md §7: lower-case; valid iff exactly one candidate title occurs in the output. Its index, or None."""
    low = text.lower()
    found = [i for i, t in enumerate(candidate_titles) if t.lower() in low]
    return found[0] if len(found) == 1 else None
