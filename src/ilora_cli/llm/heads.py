"""Scoring heads: how a run turns the language model into one score per candidate item.

Two heads, behind one small interface that training, evaluation, ``recommend`` and the analyses call:

- ``title`` (the paper's formulation): every candidate is listed in the prompt, and its score is the
  log-likelihood of its title (plus the end token) after the prompt, averaged over the title's tokens by
  default (``normalize``). The titles are packed behind the prompt in one forward (:mod:`.scoring`). It
  needs the full vocabulary's logits at every title token, and it can only rank the items it was shown.
- ``item`` (in the spirit of E4SRec- and SLMRec-style heads): the prompt holds the history alone; the
  language model's final hidden state h at the prompt's last token is mapped by a trained linear map W into
  the frozen encoder's item space, and item c scores ``(W · h) · e_c`` with e_c the encoder's embedding of
  c. One forward per prompt, no vocabulary projection, and one query vector ranks any candidate set or the
  whole catalogue — so evaluation reports full-catalogue metrics and ``recommend`` needs no retrieval stage.

Every head returns scores of shape (B, C) from the model's ``forward``, so that a DDP wrapper sees the
training computation, and the gates (B, K) that produced them.
"""

from __future__ import annotations

import torch
from torch import nn

HEADS = ("title", "item")
HEAD_INITS = ("random", "zeros", "fit")
# How the item head forms its query: ``direct`` q = W h; ``residual`` q = u + W h with u the encoder's user
# representation, so that with W = 0 the language model's ranking starts as the encoder's, on any item set.
QUERIES = ("direct", "residual")


class ItemHead(nn.Module):
    """W: the language model's hidden size H → the encoder's item space d (no bias: a bias would add the same
    query direction for every user, which the popularity of items already carries)."""

    def __init__(self, hidden: int, item_dim: int, init: str = "random"):
        super().__init__()
        self.proj = nn.Linear(hidden, item_dim, bias=False)
        if init == "zeros":
            nn.init.zeros_(self.proj.weight)
        else:  # random; "fit" starts from random and is then fitted by least squares (:func:`fit_item_head`)
            nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, H) final hidden states → (B, d) query vectors."""
        return self.proj(hidden.to(self.proj.weight.dtype))


class TitleScorer:
    """The ``title`` head: candidates listed in the prompt, scored by their titles' log-likelihood."""

    kind = "title"
    lists_candidates = True  # the prompt names every candidate
    ranks_catalogue = False  # it can score only the candidates of its prompt

    def candidate_scores(self, model, builder, prefix, normalize: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) scores of ``prefix.candidates`` and (B, K) gates; ``model`` may be DDP-wrapped."""
        from .scoring import candidate_logprobs

        return candidate_logprobs(model, builder, prefix, prefix.candidates, normalize)


class ItemScorer:
    """The ``item`` head: a history-only prompt, one query vector per user, dot products with item embeddings."""

    kind = "item"
    lists_candidates = False
    ranks_catalogue = True

    def candidate_scores(self, model, builder, prefix, normalize: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) scores ``(W h) · e_c`` of ``prefix.candidates`` and (B, K) gates (``normalize`` has no say)."""
        return model(prefix, items=prefix.candidates)

    @staticmethod
    def queries(model, prefix) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) query vectors W · h and (B, K) gates: one forward, then any item set is a matrix product."""
        return model(prefix, query=True)


def scorer(kind: str) -> TitleScorer | ItemScorer:
    """The scorer of a head kind (``title`` or ``item``)."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    return TitleScorer() if kind == "title" else ItemScorer()


@torch.no_grad()
def fit_item_head(model, prefixes, ridge: float = 1.0) -> dict[str, float]:
    """Set W to the ridge least-squares map from the final hidden states of ``prefixes`` (PromptBatches) to the
    encoder's user representations of the same rows: the head then starts near the encoder's own ranking
    instead of at random, and training moves it from there. Returns the fit's relative residual.

        W = U^T H (H^T H + λ I)^{-1},  H (n, H) hidden states, U (n, d) user representations
    """
    was_training = model.training
    model.eval()
    try:
        hidden, users = [], []
        for prefix in prefixes:
            hidden.append(model.hidden_states(prefix).double())  # (b, H)
            users.append(model.user_representation(prefix).double())  # (b, d)
    finally:
        model.train(was_training)
    h, u = torch.cat(hidden), torch.cat(users)  # (n, H), (n, d)
    gram = h.T @ h + ridge * torch.eye(h.shape[1], dtype=h.dtype, device=h.device)  # (H, H)
    w = torch.linalg.solve(gram, h.T @ u).T  # (d, H)
    residual = float((h @ w.T - u).norm() / u.norm().clamp(min=1e-12))
    model.item_head.proj.weight.copy_(w.to(model.item_head.proj.weight.dtype))
    return {"rows": int(h.shape[0]), "relative_residual": residual}
