"""Log-probabilities of chosen tokens under a frozen output layer, without the (N, V) logits in memory.

Title scoring needs ``log p(t | h) = (W h)_t − logsumexp(W h)`` at about 70 positions per LastFM prompt, one or a
few target tokens each, over a vocabulary of tens of thousands of tokens. Through autograd that costs a float32
(N, V) logits tensor, its exponentials, and in the backward pass the same again: a softmax, a scattered
one-hot and a (N, V) @ (V, H) product. Here the positions are processed in chunks of rows small enough to stay
in the processor's cache, and the backward pass needs nothing of the vocabulary, because the output layer is
frozen and the gradient of a log-probability with respect to its hidden state has a closed form:

    ∂ log p(t | h) / ∂h = W_t − Σ_v p_v W_v = W_t − E_p[W]

So the forward pass computes the expected output embedding ``E_p[W] = softmax(W h) @ W`` of every position
beside its log-sum-exp (one more (c, V) @ (V, H) product per chunk, which autograd's backward would have paid
anyway), and the backward pass is ``Σ_k g_k W_{t_k} − (Σ_k g_k) E_p[W]``: a gather and an (N, H) product.
The values are those of ``log_softmax(W h + b)`` up to float rounding; the weight and bias must not require
gradients (a trained output layer goes through autograd instead, see :func:`fused_applicable`).

The log-sum-exp takes each row's maximum out before exponentiating, so that no exponential overflows. On the
CPU that costs two of the five passes over a chunk's logits (the maximum and the subtraction), and float32's
exp covers logits in [-87, 88]: there the exponentials are taken as they are, and only a row whose sum
overflowed or fell below 2^-100 (where its largest terms would lose precision) is done again with its maximum.
On a GPU, where that check would wait for the device, the maximum is always taken out.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Logit elements per chunk: 2^22 float32 (16 MiB) keeps a chunk in a server CPU's cache; on a GPU, larger chunks
# mean fewer kernel launches while the (c, V) temporaries stay at 1 GiB.
CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**28}
TINY = 2.0**-100  # a row sum below this is done again with its maximum taken out


def fused_applicable(output_layer: nn.Module) -> bool:
    """Whether ``output_layer`` is a plain, frozen ``nn.Linear`` (not a LoRA-wrapped or quantised one)."""
    return type(output_layer) is nn.Linear and not any(p.requires_grad for p in output_layer.parameters())


def subtracts_maximum(device: torch.device) -> bool:
    """Whether each row's maximum is taken out before exponentiating by default: everywhere but on the CPU, where
    the rows out of exp's range are found by a check on the host instead (module doc)."""
    return device.type != "cpu"


def token_logprobs(
    hidden: torch.Tensor,
    output_layer: nn.Linear,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    shift: bool | None = None,
) -> torch.Tensor:
    """(N, k) ``log softmax(output_layer(hidden))`` at ``targets`` (N, k) for (N, H) ``hidden``, in float32 (float64
    for float64 inputs). Differentiable with respect to ``hidden`` only: ``output_layer`` must be frozen
    (:func:`fused_applicable`). ``chunk_rows``: rows per chunk (default: :data:`CHUNK_ELEMENTS` logits).
    ``shift``: take every row's maximum out before exponentiating (default: off the CPU only; module doc).
    """
    if not fused_applicable(output_layer):
        raise ValueError("token_logprobs needs a frozen nn.Linear output layer")
    weight, bias = output_layer.weight, output_layer.bias
    chunk = chunk_rows or max(1, CHUNK_ELEMENTS.get(hidden.device.type, 2**22) // weight.shape[0])
    shift = subtracts_maximum(hidden.device) if shift is None else shift
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _TokenLogProbs.apply(hidden, weight, bias, targets, chunk, shift)
    return _forward(hidden, weight, bias, targets, chunk, shift, expected=False)[0]


def _forward(hidden, weight, bias, targets, chunk: int, shift: bool, expected: bool):
    """(N, k) log-probabilities and, with ``expected``, the (N, H) expected output embeddings ``softmax @ W``."""
    n = hidden.shape[0]
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # the logits' precision: float32 at least
    out = torch.empty(targets.shape, dtype=dtype, device=hidden.device)  # (N, k)
    mean_w = torch.empty((n, weight.shape[1]), dtype=dtype, device=hidden.device) if expected else None  # (N, H)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        logits = F.linear(hidden[start:stop], weight, bias).to(dtype)  # (c, V): fresh, so modified in place below
        picked = logits.gather(1, targets[start:stop])  # (c, k)
        top = logits.amax(1, keepdim=True) if shift else logits.new_zeros((stop - start, 1))  # (c, 1)
        probs = logits.sub_(top).exp_() if shift else logits.exp_()  # (c, V) exp(l − top): the softmax, unnormalised
        total = probs.sum(1, keepdim=True)  # (c, 1)
        if not shift:  # rows out of exp's range: again, with their maximum taken out
            again = (~torch.isfinite(total) | (total < TINY)).squeeze(1)  # (c,)
            if again.any():
                logits = F.linear(hidden[start:stop][again], weight, bias).to(dtype)  # (a, V)
                top[again] = logits.amax(1, keepdim=True)
                probs[again] = logits.sub_(top[again]).exp_()
                total[again] = probs[again].sum(1, keepdim=True)
        out[start:stop] = picked - (top + total.log())  # (c, k)
        if expected:  # (c, V) @ (V, H) -> (c, H), normalised after the product (c·H divisions, not c·V)
            mean_w[start:stop] = (probs.to(weight.dtype) @ weight).to(dtype) / total
    return out, mean_w


class _TokenLogProbs(torch.autograd.Function):
    """Forward: chunked log-probabilities and expected embeddings. Backward: the closed-form gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, shift):
        out, mean_w = _forward(hidden, weight, bias, targets, chunk, shift, expected=True)
        ctx.save_for_backward(weight, targets, mean_w)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, targets, mean_w = ctx.saved_tensors
        grad = grad.to(mean_w.dtype)  # (N, k)
        picked = torch.einsum("nk,nkh->nh", grad, weight[targets].to(mean_w.dtype))  # Σ_k g_k W_{t_k}: (N, H)
        grad_hidden = picked - grad.sum(1, keepdim=True) * mean_w  # (N, H)
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None, None
