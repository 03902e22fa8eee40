"""Context parallelism: bytes each rank sends per layer, and activation memory per rank.

Run:  python benchmarks/cp_volume.py --out docs/results/cp_volume.json   (PNG next to it; 2-5 min
on 2 CPU cores)

Part 1, traffic. Bytes one rank sends for one SSM (Mamba-2) layer in one step, forward +
backward, one row of L tokens split over cp ranks (T = L / cp each), at the hydra-1.6b shape:
H = 64 heads of P = 64 channels, state N = 128, G = 1 B/C group, conv width K = 4, E = d_inner =
4096, X = E + 2 G N = 4352 conv channels, D = d_model = 2048; b = 2 bytes (bf16 activations), the
state and decays fp32. Conventions of ``parallel.comm``: an all-gather over n ranks sends its
input n - 1 times, a ring all-reduce 2 (n - 1) / n of it, an all-to-all (n - 1) / n of it.

  ours (``Mamba2Mixer`` under a split ``SequenceContext``, ``parallel.context.ContextGroup``):
    S = 4 B (H P N + H)      the slice's final state and its decays (fp32)
    W = b B (K - 1) X        the slice's last K - 1 conv inputs (the next rank's halo)
    state all-gather, forward                           (cp - 1) S
    its backward: an all-reduce of the whole gathered [cp, ...] gradient, own part kept
                                                        2 (cp - 1) / cp * cp S = 2 (cp - 1) S
    halo shift forward (ranks r < cp - 1), its gradient back (ranks r >= 1)       W each
    total on a middle rank                              3 (cp - 1) S + 2 W   (no L in it)
  Megatron-LM's head all-to-all (``megatron/core/ssm/mamba_context_parallel.py``, pre_conv_ssm
  and post_conv_ssm): before the conv and scan, five all-to-alls turn the sequence split of z,
  x [T, B, E], B, C [T, B, G r N] and dt [T, B, H] into a head split of the whole row (when
  G < cp, B and C are first repeated r = cp / G times, so G r = max(G, cp)); after the scan one
  all-to-all turns y [L, B, E / cp] back. Its backward runs the transposed all-to-alls (the same
  bytes); no halo (each rank holds whole rows of its heads):
    total                    2 (cp - 1) / cp * T B b (3 E + 2 max(G, cp) N + H)
  all-gather of the layer input (every rank scans the whole row, keeps its slice; the gradient of
  the gathered input is reduce-scattered):
    total                    (cp - 1) T B D b + (cp - 1) / cp * L B D b = 2 (cp - 1) T B D b

  Counted: the real ``Mamba2Mixer`` CP path (forward + backward) on 2 and 4 gloo ranks at the real
  H, P, N, G, K and X, fp32 on CPU (b = 4), for L = 1K, 2K, 4K (``--count-max-len``): the
  ``CommStats`` bytes of every rank must equal the formula exactly. d_model is cut to 256 with
  expand 16 so that E stays 4096 (nothing sent depends on D). The tables (cp = 8, b = 2, every L)
  are the formula. With activation checkpointing the recompute repeats the forward collectives.

Part 2, activation memory. Bytes autograd saves for backward on one rank: unique storages, the
parameters (FSDP2's business) left out. GPU layout: FSDP2 bf16 parameters and bf16 autocast (so
the residual stream is bf16), rows with document ids, the SSD scan on ``mamba_ssm``, attention on
FlexAttention, the experts on grouped GEMMs. Per token of one layer (b = 2, f = 4; F d_ff, Fe
d_expert, k top_k, C MoE chunk, Ex experts, Hq / Hkv / Kh query heads, kv heads, head dim,
V vocab):

  norm     each path's RMSNorm (ssm, attention, ffn, moe)   b D + f (x as it comes, 1/rms;
           one op that recomputes the rest in backward)
  out      each path's output, kept by its gate's multiply   b D
  ssm      norm + out + b D (in_proj input) + b (E + X + H) (the in_proj output: the conv saves
           its xbc view, the gated norm its z view) + 8 (document ids of the conv's tap masks)
           + f X (silu output: the scan's x, B, C) + 2 f H (softplus input, dt) + [mamba_ssm]
           f E (y) + f H (dA_cumsum) + 2 f G N (B, C made contiguous) + f E + f G (gated
           RMSNorm: y in fp32, 1/rms) + b E (out_proj input)
  attention  norm + out + b D (q/k/v input) + f Kh (rope cos, sin) + [flex] 2 b Hq Kh (q, out)
           + 2 b Hkv Kh (k, v) + f Hq (lse) + b Hq Kh (wo input: a copy of the transposed out)
  ffn      norm + out + b D + 3 b F (w1 out, w3 out, w2 input)
  moe      norm + out + 8 (each token's unit start; chunk routing) + b D + 3 f Ex + 12 k + 3 f
           (the router, per token: x in its own dtype, logits, scores, top-k, the balance
           statistics) + k (b D rows in + 3 b Fe (w1 out, w3 out, their gated product) + b D
           rows out + f (pair weight) + 16 (int64 pair indices))
  head     8 (token ids) + 2 f D + f (final norm) + b D (head input) + f V (the loss's fp32
           log-softmax) + 8 (labels)                                                  once
  workspace, pkm: measured at the model's widths (``measure_path_bytes_per_token``), no closed form.
Per row and layer, on top of T x the above (S = (L - 1) // summary_chunk summaries, w window):
  summaries (L > w)        8 T (the row index both poolings select by) + S (2 b Hkv Kh + 8)
  CP attention frame       (w - 1) (2 b Hq Kh + 2 b Hkv Kh + f Hq)   (q, k, v, out, lse of the halo)
  CP SSM state correction  T (2 f H + f)   (the decays [T, H] twice, the first-document mask)
                           + f H P N (r + 1) + [r >= 2] f cp (H P N + H)   (the folded states,
                           the gathered states)
Per rank: no checkpointing, the sum over layers plus the head; with activation checkpointing (one
checkpoint per block), n_layers T b D (the block inputs) + the largest block (recomputed in
backward) + the head.

Checked: (a) per path, the slope between two lengths of the bytes saved at the real 1.6b widths
on CPU (bf16 parameters and autocast; the SSD scan and the attention replaced by stand-ins that
run the reference but count what the GPU kernels save), and the same per path and per block at
the tiny shape: equal to the formula; (b) the tiny Hydra model (``configs/hydra-tiny.yaml``)
forward under CP on 1, 2 and 4 gloo ranks at one L: bytes per rank in that GPU layout against
the formula, and on the plain CPU path (fp32, reference kernels) to show the ~1/cp fall.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

if __name__ == "__main__":
    # Run as a script, sys.path[0] is benchmarks/, whose kernels.py would shadow the project's
    # ``kernels`` package: import from the repository root instead.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import pretrain.models.common.attention as attention_module  # noqa: E402
import pretrain.models.common.ssm as ssm_module  # noqa: E402
from parallel.comm import CommStats  # noqa: E402
from parallel.context import ContextGroup  # noqa: E402
from parallel.local_ranks import run_on_ranks  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.models.common.sequence import SequenceContext  # noqa: E402
from pretrain.models.common.ssm import Mamba2Mixer  # noqa: E402
from pretrain.models.config import ModelConfig, SSMConfig  # noqa: E402
from pretrain.models.lm import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG_1_6B = ROOT / "configs/hydra-1.6b.yaml"
CONFIG_TINY = ROOT / "configs/hydra-tiny.yaml"
LENGTHS = [1024 * 2**i for i in range(7)]  # 1K ... 64K
FP32, BF16 = 4, 2
COUNT_WIDTH = 256  # d_model of the counted mixer (expand is raised so that E stays the model's)
MEASURED_ONLY = ("workspace", "pkm")  # paths whose saved bytes per token have no formula here


# ------------------------------------------------------------------------------ traffic formulas


@dataclass(frozen=True)
class SSMShape:
    """The SSM widths that the traffic depends on."""

    n_heads: int  # H
    head_dim: int  # P
    d_state: int  # N
    n_groups: int  # G
    d_conv: int  # K

    @property
    def d_inner(self) -> int:  # E
        return self.n_heads * self.head_dim

    @property
    def conv_dim(self) -> int:  # X
        return self.d_inner + 2 * self.n_groups * self.d_state

    @classmethod
    def of(cls, d_model: int, ssm: SSMConfig) -> SSMShape:
        return cls(
            n_heads=ssm.expand * d_model // ssm.head_dim,
            head_dim=ssm.head_dim,
            d_state=ssm.d_state,
            n_groups=ssm.n_groups,
            d_conv=ssm.d_conv,
        )

    def mixer_config(self, d_model: int, chunk_size: int) -> SSMConfig:
        """An ``SSMConfig`` of these widths on a residual of ``d_model`` (expand adjusted)."""
        if self.d_inner % d_model:
            raise ValueError(f"d_model={d_model} must divide d_inner={self.d_inner}")
        return SSMConfig(
            d_state=self.d_state,
            head_dim=self.head_dim,
            expand=self.d_inner // d_model,
            n_groups=self.n_groups,
            d_conv=self.d_conv,
            chunk_size=chunk_size,
        )


def ssm_state_passing_bytes(
    shape: SSMShape, batch: int, cp: int, rank: int, act_bytes: int
) -> dict[str, int]:
    """Bytes rank ``rank`` of ``cp`` sends for one ``Mamba2Mixer`` forward + backward, keyed as
    ``ContextGroup`` counts them (see the module docstring)."""
    state = FP32 * batch * (shape.n_heads * shape.head_dim * shape.d_state + shape.n_heads)
    halo = act_bytes * batch * (shape.d_conv - 1) * shape.conv_dim
    if cp == 1:
        return {}
    sent = {
        "cp/ssm_conv_halo/shift": halo if rank < cp - 1 else 0,
        "cp/ssm_conv_halo/shift_grad": halo if rank >= 1 else 0,
        "cp/ssm_state/all_gather": (cp - 1) * state,
        "cp/ssm_state/all_gather_grad": round(2 * (cp - 1) / cp * cp * state),
    }
    return {key: nbytes for key, nbytes in sent.items() if nbytes}  # as counted: no empty keys


def ssm_state_passing_total(shape: SSMShape, batch: int, cp: int, act_bytes: int) -> int:
    """The busiest rank's bytes (a middle rank: it sends the halo both ways)."""
    return max(
        sum(ssm_state_passing_bytes(shape, batch, cp, r, act_bytes).values()) for r in range(cp)
    )


