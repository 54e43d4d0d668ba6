"""The terms of the listwise ``rank`` objective, each a small function of (B, C) candidate scores.

Every training prompt lists C candidates; the model gives each a score ``s_c`` (the normalised
log-likelihood of its title after the prompt) and the frozen encoder another, ``e_c`` (the dot product of
the user representation and the item embedding). The loss of a batch is

    listwise(s, y)  +  λ · distillation(s, e, τ)  +  listwise(a · stop_grad(s) + b · e, y)

where the last term exists only with learned fusion weights (a, b) and trains them alone: the language
model keeps learning to rank on its own, and the fusion learns how much of it to add to the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def listwise_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the candidates: mean_b ( -s_{b,y_b} + log Σ_c exp s_{b,c} ).

    ``scores`` (B, C), ``target`` (B,) the index of the true next item among the candidates; a score of ``-inf``
    leaves its candidate out of the softmax (the target's never is).
    """
    return F.cross_entropy(scores.float(), target)


def logits(scores: torch.Tensor, excluded: torch.Tensor | None = None, offset: torch.Tensor | None = None):
    """The softmax's logits of (B, C) scores: ``s − offset`` (the logQ correction of sampled negatives: the log of
    the probability each candidate was drawn with), and ``-inf`` where ``excluded`` (B, C) is True."""
    x = scores.float()
    if offset is not None:
        x = x - offset.float()
    return x.masked_fill(excluded, float("-inf")) if excluded is not None else x


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, excluded: torch.Tensor | None = None
) -> torch.Tensor:
    """τ² · mean_b KL(softmax(t_b/τ) ‖ softmax(s_b/τ)) = τ² · mean_b Σ_c p_c (log p_c − log q_c).

    The teacher's distribution over the C candidates gives every candidate a graded target instead of one
    index. The τ² factor keeps the gradient's size independent of τ (Hinton et al., 2015). ``student`` and
    ``teacher`` are (B, C); no gradient reaches the teacher. Candidates where ``excluded`` is True are in
    neither distribution.
    """
    log_p = F.log_softmax(logits(teacher.detach(), excluded) / temperature, dim=-1)  # (B, C) teacher
    log_q = F.log_softmax(logits(student, excluded) / temperature, dim=-1)  # (B, C) student
    terms = log_p.exp() * (log_p - log_q)  # (B, C)
    if excluded is not None:
        terms = terms.masked_fill(excluded, 0.0)  # 0 · (−inf − −inf) would be NaN
    return terms.sum(-1).mean() * temperature**2


def fused_scores(llm, encoder, llm_weight, encoder_weight):
    """The fused ranking score ``a · s + b · e`` of every candidate, (B, C) tensors or arrays."""
    return llm_weight * llm + encoder_weight * encoder


def rank_loss(
    llm: torch.Tensor,
    encoder: torch.Tensor | None,
    target: torch.Tensor,
    distill_weight: float = 0.0,
    temperature: float = 1.0,
    fusion=None,
    excluded: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole ``rank`` objective (module doc) and its terms as detached 0-d tensors, for the training log (read
    from the device once per step, with the loss). ``excluded`` (B, C) leaves candidates out of every softmax (a
    row's history, over the catalogue); ``offset`` (B, C) is subtracted from every listwise term's scores (the logQ
    correction, :func:`logits`)."""
    loss = listwise_loss(logits(llm, excluded, offset), target)
    terms = {"listwise": loss.detach()}
    if distill_weight > 0:
        kd = distillation_loss(llm, encoder, temperature, excluded)
        loss = loss + distill_weight * kd
        terms["distill"] = kd.detach()
    if fusion is not None:  # a Fusion module: (s, e) -> a · s + b · e
        fused = listwise_loss(logits(fusion(llm.detach(), encoder), excluded, offset), target)
        loss = loss + fused
        terms["fused"] = fused.detach()
    return loss, terms
