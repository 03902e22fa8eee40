"""The bounded-memory chunked SSD scan (``kernels.ssd.chunked``): values, gradients, memory.

Values and gradients against the sequential definition in fp64 and against the autograd of the
chunked reference in fp32; memory as the bytes autograd keeps for backward (saved-tensor hooks)
and the peak of bytes alive during forward and backward (a dispatch mode that sees the storage
every op creates), each checked against a bound that the reference path exceeds.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kernels.ssd import ssd_scan_bounded, ssd_scan_chunked, ssd_scan_sequential
from kernels.ssd.chunked import _ssd_backward, _ssd_forward
from kernels.ssd.op import ssd_scan
from tests.kernels.test_ssd_ref import make_inputs, packed_seq_idx

F64 = torch.float64
NAMES = ("x", "dt", "A", "B", "C", "initial_state")


def _value_and_grads(
    scan: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    inp: dict[str, torch.Tensor],
    seed: int,
    **kw: object,
) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """(y, final state) and the gradients of every float input for random cotangents of both."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    y, h = scan(**leaves, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=F64).to(y.dtype)).sum()
    loss = loss + (h * torch.randn(h.shape, generator=gen, dtype=F64).to(h.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return (y.detach(), h.detach()), dict(zip(leaves, grads))


def _with_state(inp: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    b, _, H, P = inp["x"].shape
    gen = torch.Generator().manual_seed(seed)
    state = torch.randn(b, H, P, inp["B"].shape[-1], generator=gen, dtype=F64)
    return {**inp, "initial_state": state.to(torch.promote_types(inp["x"].dtype, torch.float32))}


@pytest.mark.parametrize(
    "T, chunk, G, block_chunks",
    [(1, 4, 1, None), (7, 4, 2, 1), (33, 4, 2, 3), (33, 8, 1, 2), (40, 16, 2, None)],
)
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("init", [False, True])
def test_matches_sequential_fp64(
    T: int, chunk: int, G: int, block_chunks: int | None, docs: bool, init: bool
) -> None:
    seed = T * 10 + chunk + G
    inp = make_inputs(T=T, G=G, seed=seed)
    if init:
        inp = _with_state(inp, seed + 1)
    seq_idx = packed_seq_idx(2, T, seed=seed + 2) if docs and T > 1 else None
    out_ref, g_ref = _value_and_grads(ssd_scan_sequential, inp, seed, seq_idx=seq_idx)
    out, g = _value_and_grads(
        ssd_scan_bounded,
        inp,
        seed,
        chunk_size=chunk,
        seq_idx=seq_idx,
        block_chunks=block_chunks,
    )
    assert out[0].dtype == F64 and out[1].dtype == F64
    for name, a, b in zip(("y", "final state"), out, out_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    for name in g_ref:
        assert torch.isfinite(g[name]).all(), name
        assert T == 1 or g_ref[name].abs().max() > 0, name  # one step from zero: dA = 0
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-9, atol=1e-9, msg=f"d{name}")


def test_documents_are_isolated_bitwise() -> None:
    """fp32, several documents inside one chunk: changing every input of one document leaves
    the outputs of every other document bitwise unchanged (a packed row is exactly its documents
    run one by one; a cumsum through the whole chunk would leak the earlier documents' steps at
    rounding level)."""
    T, chunk = 40, 16
    inp = make_inputs(b=1, T=T, H=4, P=8, G=2, N=8, dtype=torch.float32, seed=61)
    inp["dt"] = inp["dt"] * 5  # decays far from 1, where rounding would show
    seq_idx = torch.tensor([[0] * 5 + [1] * 12 + [2] * 3 + [3] * 20])
    y0, _ = ssd_scan_bounded(**inp, chunk_size=chunk, seq_idx=seq_idx, block_chunks=2)
    for doc in range(4):
        bumped = {k: v.clone() for k, v in inp.items()}
        mine = seq_idx[0] == doc
        for name in ("x", "dt", "B", "C"):
            bumped[name][:, mine] *= 1.5
        y1, _ = ssd_scan_bounded(**bumped, chunk_size=chunk, seq_idx=seq_idx, block_chunks=2)
        assert (y1[:, mine] != y0[:, mine]).any(), doc
        assert torch.equal(y1[:, ~mine], y0[:, ~mine]), doc


@pytest.mark.parametrize("used", ["y", "final state"])
def test_one_output_unused(used: str) -> None:
    """Autograd hands the backward None for an output that took no part in the loss."""
    inp = _with_state(make_inputs(T=21, G=2, seed=31), 32)
    grads = []
    for scan, kw in ((ssd_scan_sequential, {}), (ssd_scan_bounded, {"chunk_size": 4})):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
        y, h = scan(**leaves, **kw)
        loss = (y.sin() if used == "y" else h.cos()).sum()
        grads.append(torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True))
    for name, a, b in zip(NAMES, *grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d{name}")


def test_fp32_gradients_match_the_chunked_reference() -> None:
    """fp32, several blocks and a partial chunk: the old (autograd) and new (by hand) backward
    agree to 2e-5 relative to each gradient's largest entry (measured: <= 2e-7)."""
    T = 150
    inp = make_inputs(b=2, T=T, H=4, P=8, G=2, N=16, dtype=torch.float32, seed=41)
    inp = _with_state(inp, 42)
    seq_idx = packed_seq_idx(2, T, seed=43)
    kw = {"chunk_size": 16, "seq_idx": seq_idx}
    out_old, g_old = _value_and_grads(ssd_scan_chunked, inp, 44, **kw)
    out_new, g_new = _value_and_grads(ssd_scan_bounded, inp, 44, **kw, block_chunks=3)
    assert out_new[0].dtype == torch.float32 and out_new[1].dtype == torch.float32
    for name, a, b in zip(("y", "final state"), out_new, out_old):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)
    for name in g_old:
        scale = g_old[name].abs().max().item()
        torch.testing.assert_close(
            g_new[name], g_old[name], rtol=2e-5, atol=2e-5 * scale, msg=f"d{name}"
        )


def test_bf16_inputs_keep_their_dtypes() -> None:
    """y and the gradients come back in the inputs' dtypes, the state in fp32."""
    inp32 = make_inputs(T=70, G=2, dtype=torch.float32, seed=51)
    inp = {k: v if k == "A" else v.to(torch.bfloat16) for k, v in inp32.items()}
    inp = _with_state(inp, 52)
    seq_idx = packed_seq_idx(2, 70, seed=53)
    (y, h), g = _value_and_grads(ssd_scan_bounded, inp, 54, chunk_size=16, seq_idx=seq_idx)
    (y32, h32), g32 = _value_and_grads(
        ssd_scan_chunked, {k: v.float() for k, v in inp.items()}, 54, chunk_size=16,
        seq_idx=seq_idx,
    )  # fmt: skip
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(h, h32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), y32, rtol=1.6e-2, atol=1e-2)
    for name, grad in g.items():
        assert grad.dtype == inp[name].dtype, name
        scale = g32[name].abs().max().item()
        torch.testing.assert_close(grad.float(), g32[name], rtol=1.6e-2, atol=1e-2 * scale)


def test_torch_backend_is_the_bounded_scan() -> None:
    inp = _with_state(make_inputs(T=19, G=2, seed=61), 62)
    seq_idx = packed_seq_idx(2, 19, seed=63)
    _, g = _value_and_grads(ssd_scan, inp, 64, chunk_size=8, seq_idx=seq_idx, backend="torch")
    _, g_new = _value_and_grads(ssd_scan_bounded, inp, 64, chunk_size=8, seq_idx=seq_idx)
    for name in g:
        torch.testing.assert_close(g[name], g_new[name], rtol=0, atol=0)


def test_large_decays_stay_finite() -> None:
    """|sum dt * A| in the thousands (decays underflow to 0): fp32 values and gradients finite
    and close to the fp64 definition."""
    inp = make_inputs(T=64, G=1, dtype=torch.float32, seed=81)
    inp = {**inp, "dt": inp["dt"] * 20, "A": inp["A"] * 10}
    out, g = _value_and_grads(ssd_scan_bounded, inp, 82, chunk_size=16, block_chunks=2)
    out_ref, g_ref = _value_and_grads(
        ssd_scan_sequential, {k: v.double() for k, v in inp.items()}, 82
    )
    for a, b in zip(out, out_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    for name in g:
        assert torch.isfinite(g[name]).all(), name
        scale = g_ref[name].abs().max().item()
        torch.testing.assert_close(g[name].double(), g_ref[name], rtol=1e-4, atol=1e-4 * scale)


def test_custom_ops_pass_opcheck() -> None:
    """Schemas, fake implementations and tracing of both custom ops."""
    inp = _with_state(make_inputs(T=21, G=2, dtype=torch.float32, seed=91), 92)
    doc = packed_seq_idx(2, 21, seed=93) - 7
    scan = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    fwd_args = (*scan, inp["initial_state"], doc, 4, 2)
    torch.library.opcheck(torch.ops.hydra_kernels.ssd_bounded_fwd.default, fwd_args)
    _, _, states = torch.ops.hydra_kernels.ssd_bounded_fwd(*fwd_args)
    dy, dfinal = torch.randn_like(inp["x"]), torch.randn_like(inp["initial_state"])
    for grads in ((dy, dfinal), (None, dfinal), (dy, None)):
        bwd_args = (*grads, *scan, doc, states, 4, 2)
        torch.library.opcheck(torch.ops.hydra_kernels.ssd_bounded_bwd.default, bwd_args)


def test_torch_compile_fullgraph_matches_eager() -> None:
    inp = _with_state(make_inputs(T=40, G=2, dtype=torch.float32, seed=95), 96)
    seq_idx = packed_seq_idx(2, 40, seed=97)

    def objective(**leaves: torch.Tensor) -> torch.Tensor:
        y, h = ssd_scan_bounded(**leaves, chunk_size=8, seq_idx=seq_idx, block_chunks=2)
        return y.sin().sum() + h.square().sum()

    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (objective, compiled):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
        results.append(torch.autograd.grad(fn(**leaves), list(leaves.values())))
    for name, a, b in zip(NAMES, *results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"d{name}")


# memory: one Mamba-2-like layer on a long row, fp32
MEM = {"b": 1, "T": 4096, "H": 4, "P": 16, "G": 1, "N": 16}
MEM_CHUNK, MEM_BLOCK = 64, 4


def _memory_inputs() -> dict[str, torch.Tensor]:
    return make_inputs(**MEM, dtype=torch.float32, seed=71)


def _state_bound(inp: dict[str, torch.Tensor]) -> int:
    """Four times O(T * state): the inputs plus one [b, H, P, N] state per chunk."""
    b, T, H, P = inp["x"].shape
    n_chunks = -(-T // MEM_CHUNK)
    states = b * n_chunks * H * P * inp["B"].shape[-1] * 4
    return 4 * (sum(t.nbytes for t in inp.values()) + states)


def _saved_bytes(scan: Callable[..., tuple[torch.Tensor, torch.Tensor]], **kw: object) -> int:
    """Bytes of the distinct storages that autograd keeps for the backward of one call."""
    inp = {k: v.requires_grad_(True) for k, v in _memory_inputs().items()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scan(**inp, chunk_size=MEM_CHUNK, **kw)
    return sum(storages.values())


def test_saved_for_backward_is_O_T_state() -> None:
    bound = _state_bound(_memory_inputs())
    new = _saved_bytes(ssd_scan_bounded, block_chunks=MEM_BLOCK)
    old = _saved_bytes(ssd_scan_chunked)
    assert new <= bound, f"{new / 2**20:.1f} MiB saved, bound {bound / 2**20:.1f} MiB"
    # the bound can fail: the chunked reference keeps each chunk's [L, L] tensors
    assert old > bound, f"{old / 2**20:.1f} MiB saved, bound {bound / 2**20:.1f} MiB"


class _PeakBytes(TorchDispatchMode):
    """Peak of the bytes allocated by the ops run under it and still alive (a storage counts
    from the op that creates it until its last tensor is gone)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def _free(self, ptr: int, nbytes: int) -> None:
        self._tracked.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        # views of the inputs (made outside the mode, e.g.) are not new storage
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if storage.nbytes() and ptr not in inputs and ptr not in self._tracked:
                self._tracked.add(ptr)
                self.live += storage.nbytes()
                weakref.finalize(storage, self._free, ptr, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _tensors(tree: object) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def test_peak_memory_of_forward_and_backward_is_bounded() -> None:
    """Forward + backward of the new path (its two custom ops' implementations, which the
    dispatch mode would otherwise see as two opaque calls) stays within the bound; the
    chunked reference under autograd does not."""
    inp = _memory_inputs()
    bound = _state_bound(inp)
    gen = torch.Generator().manual_seed(72)
    dy = torch.randn(inp["x"].shape, generator=gen)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    with _PeakBytes() as new:
        y, h, states = _ssd_forward(*args, None, None, MEM_CHUNK, MEM_BLOCK)
        grads = _ssd_backward(dy, None, *args, None, states, MEM_CHUNK, MEM_BLOCK)
    del y, h, states, grads
    leaves = [t.detach().requires_grad_(True) for t in args]
    with _PeakBytes() as old:
        y, _ = ssd_scan_chunked(*leaves, MEM_CHUNK)
        torch.autograd.grad(y, leaves, dy)
    assert new.peak <= bound, f"peak {new.peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
    assert old.peak > bound, f"peak {old.peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
