"""Instance-wise LoRA: K experts that split one rank-r LoRA into K rank-(r/K) blocks (METHOD.md §5).

peft builds an ordinary rank-r LoRA on every target layer (``lora_A``: d_in → r, ``lora_B``: r → d_out,
scaling α/r). The mixture is applied in the *fused* form, between A and B:

    z = A · dropout(x)                         (B, T, r)
    z ⊙= K · repeat_interleave(g, r/K)         one gate vector per sequence, shared by all tokens
    h = W x + (α/r) · B z

which equals ``W x + s · Σ_k g_k B_k A_k dropout(x)`` with ``s = α/(r/K)``: the expert scaling of METHOD.md.
With a uniform gate (g_k = 1/K) it is exactly plain LoRA of rank r; with K = 1 it is plain LoRA.

The gate reaches the layers through forward hooks on every ``lora_A`` module — no patched library code,
no module-level state. An :class:`ILoraModel` installs them once (:func:`install_gate_hooks`) and they read
the gates from a :class:`GateHolder` that its ``forward`` fills: the gates stay in force after ``forward``
returns, so that gradient checkpointing, which runs each layer again during ``backward``, recomputes
exactly what the forward computed. :func:`expert_gating` is the same hook as a context manager for a bare
peft model. peft's own layers (plain and 4-bit) stay unchanged, so adapters save and load in the PEFT format.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

GateType = Literal["user", "mlp", "prompt", "token", "uniform"]
GATE_TYPES: tuple[str, ...] = ("user", "mlp", "prompt", "token", "uniform")


def expand_gate(gate: torch.Tensor, rank: int, batch: int) -> torch.Tensor:
    """(G, K) or (G, T, K) gate → K · repeat_interleave(g, r/K), repeated to ``batch`` rows.

    ``batch`` may be a multiple of G: generation with beams and candidate scoring repeat every
    sequence ``batch // G`` times (``repeat_interleave`` order, as ``generate`` does).
    """
    n_experts = gate.shape[-1]
    if batch != gate.shape[0]:
        if batch % gate.shape[0]:
            raise RuntimeError(f"a batch of {batch} rows cannot carry gates for {gate.shape[0]} sequences")
        gate = gate.repeat_interleave(batch // gate.shape[0], dim=0)
    scaled = gate.repeat_interleave(rank // n_experts, dim=-1) * n_experts  # (B, r) or (B, T, r)
    return scaled if scaled.dim() == 3 else scaled.unsqueeze(1)  # (B, 1, r) broadcasts over T


def lora_a_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every peft ``lora_A`` linear of the default adapter, by the name of its LoRA layer."""
    out = {}
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            out[name[: -len(".lora_A.default")]] = module
    return out


class TokenRouters(nn.Module):
    """Per-layer, per-token routers for the ``token`` gate: softmax(W_l x_t) for each adapted layer l."""

    def __init__(self, layer_inputs: dict[str, int], n_experts: int):
        super().__init__()
        # Module names contain dots, which ModuleDict keys may not: replace them.
        self.routers = nn.ModuleDict({k.replace(".", "__"): nn.Linear(d, n_experts) for k, d in layer_inputs.items()})
        for r in self.routers.values():
            nn.init.normal_(r.weight, std=0.02)
            nn.init.zeros_(r.bias)

    def route(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        router = self.routers[layer.replace(".", "__")]
        return torch.softmax(router(x.to(router.weight.dtype)).float(), dim=-1)  # (B, T, K)


class GateHolder:
    """The gates of the sequences in flight, (B, K): set by the model's ``forward`` (or ``gated``) and read
    by the layer hooks, during the forward pass and again when gradient checkpointing recomputes it.
    ``None`` before the first forward: the layers then mix the experts uniformly (plain LoRA of rank r)."""

    def __init__(self) -> None:
        self.gate: torch.Tensor | None = None


def _gate_hook(rank: int, holder: GateHolder):
    def hook(module, inputs, z):
        if holder.gate is None:
            return None  # uniform mixture: z unchanged
        g = expand_gate(holder.gate, rank, z.shape[0]).to(z.dtype)  # (B, 1, r)
        return z * g  # (B, T, r)

    return hook


def _router_hook(rank: int, layer: str, token_routers: TokenRouters):
    def hook(module, inputs, z):
        g = token_routers.route(layer, inputs[0])  # (B, T, K)
        return z * expand_gate(g, rank, z.shape[0]).to(z.dtype)  # (B, T, r)

    return hook


def install_gate_hooks(
    model: nn.Module,
    rank: int,
    holder: GateHolder | None = None,
    token_routers: TokenRouters | None = None,
) -> list:
    """Hook every LoRA layer of ``model`` for good: per-sequence gates read from ``holder``, or per-token
    ``token_routers``. Returns the hook handles (``handle.remove()`` takes one off)."""
    if (holder is None) == (token_routers is None):
        raise ValueError("pass exactly one of holder and token_routers")
    handles = []
    for layer, lora_a in lora_a_modules(model).items():
        hook = _gate_hook(rank, holder) if holder is not None else _router_hook(rank, layer, token_routers)
        handles.append(lora_a.register_forward_hook(hook))
    return handles


@contextmanager
def expert_gating(
    model: nn.Module,
    rank: int,
    gate: torch.Tensor | None = None,
    token_routers: TokenRouters | None = None,
) -> Iterator[None]:
    """Apply per-sequence gates (B, K) — or per-token routers — to every LoRA layer of a bare peft model
    inside the block (the hooks are removed on exit, so do not use it with gradient checkpointing)."""
    if (gate is None) == (token_routers is None):
        raise ValueError("pass exactly one of gate and token_routers")
    holder = None
    if gate is not None:
        holder = GateHolder()
        holder.gate = gate
    handles = install_gate_hooks(model, rank, holder, token_routers)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Gate(nn.Module):
    """Sequence-level gates g ∈ Δ^K from the user representation (or the mean prompt embedding).

    ``user``: softmax(W_g u) — the Dense gate of the paper. ``mlp``: softmax(MLP(u)). ``prompt``:
    softmax(W_g mean(prompt embeddings)). ``uniform``: 1/K everywhere (plain LoRA). ``token`` gates
    are per layer and per token (:class:`TokenRouters`); this module then only reports uniform weights.
    Nothing here depends on the other samples of the batch.
    """

    def __init__(self, kind: str, n_experts: int, user_dim: int, prompt_dim: int, hidden: int = 128):
        super().__init__()
        self.kind, self.n_experts = kind, n_experts
        if kind == "user":
            self.net = nn.Linear(user_dim, n_experts)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(user_dim, hidden), nn.GELU(), nn.Linear(hidden, n_experts))
        elif kind == "prompt":
            self.net = nn.Linear(prompt_dim, n_experts)
        elif kind in ("uniform", "token"):
            self.net = None
        else:
            raise ValueError(f"unknown gate type {kind!r}")

    def forward(self, user: torch.Tensor, prompt_mean: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) gate weights; ``user`` is (B, user_dim), ``prompt_mean`` (B, prompt_dim)."""
        batch = user.shape[0]
        if self.net is None:
            return torch.full((batch, self.n_experts), 1.0 / self.n_experts, device=user.device)
        source = prompt_mean if self.kind == "prompt" else user
        logits = self.net(source.to(next(self.net.parameters()).dtype))  # (B, K)
        return torch.softmax(logits.float(), dim=-1)
