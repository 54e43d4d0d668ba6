"""What the gate does while it trains, logged with every step (``logs/train.jsonl``).

For the (B, K) expert weights g of a batch:

- ``gate_entropy``: mean over the batch of H(g_b) = −Σ_k g_bk log g_bk, in nats (log K for the uniform gate,
  0 for a gate that puts everything on one expert);
- ``gate_load``: the K mean weights over the batch (which experts are used at all);
- ``gate_spread``: the std across the batch of K·g_bk, averaged over the experts (0 when every user gets the same
  mixture, whatever it is; 1 is a spread as large as the uniform weight itself);
- ``gate_drift``: ‖W − W(0)‖ / ‖W(0)‖ over the gate's parameters (the router's too for the token gate), how far
  training has moved them from their initialisation.
"""

from __future__ import annotations

import math

import torch


def batch_stats(gates: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropy, spread and the per-expert load of one batch's (B, K) gates, as 0-d tensors (``gate_load{k}``
    for expert k) that stay on the device until the step's one read."""
    g = gates.detach().float().reshape(-1, gates.shape[-1])  # (B, K)
    k = g.shape[-1]
    entropy = -(g * g.clamp_min(1e-12).log()).sum(-1).mean()
    spread = (k * g).std(0, unbiased=False).mean()
    load = g.mean(0)  # (K,)
    return {"gate_entropy": entropy, "gate_spread": spread, **{f"gate_load{i}": load[i] for i in range(k)}}


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """A detached copy of the gate's parameters, taken before the first step (W(0) of the drift)."""
    return [p.detach().clone() for p in params]


def drift(params: list[torch.nn.Parameter], initial: list[torch.Tensor]) -> float | None:
    """‖W − W(0)‖ / ‖W(0)‖ over all the gate's parameters; None for a gate without parameters (uniform)."""
    if not params:
        return None
    with torch.no_grad():
        moved = sum(
            float(((p.detach().float() - p0.to(p.device).float()) ** 2).sum()) for p, p0 in zip(params, initial)
        )
        size = sum(float((p0.float() ** 2).sum()) for p0 in initial)
    return math.sqrt(moved) / math.sqrt(size) if size > 0 else None


def log_fields(terms: dict[str, float], params: list[torch.nn.Parameter], initial: list[torch.Tensor] | None):
    """The step's gate fields of the training log, taken out of ``terms``: entropy, spread, the load as one list
    and the drift; empty without a mixture (K = 1)."""
    loads = sorted((k for k in terms if k.startswith("gate_load")), key=lambda k: int(k[len("gate_load") :]))
    if not loads:
        return {}
    out = {
        "gate_entropy": terms.pop("gate_entropy"),
        "gate_spread": terms.pop("gate_spread"),
        "gate_load": [terms.pop(k) for k in loads],
    }
    if initial is not None:
        out["gate_drift"] = drift(params, initial)
    return out