def megatron_all_to_all_bytes(
    shape: SSMShape, batch: int, length: int, cp: int, act_bytes: int
) -> float:
    """Megatron-LM's head-parallel Mamba CP: 5 + 1 all-to-alls forward, the same backward."""
    t = length // cp
    bc = 2 * max(shape.n_groups, cp) * shape.d_state
    width = 3 * shape.d_inner + bc + shape.n_heads  # z, x, y (E each), B + C, dt
    return 2 * (cp - 1) / cp * t * batch * act_bytes * width


def input_all_gather_bytes(d_model: int, batch: int, length: int, cp: int, act_bytes: int) -> float:
    """All-gather of the layer input [L, B, D] forward, reduce-scatter of its gradient."""
    row = length * batch * d_model * act_bytes  # the whole gathered input
    return (cp - 1) * row / cp + (cp - 1) / cp * row


# ------------------------------------------------------------------------------ traffic, counted


def _ssm_traffic_rank(
    rank: int, world: int, shape: dict, chunk_size: int, lengths: list[int], batch: int, out: str
) -> None:
    """Forward + backward of one ``Mamba2Mixer`` slice per length; rank 0 writes every rank's
    ``CommStats`` bytes."""
    torch.manual_seed(0)  # every rank the same weights
    ssm = SSMShape(**shape)
    width = math.gcd(COUNT_WIDTH, ssm.d_inner)
    mixer = Mamba2Mixer(width, ssm.mixer_config(width, chunk_size)).train()
    stats = CommStats()
    comm = ContextGroup(dist.group.WORLD, stats)
    counts = []
    for length in lengths:
        context = SequenceContext.of_slice(None, batch, length, comm, torch.device("cpu"))
        gen = torch.Generator().manual_seed(1000 * rank + length)
        x = torch.randn(batch, context.slice_len, width, generator=gen, requires_grad=True)
        y = context.comm.tie(mixer(x, context=context))  # the context's own token chain
        y.square().mean().backward()
        counts.append(
            {"length": length, "bytes": dict(stats.bytes), "messages": dict(stats.messages)}
        )
        stats.reset()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, counts)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))


