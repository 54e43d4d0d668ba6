"""The loss of one training batch: the answer tokens' cross-entropy (``generate``), or the listwise ``rank``
objective over the scores of the run's head (objectives.py holds its terms).

The rank objective's softmax (``loss_over``) covers the training prompt's candidates (the target and its sampled
negatives), or, for the item head, the whole catalogue with the row's history excluded — the ranking that
``recommend`` returns and evaluation measures — or both terms added.
"""

from __future__ import annotations

import torch

from ..encoders.base import real_mask


def history_mask(history: torch.Tensor, history_len: torch.Tensor, target: torch.Tensor, n_items: int) -> torch.Tensor:
    """(B, n_items) True at each row's history items, never at its target: the items the catalogue softmax leaves
    out, as evaluation and ``recommend`` do (a user is not recommended what they have just had)."""
    rows = history.shape[0]
    ids = history.masked_fill(~real_mask(history, history_len), n_items)  # (B, L): padding -> a spare column
    seen = torch.zeros((rows, n_items + 1), dtype=torch.bool, device=history.device)  # (B, N + 1)
    seen.scatter_(1, ids, True)
    seen = seen[:, :n_items]  # (B, N)
    seen[torch.arange(rows, device=history.device), target] = False  # a repeated item stays rankable
    return seen


def batch_loss(
    model, unwrapped, scorer, builder, batch, target_index, config, log_q: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The training objective of one batch (on ``model``, which may be DDP-wrapped; ``unwrapped`` is the
    :class:`~ilora_cli.llm.model.ILoraModel` itself), its terms (0-d tensors, read from the device once per step by
    the caller), and the gates (B, K).

    ``generate``: the answer tokens' cross-entropy. ``rank``: the listwise loss over the scores of the run's head,
    plus distillation towards the encoder and the fusion weights' own term (objectives.py). ``config`` holds the
    objective's settings (a TrainConfig); ``log_q`` (n_items,) the log-probabilities with which the candidates'
    negatives were drawn (popularity sampling), subtracted from their scores (the logQ correction).
    """
    if config.objective == "generate":
        out, gates = model(batch)
        return out.loss, {}, gates
    loss_over = getattr(config, "loss_over", "candidates") or "candidates"
    target_index = target_index.to(batch.candidates.device)
    if loss_over == "candidates":
        scores, gates = scorer.candidate_scores(model, builder, batch, config.normalize)  # (B, C)
        loss, terms, target = _candidates_loss(scores, unwrapped, batch, target_index, config, log_q)
    else:
        loss, terms, scores, target, gates = _catalogue_loss(model, unwrapped, batch, target_index, config, log_q)
    # the LLM alone on its own batch: HR@1 and MRR against the label it learns (ties counted pessimistically)
    s = scores.detach().float()
    rank = (s > s.gather(1, target[:, None])).sum(1) + (s == s.gather(1, target[:, None])).sum(1) - 1  # (B,)
    terms["hr@1"] = (rank == 0).float().mean()
    terms["mrr"] = (1.0 / (rank + 1).float()).mean()
    return loss, terms, gates


def _trained_fusion(unwrapped, config):
    """The fusion weights when this loss trains them (on every batch: ``apart_users=0``), else None (they are fitted
    after training on the rows set apart, training/fusion_fit.py, or there is no fusion)."""
    return unwrapped.fusion if not getattr(config, "apart_users", 0) else None


def _needs_encoder(unwrapped, config) -> bool:
    trained = _trained_fusion(unwrapped, config) is not None
    return config.distill_weight > 0 or trained or getattr(config, "label", "next") == "encoder"


def _candidates_loss(scores, unwrapped, batch, target_index, config, log_q):
    """The listwise loss over the prompt's candidates (B, C); returns it, its terms and the (B,) targets."""
    from .objectives import rank_loss

    encoder = unwrapped.encoder_scores(batch) if _needs_encoder(unwrapped, config) else None  # (B, C)
    target = encoder.argmax(-1) if getattr(config, "label", "next") == "encoder" else target_index  # (B,)
    offset = log_q[batch.candidates] if log_q is not None else None  # (B, C)
    loss, terms = rank_loss(
        scores,
        encoder,
        target,
        distill_weight=config.distill_weight,
        temperature=config.distill_temperature,
        fusion=_trained_fusion(unwrapped, config),
        offset=offset,
    )
    return loss, terms, target


def _catalogue_loss(model, unwrapped, batch, target_index, config, log_q):
    """Item head: the listwise loss over every item, the history excluded (plus the candidates' term with
    ``catalogue+candidates``); returns it, its terms, the (B, N) scores, the (B,) targets and the gates."""
    from .objectives import rank_loss

    queries, gates = model(batch, query=True)  # (B, d)
    every = unwrapped.catalogue_scores(queries)  # (B, N)
    target_ids = batch.candidates.gather(1, target_index[:, None]).squeeze(1)  # (B,) item ids
    excluded = history_mask(batch.history, batch.history_len, target_ids, every.shape[1])  # (B, N)
    encoder = None
    if _needs_encoder(unwrapped, config):
        with torch.no_grad():
            encoder = unwrapped.encoder.score_all(batch.history, batch.history_len).float()  # (B, N)
    label = getattr(config, "label", "next")
    target = encoder.masked_fill(excluded, float("-inf")).argmax(-1) if label == "encoder" else target_ids
    fusion = _trained_fusion(unwrapped, config)
    common = {"distill_weight": config.distill_weight, "temperature": config.distill_temperature, "fusion": fusion}
    loss, terms = rank_loss(every, encoder, target, excluded=excluded, **common)
    if config.loss_over == "catalogue+candidates":
        cands = batch.candidates  # (B, C): the same query's scores of the prompt's candidates
        enc_c = encoder.gather(1, cands) if encoder is not None else None
        offset = log_q[cands] if log_q is not None else None
        target_c = enc_c.argmax(-1) if label == "encoder" else target_index
        loss_c, terms_c = rank_loss(every.gather(1, cands), enc_c, target_c, offset=offset, **common)
        loss = loss + loss_c
        terms.update({f"{k}_candidates": v for k, v in terms_c.items()})
    return loss, terms, every.masked_fill(excluded, float("-inf")), target, gates
