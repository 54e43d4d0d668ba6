"""What a trained run says about candidates: scores of the candidates after a shared prompt, or greedy generations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..llm.scoring import candidate_logprobs


def _prefix(run, histories, candidates):
    info = run.info["dataset"]
    return run.builder.batch(
        histories, candidates, None, None, info["pad_id"], info["max_history"], padding_side="left"
    ).to(run.model.device)


@torch.no_grad()
def score_candidates(
    run,
    histories: Sequence[Sequence[int]],
    candidates: np.ndarray,
    batch_size: int = 8,
    normalize: str = "sum",
    on_batch=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) log-likelihood scores of each candidate title after each prompt, and (N, K) gates."""
    scores, gates = [], []
    for start in range(0, len(histories), batch_size):
        hist = histories[start : start + batch_size]
        cands = candidates[start : start + batch_size]
        prefix = _prefix(run, hist, cands.tolist())
        s, g = candidate_logprobs(
            run.model, run.builder, prefix, torch.as_tensor(cands, device=run.model.device), normalize
        )
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
