"""``grouped_mm_traceable``: torch's CPU grouped_mm behind an op that compiles in fp32."""

from __future__ import annotations

import pytest
import torch

from kernels.moe.grouped_mm import TORCH_GROUPED_MM, grouped_mm_traceable

pytestmark = pytest.mark.skipif(TORCH_GROUPED_MM is None, reason="this torch has no grouped_mm")


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([5, 0, 11, 3])  # an empty group too
    a = torch.randn(int(counts.sum()), 8, generator=g, requires_grad=True)
    b = torch.randn(4, 8, 12, generator=g, requires_grad=True)
    return a, b, counts.cumsum(0).to(torch.int32)


def _per_group(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The definition: each group's rows times its own matrix."""
    starts = [0, *offs.tolist()[:-1]]
    return torch.cat([a[s:e] @ b[i] for i, (s, e) in enumerate(zip(starts, offs.tolist()))])


@pytest.mark.parametrize("compiled", [False, True])
def test_matches_per_group_matmuls_forward_and_backward(compiled: bool) -> None:
    a, b, offs = _inputs(torch.seed() % 2**31)
    fn = torch.compile(grouped_mm_traceable, fullgraph=True, backend="aot_eager")
    out = (fn if compiled else grouped_mm_traceable)(a, b, offs)
    grad = torch.randn_like(out)
    ga, gb = torch.autograd.grad(out, (a, b), grad)
    ref = _per_group(a, b, offs)
    ra, rb = torch.autograd.grad(ref, (a, b), grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, ra, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-5)
    assert gb[1].abs().sum() == 0  # the empty group gets no gradient


def test_opcheck() -> None:
    """torch.library's own checks: schema, fake shapes, autograd registration."""
    a, b, offs = _inputs(0)
    torch.library.opcheck(grouped_mm_traceable, (a, b, offs))