def count_ssm_traffic(
    shape: SSMShape, lengths: Sequence[int], world: int, batch: int, chunk_size: int, tmp: Path
) -> list[dict]:
    """Counted bytes per rank of the real mixer's CP path on ``world`` gloo ranks, next to the
    formula (fp32 on CPU: activation bytes 4), one record per length."""
    out = tmp / f"ssm_traffic_{world}.json"
    run_on_ranks(
        world, _ssm_traffic_rank, asdict(shape), chunk_size, list(lengths), batch, str(out)
    )
    per_rank = json.loads(out.read_text())  # [rank][length index]
    records = []
    for i, length in enumerate(lengths):
        counted = [per_rank[r][i]["bytes"] for r in range(world)]
        formula = [ssm_state_passing_bytes(shape, batch, world, r, FP32) for r in range(world)]
        records.append(
            {
                "length": length,
                "cp": world,
                "slice_len": length // world,
                "counted_per_rank": counted,
                "messages_per_rank": [per_rank[r][i]["messages"] for r in range(world)],
                "formula_per_rank": formula,
                "counted_equals_formula": counted == formula,
            }
        )
    return records


# ------------------------------------------------------------------------------ saved tensors


class SavedBytes:
    """Bytes autograd saves for backward while installed: unique storages (kept alive so that
    no address is reused), the storages of ``exclude`` (the parameters) left out, plus bytes
    added by hand (``add_bytes``, what a GPU kernel would save)."""

    def __init__(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._kept: dict[int, torch.Tensor] = {}
        self.extra = 0

    def add(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr not in self._excluded:
            self._kept.setdefault(ptr, t)
        return t

    def add_bytes(self, nbytes: int) -> None:
        self.extra += int(nbytes)

    @property
    def total(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self._kept.values()) + self.extra

    def tensors(self) -> list[tuple[tuple[int, ...], str, int]]:
        """(shape, dtype, storage bytes) of every counted storage, for inspection."""
        return [
            (tuple(t.shape), str(t.dtype), t.untyped_storage().nbytes())
            for t in self._kept.values()
        ]

    @contextlib.contextmanager
    def installed(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self.add, lambda t: t):
            yield self


@contextlib.contextmanager
def _not_counted() -> Iterator[None]:
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        yield


@contextlib.contextmanager
def gpu_kernel_saves(recorder: SavedBytes) -> Iterator[None]:
    """Run the pure-PyTorch SSD scan and sparse global attention, but count what the GPU
    kernels save instead of what the references save.

    ``mamba_ssm`` (``MambaChunkScanCombinedFn``) keeps x, dt, B, C (our op passes B and C through
    ``.contiguous()``: copies of the conv-output views), its output y and dA_cumsum [b, H, T] fp32;
    FlexAttention keeps q, k, v (with summaries: the token + summary keys/values it is given), its
    output [b, H, T, K] and the log-sum-exp [b, H, T] fp32.
    """
    ssd, sga = ssm_module.ssd_scan, attention_module.sparse_global_attention

    def scan(x, dt, A, B, C, chunk_size, initial_state=None, seq_idx=None, backend="torch"):  # noqa: ANN001, N803
        with _not_counted():
            y, final = ssd(x, dt, A, B, C, chunk_size, initial_state, seq_idx, backend="torch")
        recorder.add(x)
        recorder.add(dt)
        for t in (B, C):
            if t.is_contiguous():
                recorder.add(t)
            else:  # a copy
                recorder.add_bytes(_nbytes(t))
        b, length, heads = dt.shape
        recorder.add_bytes(_nbytes(y) + FP32 * b * heads * length)
        return y, final

    def attend(q, k, v, summaries, **kwargs):  # noqa: ANN001
        with _not_counted():
            # FlexAttention's output is [b, H, T, K] seen through a transpose: so is this one
            out = sga(q, k, v, summaries, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)
        recorder.add(q)
        n_sum = summaries.end.shape[1] if summaries is not None and kwargs.get("n_global", 0) else 0
        if n_sum:  # the op concatenates the summaries to the tokens' keys and values
            per_key = k.shape[0] * k.shape[2] * k.shape[3] * k.element_size()
            recorder.add_bytes(2 * (k.shape[1] + n_sum) * per_key)
        else:
            recorder.add(k)
            recorder.add(v)
        b, length, heads, _ = q.shape
        recorder.add_bytes(_nbytes(out) + FP32 * b * heads * length)
        return out

    ssm_module.ssd_scan, attention_module.sparse_global_attention = scan, attend
    try:
        yield
    finally:
        ssm_module.ssd_scan, attention_module.sparse_global_attention = ssd, sga


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def use_gpu_layout(model: torch.nn.Module) -> torch.nn.Module:
    """bf16 parameters (FSDP2's mixed precision) and grouped-GEMM experts, in place."""
    model.to(torch.bfloat16)
    for module in model.modules():
        if getattr(module, "kernel_op", None) == "moe":
            module.kernel_backend = "grouped_mm"
    return model


# ------------------------------------------------------------------------------ memory formulas


def path_bytes_per_token(m: ModelConfig, act_bytes: int = BF16) -> dict[str, float]:
    """Bytes each path of a Hydra block saves for backward per token (the module docstring's
    formula), in the GPU layout: bf16 parameters and autocast, the GPU kernels' save sets, rows
    with document ids (packed rows, and always under CP). Each path includes its RMSNorm and its
    gated output."""
    b, f, d = act_bytes, FP32, m.d_model
    norm = b * d + f  # RMSNorm (one op, recomputes in backward): x as it comes, 1/rms
    out = b * d  # the path's output, saved by its gate's multiply
    s = SSMShape.of(d, m.ssm)
    e, x, h, g, n = s.d_inner, s.conv_dim, s.n_heads, s.n_groups, s.d_state
    # the in_proj output (the conv saves its xbc view, the gated norm its z view: one storage)
    # and the int64 document ids the conv masks its taps with
    conv = b * (e + x + h) + 8
    scan = f * e + f * h + 2 * f * g * n  # mamba_ssm: y, dA_cumsum, B and C made contiguous
    gated_norm = f * e + f * g  # y (fp32) and 1/rms; z is the in_proj view counted above
    ssm = norm + b * d + conv + f * x + 2 * f * h + scan + gated_norm + b * e + out
    a = m.attention
    kh, hq = d // a.n_heads, a.n_heads
    hkv = a.n_kv_heads or hq
    flex = b * hq * kh + 2 * b * hkv * kh + b * hq * kh + f * hq  # q, k, v, out, lse
    attention = norm + b * d + f * kh + flex + b * hq * kh + out
    ffn = norm + b * d + 3 * b * m.d_ff + out
    mo = m.moe
    # per token (every token is routed on its unit start's logits: shapes static in T)
    router = b * d + 3 * f * mo.n_experts + 12 * mo.top_k + 3 * f
    # rows in and out, the expert hidden (w1 and w3 outputs, their gated product: silu_mul),
    # the pair weight, the int64 indices (the weighted scatter-add keeps no weighted copy)
    pair = 2 * 8 + 2 * b * d + 3 * b * mo.d_expert + f
    unit_start = 8 if mo.routing == "chunk" else 0  # the int64 gather index of chunk routing
    moe = norm + router + unit_start + mo.top_k * pair + out
    return {"ssm": ssm, "attention": attention, "ffn": ffn, "moe": moe}


def head_bytes_per_token(m: ModelConfig, act_bytes: int = BF16) -> float:
    """The token ids (embedding), the final norm, the head's input, the loss's fp32 log-softmax
    and the labels."""
    return 8 + 2 * FP32 * m.d_model + FP32 + act_bytes * m.d_model + FP32 * m.vocab_size + 8


def row_extra_bytes(
    m: ModelConfig, length: int, cp: int, rank: int, act_bytes: int = BF16
) -> dict[str, float]:
    """Per layer on rank ``rank``, what comes on top of T x ``path_bytes_per_token``: the chunk
    summaries (rows longer than the window), and under CP the attention frame and the SSM's
    incoming-state correction."""
    b, f, d, t = act_bytes, FP32, m.d_model, length // cp
    a = m.attention
    kh, hq = d // a.n_heads, a.n_heads
    hkv = a.n_kv_heads or hq
    attention = 0.0
    if a.n_global > 0 and length > a.window:
        n_sum = (length - 1) // a.summary_chunk  # visible_chunk_summaries' slots
        # the int64 row index k and v are pooled by (index_select keeps no input for backward;
        # the element-wise gather it replaced kept the fp32 copies of k and v, 2 f Hkv Kh)
        pooling = t * 8
        attention += pooling + n_sum * (2 * b * hkv * kh + 8)  # + the summaries' k, v, counts
    if cp == 1:
        return {"attention": attention, "ssm": 0.0}
    attention += (a.window - 1) * (2 * b * hq * kh + 2 * b * hkv * kh + f * hq)  # the frame
    s = SSMShape.of(d, m.ssm)
    h, state = s.n_heads, s.n_heads * s.head_dim * s.d_state
    # the decays exp(cumsum(dt A)) [T, H] (kept by exp and, masked to the first document, by the
    # readout), the mask; the folded states (rank + 1 of them) and, from rank 2 on, the whole
    # gathered [cp, H P N + H] (kept by the fold's multiplies)
    correction = t * (2 * f * h + f)
    states = f * state * (rank + 1) + (f * cp * (state + h) if rank >= 2 else 0)
    return {"attention": attention, "ssm": correction + states}


def layer_paths(m: ModelConfig, layer: int) -> list[str]:
    """The path names of block ``layer`` (built on the meta device: no memory)."""
    from pretrain.models.hydra.block import hydra_block_paths

    with torch.device("meta"):
        return list(hydra_block_paths(m, layer))


def measure_path_bytes_per_token(
    m: ModelConfig, lengths: tuple[int, int] = (256, 512), blocks: bool = True
) -> dict[str, float]:
    """Saved bytes per token of each kind of path (and of each kind of block: ``block:<paths>``),
    as the slope between two lengths of one unsplit row with document ids, in the GPU layout
    (bf16 parameters and autocast, the GPU kernels' save sets). Paths and blocks get the input
    counted if anything saves it (nothing does: the norms save an fp32 copy)."""
    from pretrain.models.hydra.block import build_hydra_block

    first_layer: dict[str, int] = {}
    block_kinds: dict[str, int] = {}
    for layer in range(m.n_layers):
        names = layer_paths(m, layer)
        for name in names:
            first_layer.setdefault(name, layer)
        block_kinds.setdefault("+".join(names), layer)
    slopes: dict[str, float] = {}
    jobs = [(name, layer, [name]) for name, layer in first_layer.items()]
    if blocks:
        jobs += [(f"block:{kind}", layer, None) for kind, layer in block_kinds.items()]
    for key, layer, names in jobs:
        torch.manual_seed(0)
        block = use_gpu_layout(build_hydra_block(m, layer)).train()
        saved = [_block_saved_bytes(block, m.d_model, t, names) for t in lengths]
        slopes[key] = (saved[1] - saved[0]) / (lengths[1] - lengths[0])
    return slopes


def _block_saved_bytes(
    block: torch.nn.Module, d_model: int, length: int, names: list[str] | None
) -> int:
    x = torch.randn(1, length, d_model, dtype=torch.bfloat16, requires_grad=True)
    recorder = SavedBytes(list(block.parameters()))
    one_document = torch.zeros(1, length, dtype=torch.long)  # document ids given, as in training
    context = SequenceContext.whole(one_document, 1, length, x.device)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        gpu_kernel_saves(recorder),
        recorder.installed(),
    ):
        if names is None:
            keep = block(x, context=context)
        else:
            keep = [block._run_path(name, x, context) for name in names]
    del keep
    return recorder.total


def _saved_bytes_rank(
    rank: int,
    world: int,
    config: str,
    overrides: list[str],
    length: int,
    gpu_layout: bool,
    out: str,
) -> None:
    """One forward of the whole model on this rank's slice; rank 0 writes every rank's bytes."""
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    if gpu_layout:
        use_gpu_layout(model)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, length), generator=gen)
    comm = ContextGroup(dist.group.WORLD, CommStats())
    context = SequenceContext.of_slice(None, 1, length, comm, tokens.device)
    cols = slice(context.offset, context.offset + context.slice_len)
    recorder = SavedBytes([*model.parameters(), *model.buffers()])
    kernels = gpu_kernel_saves(recorder) if gpu_layout else contextlib.nullcontext()
    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=gpu_layout),
        kernels,
        recorder.installed(),
    ):
        keep = model(tokens[:, cols], context=context)
    del keep
    gathered: list = [None] * world
    dist.all_gather_object(gathered, recorder.total)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))


