"""``wide_linear``: a linear map in fp32 at least, whose backward keeps x in its own dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.common.layers import wide_linear

pytestmark = pytest.mark.usefixtures("one_thread")


def test_values_and_gradients_equal_linear_in_fp64() -> None:
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    out = wide_linear(x, w)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    ref = F.linear(x, w)
    rx, rw = torch.autograd.grad(ref, (x, w), grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)


def test_bf16_input_computes_in_fp32_under_autocast_and_saves_bf16() -> None:
    x = torch.randn(64, 32).to(torch.bfloat16).requires_grad_()
    w = torch.randn(4, 32, requires_grad=True)
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = wide_linear(x, w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x.float(), w), rtol=1e-6, atol=1e-6)
    assert {t.dtype for t in saved} == {torch.bfloat16, torch.float32}  # x as it came, and w
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, x.float().sum(0).expand(4, -1), rtol=1e-6, atol=1e-6)
