"""Chunked token log-probabilities with the closed-form backward (llm/logprobs.py) against autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ilora_cli.llm.logprobs import fused_applicable, token_logprobs


def _layer(vocab=50, hidden=8, bias=False, dtype=torch.float64):
    torch.manual_seed(0)
    layer = nn.Linear(hidden, vocab, bias=bias).to(dtype)
    layer.weight.data.mul_(4.0)  # logits of a few units, as a trained model's
    layer.requires_grad_(False)
    return layer


def _reference(hidden, layer, targets):
    return torch.log_softmax(layer(hidden).to(torch.promote_types(hidden.dtype, torch.float32)), -1).gather(1, targets)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k,chunk", [(1, 3), (4, 5), (4, None), (1, 100)])
def test_values_and_gradients_equal_autograd_through_log_softmax(shift, bias, k, chunk):
    layer = _layer(bias=bias)
    torch.manual_seed(1)
    hidden = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (11, k))
    got = token_logprobs(hidden, layer, targets, chunk_rows=chunk, shift=shift)
    want = _reference(hidden, layer, targets)
    torch.testing.assert_close(got, want)
    upstream = torch.randn(11, k, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * upstream).sum(), hidden)
    (g_want,) = torch.autograd.grad((want * upstream).sum(), hidden)
    torch.testing.assert_close(g_got, g_want)


def test_gradcheck_in_double_precision():
    layer = _layer(vocab=13, hidden=4, bias=True)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (5, 3))
    for shift in (False, True):
        assert torch.autograd.gradcheck(lambda h: token_logprobs(h, layer, targets, 2, shift), (hidden,))  # noqa: B023


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("scale", [1.0, 50.0, -50.0])
def test_float32_logits_beyond_the_range_of_exp(shift, scale):
    """Rows whose logits reach ±100s (exp overflows, or every exponential underflows) are exact as well: without
    the maximum taken out first, those rows are done again with it, among rows that are not (scale 1)."""
    layer = _layer(dtype=torch.float32)
    layer.bias = nn.Parameter(torch.zeros(50), requires_grad=False)
    hidden = torch.randn(7, 8)
    hidden[::2] *= abs(scale)
    if scale < 0:
        layer.bias.data[:] = -400.0  # every logit far below exp's range: each sum underflows to 0
    targets = torch.randint(0, 50, (7, 2))
    with torch.no_grad():
        got = token_logprobs(hidden, layer, targets, chunk_rows=3, shift=shift)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, _reference(hidden, layer, targets), rtol=1e-5, atol=1e-4)
    hidden.requires_grad_(True)
    (g,) = torch.autograd.grad(token_logprobs(hidden, layer, targets, chunk_rows=3, shift=shift).sum(), hidden)
    (want,) = torch.autograd.grad(_reference(hidden, layer, targets).sum(), hidden)
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)


def test_only_a_frozen_plain_linear_output_layer_is_accepted():
    layer = _layer()
    assert fused_applicable(layer)
    layer.weight.requires_grad_(True)  # a trained output layer needs its own gradient: autograd's path
    assert not fused_applicable(layer)
    with pytest.raises(ValueError):
        token_logprobs(torch.randn(2, 8, dtype=torch.float64), layer, torch.zeros(2, 1, dtype=torch.long))
    assert not fused_applicable(nn.Sequential(_layer()))