def measure_saved_bytes_cp(
    config: Path,
    overrides: list[str],
    length: int,
    worlds: Sequence[int],
    gpu_layout: bool,
    tmp: Path,
) -> dict[int, list[int]]:
    """Saved bytes of one forward per rank, for each number of context-parallel ranks."""
    result = {}
    for world in worlds:
        out = tmp / f"saved_{world}_{int(gpu_layout)}.json"
        run_on_ranks(world, _saved_bytes_rank, str(config), overrides, length, gpu_layout, str(out))
        result[world] = json.loads(out.read_text())
    return result


def saved_bytes_per_rank(
    m: ModelConfig,
    length: int,
    cp: int,
    rank: int,
    measured: dict[str, float],
    act_bytes: int = BF16,
) -> dict[str, float]:
    """The formula's bytes saved for backward on one rank, one row of ``length`` tokens.

    Args:
        m: the model config.
        length: L.
        cp: context-parallel ranks (T = L / cp).
        rank: which slice.
        measured: per-token bytes of the paths without a closed form here (``workspace``,
            ``pkm``), from ``measure_path_bytes_per_token``.
        act_bytes: bytes of an activation element (2: bf16).

    Returns:
        ``layers`` (no checkpointing), ``head`` (final norm, head, loss), ``total``, and
        ``checkpointed`` (one checkpoint per block: the block inputs plus the largest block,
        recomputed in backward, plus the head), ``largest_block``.
    """
    t = length // cp
    per_token = {**path_bytes_per_token(m, act_bytes), **measured}
    extra = row_extra_bytes(m, length, cp, rank, act_bytes)
    blocks = []
    for layer in range(m.n_layers):
        names = layer_paths(m, layer)
        blocks.append(sum(t * per_token[n] + extra.get(n, 0.0) for n in names))
    head = t * head_bytes_per_token(m, act_bytes)
    inputs = m.n_layers * t * act_bytes * m.d_model
    return {
        "layers": sum(blocks),
        "head": head,
        "total": sum(blocks) + head,
        "largest_block": max(blocks),
        "checkpointed": inputs + max(blocks) + head,
    }


