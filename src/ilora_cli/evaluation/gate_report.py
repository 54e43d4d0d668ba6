"""Whether the gate matters: a K > 1 run scored with each user's own gate, another user's and the uniform one.

Group statistics alone cannot say it: the gate is a function of the encoder's user vector, so even an untrained
gate differs between clusters of that vector. The counterfactual can: the same rows, draws and weights, routed by

- ``own``: each user's gate (what the run does);
- ``shuffled``: another user's mixture (a seeded cyclic derangement of the rows, so no row keeps its own);
- ``uniform``: 1/K for every expert (plain LoRA of the total rank).

``p_own_vs_shuffled`` is the paired permutation test over users of own against shuffled, on catalogue NDCG@10 for
a head that ranks the catalogue, else on MRR over the draws. ``group_information_bits`` is the mutual information
I(G; E) between the user groups G (the synthetic data's latent groups, else k-means clusters of the encoder's user
vectors) and an expert E drawn from a user's gate: H(mean gate) − Σ_g p(g) H(mean gate of group g), in bits;
``group_information_bits_untrained`` the same for freshly initialised gates of the run's shape (seeds 0, 1, 2),
what the gate carries before training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import metrics

Judge = Callable[[dict[str, Any], str], tuple[dict[str, Any], str, np.ndarray]]


def entropy_bits(p: np.ndarray) -> float:
    """H(p) in bits of one distribution (zeros contribute nothing)."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def group_information(gates: np.ndarray, groups: np.ndarray) -> float:
    """I(G; E) in bits between the groups (N,) and an expert drawn from each row's gate (N, K)."""
    total = entropy_bits(gates.mean(0))
    within = sum((groups == g).mean() * entropy_bits(gates[groups == g].mean(0)) for g in np.unique(groups))
    return max(0.0, total - within)


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point (n ≥ 2): row order[i] takes row order[i + 1]'s gate."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, -1)
    return out


def user_vectors(encoder, split, batch_size: int = 1024) -> np.ndarray:
    """(N, d) the encoder's user representation of each row (what the user gate reads)."""
    device = encoder.item_embedding.weight.device
    out = []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            seq = torch.as_tensor(split.seq[start : start + batch_size], device=device)
            lens = torch.as_tensor(split.len_seq[start : start + batch_size], device=device)
            out.append(encoder(seq, lens).float().cpu().numpy())
    return np.concatenate(out)


def untrained_information(kind: str, users: np.ndarray, groups: np.ndarray, k: int) -> float | None:
    """Mean group information of three freshly initialised gates of the run's kind and shape (None for a gate that
    does not read the user vector)."""
    from ..llm.experts import Gate

    if kind not in ("user", "mlp"):
        return None
    values = []
    for seed in range(3):
        torch.manual_seed(seed)
        gate = Gate(kind, k, user_dim=users.shape[1], prompt_dim=1)
        with torch.no_grad():
            values.append(group_information(gate(torch.as_tensor(users, device="cpu")).numpy(), groups))
    return float(np.mean(values))


def gate_document(run, split, meta: dict, own_scores: dict, score: Callable, judge: Judge, seed: int) -> dict:
    """``results.RUN.gate``: entropy, load, group information (trained and untrained), and the counterfactual.

    ``own_scores`` is :func:`llm.score_rows`'s output with the run's own gates, ``score(gates_in)`` the same with
    every row routed by ``gates_in`` (N, K), and ``judge(scores, ranking)`` the metrics document of a ranking
    (``default`` or ``llm``), the metric the tests use and its per-user values. ``counterfactual`` holds the default
    ranking's documents, ``counterfactual_llm`` the language model's alone."""
    from ..plots import user_groups

    own = np.asarray(own_scores["gates"], dtype=np.float64)  # (N, K)
    n, k = own.shape
    users = user_vectors(run.model.encoder, split)
    groups, kind = user_groups(meta, split.histories(), split.next, users, seed=seed)
    docs, llm_docs, values = {}, {}, {}
    alternatives = {"shuffled": own[derangement(n, seed)], "uniform": np.full((n, k), 1.0 / k)}
    scored = {"own": own_scores} | {name: score(g.astype(np.float32)) for name, g in alternatives.items()}
    for name, scores in scored.items():
        docs[name], metric, values[name] = judge(scores, "default")
        llm_docs[name] = judge(scores, "llm")[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = float(np.mean(-(own * np.where(own > 0, np.log(own), 0.0)).sum(1)))
    return {
        "entropy": entropy,
        "entropy_uniform": float(np.log(k)),
        "load": [float(x) for x in own.mean(0)],
        "groups": kind,
        "group_information_bits": group_information(own, groups),
        "group_information_bits_untrained": untrained_information(run.info["experts"]["gate"], users, groups, k),
        "counterfactual": docs,
        "counterfactual_llm": llm_docs,
        "metric": metric,
        "p_own_vs_shuffled": metrics.paired_permutation_test(values["own"], values["shuffled"])["p_value"],
        "p_own_vs_uniform": metrics.paired_permutation_test(values["own"], values["uniform"])["p_value"],
    }
