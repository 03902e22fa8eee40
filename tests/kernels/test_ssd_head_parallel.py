"""The CPU scan split over heads into parallel threads (``kernels/ssd/head_parallel.py``): the
same outputs and gradients as the unsplit scan, for grouped B/C, packed documents and carried
states; the split itself; the thread count restored, also when a part fails."""

from __future__ import annotations

import pytest
import torch

from kernels.ssd import chunked, head_parallel
from kernels.ssd.chunked import ssd_scan_bounded
from kernels.ssd.head_parallel import HeadSlice, head_parts, join_heads, run_parts


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> int:
    """The split turned on (it is off by default), the thread count restored afterwards."""
    monkeypatch.setenv(head_parallel.ENV, "1")
    saved = torch.get_num_threads()
    yield saved
    torch.set_num_threads(saved)


def _scan_outputs_and_grads(threads: int, split: bool, monkeypatch: pytest.MonkeyPatch) -> list:
    gen = torch.Generator().manual_seed(0)
    b, T, G, R, P, N, L = 2, 45, 2, 6, 3, 4, 8

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.requires_grad_()

    x, B, C = rand(b, T, G * R, P), rand(b, T, G, N), rand(b, T, G, N)
    dt = (torch.rand(b, T, G * R, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    A = (-torch.rand(G * R, generator=gen, dtype=torch.float64) - 0.1).requires_grad_()
    h0 = rand(b, G * R, P, N)
    seq_idx = torch.randint(0, 3, (b, T), generator=gen).sort(dim=1).values
    torch.set_num_threads(threads)
    with monkeypatch.context() as m:
        if not split:
            m.setattr(chunked, "head_parts", lambda heads, device: 1)
        y, final = ssd_scan_bounded(x, dt, A, B, C, L, h0, seq_idx, block_chunks=2)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
        loss = loss + (final * final).sum()
        return [y, final, *torch.autograd.grad(loss, [x, dt, A, B, C, h0])]


@pytest.mark.parametrize("n_threads", [2, 3, 4])
def test_split_scan_equals_the_whole_one(
    n_threads: int, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert head_parts(6, torch.device("cpu")) > 1 or torch.get_num_threads() == 1
    split = _scan_outputs_and_grads(n_threads, True, monkeypatch)
    whole = _scan_outputs_and_grads(n_threads, False, monkeypatch)
    assert torch.get_num_threads() == n_threads
    for got, want in zip(split, whole):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_parts_divide_a_groups_heads(threads: int) -> None:
    cpu = torch.device("cpu")
    torch.set_num_threads(2)
    assert head_parts(12, cpu) == 2 and head_parts(7, cpu) == 1
    assert head_parts(12, torch.device("meta")) == 1  # not a CPU scan
    torch.set_num_threads(5)
    assert head_parts(12, cpu) == 4 and head_parts(3, cpu) == 3
    torch.set_num_threads(1)
    assert head_parts(12, cpu) == 1


def test_the_split_is_off_by_default_and_a_bad_value_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(head_parallel.ENV, raising=False)
    assert head_parts(12, torch.device("cpu")) == 1
    monkeypatch.setenv(head_parallel.ENV, "yes")
    with pytest.raises(ValueError, match="HYDRA_SCAN_SPLIT_HEADS='yes'"):
        head_parts(12, torch.device("cpu"))


def test_slices_join_back_in_head_order() -> None:
    G, R, parts = 3, 4, 2
    heads = torch.arange(G * R).view(1, G * R, 1)  # head g * R + r
    picked = [HeadSlice(G, parts, j)(heads, 1) for j in range(parts)]
    assert picked[0].flatten().tolist() == [0, 1, 4, 5, 8, 9]
    assert torch.equal(join_heads(picked, G, 1), heads)


def test_a_failing_part_raises_and_restores_the_thread_count(threads: int) -> None:
    torch.set_num_threads(2)
    seen: list[int] = []

    def part(j: int) -> int:
        seen.append(torch.get_num_threads())
        if j == 1:
            raise RuntimeError("part 1 failed")
        return j

    with pytest.raises(RuntimeError, match="part 1 failed"):
        run_parts(part, 3)
    assert sorted(seen) == [1, 1, 1]  # every part ran, on one intra-op thread
    assert torch.get_num_threads() == 2
    assert run_parts(lambda j: j * 10, 3) == [0, 10, 20]