def formula_slopes(
    m: ModelConfig, lengths: tuple[int, int], act_bytes: int = BF16
) -> dict[str, float]:
    """What ``measure_path_bytes_per_token`` should find for the paths with a closed form: the
    per-token bytes plus the slope of the unsplit row's extras (the summaries) between
    ``lengths``."""
    per_token = path_bytes_per_token(m, act_bytes)
    lo, hi = (row_extra_bytes(m, n, 1, 0, act_bytes) for n in lengths)
    span = lengths[1] - lengths[0]
    return {
        name: v + (hi.get(name, 0.0) - lo.get(name, 0.0)) / span for name, v in per_token.items()
    }


def compare_slopes(m: ModelConfig, measured: dict[str, float], lengths: tuple[int, int]) -> dict:
    """Measured slopes next to the formula's, paths and blocks (a block: the sum of its paths)."""
    formula = {**formula_slopes(m, lengths), **{k: measured[k] for k in MEASURED_ONLY}}
    rows = {}
    for key, value in measured.items():
        names = key.removeprefix("block:").split("+")
        # a block's paths (the memories run apart) read one input, which each path's norm
        # saves: one storage, not one per path
        paths = [n for n in names if n not in MEASURED_ONLY]
        shared_input = max(len(paths) - 1, 0) * BF16 * m.d_model
        predicted = None if key in MEASURED_ONLY else sum(formula[n] for n in names) - shared_input
        rows[key] = {
            "measured": value,
            "formula": predicted,
            "measured_over_formula": None if predicted is None else value / predicted,
        }
    return rows


