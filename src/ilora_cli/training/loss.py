"""The loss of one training batch: the answer tokens' cross-entropy (``generate``), or the listwise ``rank``
objective over the scores of the run's head (objectives.py holds its terms)."""

from __future__ import annotations

import torch


def batch_loss(
    model, unwrapped, scorer, builder, batch, target_index, config
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The training objective of one batch (on ``model``, which may be DDP-wrapped; ``unwrapped`` is the
    :class:`~ilora_cli.llm.model.ILoraModel` itself), its terms (0-d tensors, read from the device once per step by
    the caller), and the gates (B, K).

    ``generate``: the answer tokens' cross-entropy. ``rank``: the listwise loss over the candidates' scores by
    the run's head, plus distillation towards the encoder and the fusion weights' own term (objectives.py).
    ``config`` holds the objective's settings (a TrainConfig).
    """
    from .objectives import rank_loss

    if config.objective == "generate":
        out, gates = model(batch)
        return out.loss, {}, gates
    label = getattr(config, "label", "next")
    needs_encoder = config.distill_weight > 0 or unwrapped.fusion is not None or label == "encoder"
    if getattr(config, "loss_over", "candidates") == "catalogue":  # item head: the whole catalogue is the softmax
        queries, gates = model(batch, query=True)  # (B, d)
        scores = unwrapped.catalogue_scores(queries)  # (B, N)
        target_ids = batch.candidates.gather(1, target_index.to(batch.candidates.device)[:, None]).squeeze(1)
        with torch.no_grad():
            encoder = unwrapped.encoder.score_all(batch.history, batch.history_len).float() if needs_encoder else None
    else:
        scores, gates = scorer.candidate_scores(model, builder, batch, config.normalize)  # (B, C)
        target_ids = target_index.to(scores.device)  # (B,) positions among the candidates
        encoder = unwrapped.encoder_scores(batch) if needs_encoder else None  # (B, C)
    target = encoder.argmax(-1) if label == "encoder" else target_ids  # (B,)
    loss, terms = rank_loss(
        scores,
        encoder,
        target,
        distill_weight=config.distill_weight,
        temperature=config.distill_temperature,
        fusion=unwrapped.fusion,
    )
    # the LLM alone on its own batch: HR@1 and MRR against the label it learns (ties counted pessimistically)
    s = scores.detach().float()
    rank = (s > s.gather(1, target[:, None])).sum(1) + (s == s.gather(1, target[:, None])).sum(1) - 1  # (B,)
    terms["hr@1"] = (rank == 0).float().mean()
    terms["mrr"] = (1.0 / (rank + 1).float()).mean()
    return loss, terms, gates