# ------------------------------------------------------------------------------ the tables


def traffic_rows(
    shape: SSMShape, d_model: int, lengths: Sequence[int], cp: int, batch: int, counted: list[dict]
) -> list[dict]:
    """Per length: bytes per layer and step of the busiest rank for each scheme (bf16)."""
    verified = {r["length"] for r in counted if r["counted_equals_formula"]}
    rows = []
    for length in lengths:
        middle = ssm_state_passing_bytes(shape, batch, cp, 1, BF16)
        state = middle["cp/ssm_state/all_gather"] // (cp - 1)  # S
        total = ssm_state_passing_total(shape, batch, cp, BF16)
        rows.append(
            {
                "length": length,
                "slice_len": length // cp,
                "state_passing_bytes": total,
                "state_passing_breakdown": middle,
                "state_passing_source": (
                    "formula; counted = formula exactly at cp=2 and 4 for this L"
                    if length in verified
                    else "formula"
                ),
                # the same with a reduce-scatter as the all-gather's backward: (cp-1) S instead
                # of 2 (cp-1) S
                "state_passing_reduce_scatter_bwd_bytes": total - (cp - 1) * state,
                "megatron_all_to_all_bytes": megatron_all_to_all_bytes(
                    shape, batch, length, cp, BF16
                ),
                "input_all_gather_bytes": input_all_gather_bytes(d_model, batch, length, cp, BF16),
            }
        )
    return rows


def memory_breakdown(
    m: ModelConfig, length: int, cp: int, rank: int, measured: dict[str, float]
) -> dict[str, float]:
    """GiB per kind of path over all layers (T x per token), the head, and the per-row extras."""
    t = length // cp
    per_token = {**path_bytes_per_token(m), **measured}
    extra = row_extra_bytes(m, length, cp, rank)
    parts: dict[str, float] = {}
    for layer in range(m.n_layers):
        for name in layer_paths(m, layer):
            parts[name] = parts.get(name, 0.0) + t * per_token[name]
            if extra.get(name):
                key = f"{name}_row_extras"
                parts[key] = parts.get(key, 0.0) + extra[name]
    parts["head_and_loss"] = t * head_bytes_per_token(m)
    return {key: value / 2**30 for key, value in parts.items()}


def memory_rows(
    m: ModelConfig, lengths: Sequence[int], cp: int, measured: dict[str, float]
) -> list[dict]:
    """Per length: the formula's saved bytes on the lightest and the heaviest rank."""
    rows = []
    for length in lengths:
        per_rank = [saved_bytes_per_rank(m, length, cp, r, measured) for r in range(cp)]
        rows.append(
            {
                "length": length,
                "cp": cp,
                "slice_len": length // cp,
                "no_checkpointing_GiB": [
                    min(p["total"] for p in per_rank) / 2**30,
                    max(p["total"] for p in per_rank) / 2**30,
                ],
                "checkpointing_GiB": [
                    min(p["checkpointed"] for p in per_rank) / 2**30,
                    max(p["checkpointed"] for p in per_rank) / 2**30,
                ],
                "head_and_loss_GiB": per_rank[0]["head"] / 2**30,
                "largest_block_GiB": max(p["largest_block"] for p in per_rank) / 2**30,
                "heaviest_rank_breakdown_GiB": memory_breakdown(m, length, cp, cp - 1, measured),
            }
        )
    return rows


def plot(rows: list[dict], counted: list[dict], cp: int, path: Path) -> None:
    """Bytes per layer against L, log-log: the three schemes at ``cp``, counted points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = (  # (row key, line style, colour or None for the next one, label)
        ("state_passing_bytes", "o-", None, f"ours: SSM state passing (cp={cp}, formula)"),
        (
            "state_passing_reduce_scatter_bwd_bytes",
            ":",
            "C0",
            "ours with a reduce-scatter backward (formula)",
        ),
        ("megatron_all_to_all_bytes", "s-", None, f"Megatron head all-to-all (cp={cp}, formula)"),
        ("input_all_gather_bytes", "^-", None, f"all-gather of the layer input (cp={cp}, formula)"),
    )
    for key, style, color, label in series:
        extra = {"color": color} if color else {}
        ax.loglog(lengths, [r[key] for r in rows], style, label=label, **extra)
    for world, marker in ((2, "x"), (4, "+")):
        pts = [r for r in counted if r["cp"] == world]
        if pts:
            ys = [max(sum(c.values()) for c in r["counted_per_rank"]) for r in pts]
            ax.loglog(
                [r["length"] for r in pts],
                ys,
                marker,
                color="k",
                markersize=9,
                label=f"ours counted, cp={world}, fp32 on CPU (= formula)",
            )
    ax.set_xlabel("sequence length L (tokens)")
    ax.set_ylabel("bytes sent per rank, one layer, fwd + bwd")
    ax.set_title("hydra-1.6b Mamba-2 layer under context parallelism (batch 1, bf16)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def run_traffic(
    big: ModelConfig, cp: int, count_lengths: list[int], worlds: list[int], tmp: Path
) -> tuple[list[dict], list[dict]]:
    """Count the mixer's traffic on ``worlds`` gloo ranks; the per-length table at ``cp``."""
    shape = SSMShape.of(big.d_model, big.ssm)
    counted = []
    for world in worlds:
        counted += count_ssm_traffic(shape, count_lengths, world, 1, big.ssm.chunk_size, tmp)
    for r in counted:
        sent = max(sum(c.values()) for c in r["counted_per_rank"])
        ok = "yes" if r["counted_equals_formula"] else "NO"
        print(
            f"counted cp={r['cp']} L={r['length']:6d}: busiest rank {sent:>11,d} B, = formula: {ok}"
        )
    rows = traffic_rows(shape, big.d_model, LENGTHS, cp, 1, counted)
    print(f"\nper layer and step, busiest rank, cp={cp}, bf16 (MiB): L | ours | Megatron | gather")
    for r in rows:
        cells = " | ".join(f"{r[k] / 2**20:8.2f}" for k in TRAFFIC_KEYS)
        print(f"  {r['length']:6d} | {cells}")
    return counted, rows


TRAFFIC_KEYS = ("state_passing_bytes", "megatron_all_to_all_bytes", "input_all_gather_bytes")


def tiny_cp_rows(
    tiny: ModelConfig, length: int, memories: dict, gpu: dict, cpu: dict
) -> list[dict]:
    """The tiny model's saved bytes per rank (both layouts) next to the formula."""
    rows = []
    for world, per_rank in gpu.items():
        for rank, nbytes in enumerate(per_rank):
            formula = saved_bytes_per_rank(tiny, length, world, rank, memories)["total"]
            rows.append(
                {
                    "cp": world,
                    "rank": rank,
                    "gpu_layout_measured": nbytes,
                    "gpu_layout_formula": formula,
                    "measured_over_formula": nbytes / formula,
                    "gpu_layout_over_cp1": nbytes / gpu[1][0],
                    "cpu_fp32_measured": cpu[world][rank],
                    "cpu_fp32_over_cp1": cpu[world][rank] / cpu[1][0],
                }
            )
    return rows


def run_memory(big: ModelConfig, cp: int, lengths: list[int], tiny_length: int, tmp: Path) -> dict:
    """The per-token checks (1.6b widths, tiny), the tiny model under CP, the 1.6b table."""
    check = (256, 512)  # both lengths hold a workspace write
    big_slopes = measure_path_bytes_per_token(big, check, blocks=False)
    tiny = load_config(CONFIG_TINY).model
    tiny_slopes = measure_path_bytes_per_token(tiny, check)
    worlds = [1, 2, 4]
    gpu = measure_saved_bytes_cp(CONFIG_TINY, [], tiny_length, worlds, True, tmp)
    cpu = measure_saved_bytes_cp(CONFIG_TINY, [], tiny_length, worlds, False, tmp)
    tiny_memories = {k: tiny_slopes[k] for k in MEASURED_ONLY}
    memory = {
        "per_token_formula": {
            **path_bytes_per_token(big),
            "head_and_loss": head_bytes_per_token(big),
        },
        "per_token_check_1_6b": {
            "lengths": list(check),
            "rows": compare_slopes(big, big_slopes, check),
        },
        "per_token_check_tiny": {
            "lengths": list(check),
            "rows": compare_slopes(tiny, tiny_slopes, check),
        },
        "per_rank": memory_rows(big, lengths, cp, {k: big_slopes[k] for k in MEASURED_ONLY}),
        "tiny_cp_check": {
            "length": tiny_length,
            "rows": tiny_cp_rows(tiny, tiny_length, tiny_memories, gpu, cpu),
        },
    }
    print_memory(memory, cp)
    return memory


def print_memory(memory: dict, cp: int) -> None:
    print("\nsaved bytes per token at hydra-1.6b widths (measured slope | formula):")
    for key, r in memory["per_token_check_1_6b"]["rows"].items():
        formula = "measured only" if r["formula"] is None else f"{r['formula']:.1f}"
        print(f"  {key:10s} {r['measured']:10.1f} | {formula}")
    print(f"\nactivation memory per rank, hydra-1.6b, cp={cp}, one row (GiB, lightest..heaviest):")
    for r in memory["per_rank"]:
        (a, b), (c, d) = r["no_checkpointing_GiB"], r["checkpointing_GiB"]
        print(
            f"  L={r['length']:6d}  no checkpointing {a:6.1f}..{b:6.1f} | with {c:5.2f}..{d:5.2f}"
        )
    length = memory["tiny_cp_check"]["length"]
    print(f"\ntiny Hydra, L={length}, MiB per rank: cp rank | GPU layout (formula) | CPU fp32")
    for r in memory["tiny_cp_check"]["rows"]:
        gpu, formula = r["gpu_layout_measured"] / 2**20, r["gpu_layout_formula"] / 2**20
        cpu = r["cpu_fp32_measured"] / 2**20
        share, cpu_share = r["gpu_layout_over_cp1"], r["cpu_fp32_over_cp1"]
        print(
            f"  {r['cp']} {r['rank']} | {gpu:7.2f} ({formula:7.2f}, x{share:.3f})"
            f" | {cpu:7.2f} (x{cpu_share:.3f})"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="cp_volume.json")
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--cp", type=int, default=8, help="context-parallel ranks of the tables")
    parser.add_argument("--count-max-len", type=int, default=4096, help="longest counted L")
    parser.add_argument("--count-worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--tiny-length", type=int, default=1024, help="L of the tiny CP check")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    big = load_config(CONFIG_1_6B).model
    shape = SSMShape.of(big.d_model, big.ssm)
    count_lengths = [n for n in LENGTHS if n <= args.count_max_len]
    with tempfile.TemporaryDirectory() as tmp:
        counted, rows = run_traffic(big, args.cp, count_lengths, args.count_worlds, Path(tmp))
        memory = run_memory(big, args.cp, args.memory_lengths, args.tiny_length, Path(tmp))
    report = {
        "meta": {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "settings": {
            "config": "configs/hydra-1.6b.yaml",
            "cp": args.cp,
            "batch": 1,
            "activation_bytes": BF16,
            "ssm_shape": {**asdict(shape), "d_inner": shape.d_inner, "conv_dim": shape.conv_dim},
            "d_model": big.d_model,
            "counted_lengths": count_lengths,
            "counted_worlds": args.count_worlds,
            "counted_mixer_d_model": COUNT_WIDTH,
        },
        "traffic": {
            "rows": rows,
            "counted": counted,
            "all_counted_equal_formula": all(r["counted_equals_formula"] for r in counted),
        },
        "memory": memory,
        "wall_s": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1))
    plot(rows, counted, args.cp, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
