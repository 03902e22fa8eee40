"""Mamba-2 mixer: input projection, causal depthwise conv, SSD scan, gated RMSNorm, output projection.

Shape legend: B batch, T time, D d_model, E d_inner (= expand * D), H SSM heads, P head dim
(E = H * P), G B/C groups, N state size, K conv width (d_conv), X conv channels (E + 2 * G * N).

Document resets (``seq_idx``) are exact in both the conv (taps into an earlier document read zero)
and the scan (the state restarts at zero), so a packed row equals its documents run one by one.
The SSM parameters (``A_log``, ``D``, ``dt_bias``), dt and the scan state stay fp32 under bf16
autocast (mamba_ssm issues #6, #352 show what happens otherwise); x, B and C enter a GPU scan
kernel (``triton``, ``mamba_ssm``) in bf16, the torch reference in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kernels.ssd import document_ids
from kernels.ssd.op import ssd_scan
from kernels.ssd.state_passing import incoming_state, initial_state_output, slice_decay
from pretrain.models.common.causal_conv import causal_conv_silu
from pretrain.models.common.fused_norm import rms_norm
from pretrain.models.common.sequence import SequenceContext
from pretrain.models.config import SSMConfig

# The pieces of the scan's forward (``Mamba2Mixer.scan_flops``) that each backend's backward
# recomputes from its saved inputs, for the FLOP count. torch (``kernels/ssd/chunked.py``): C.B^T,
# the chunk states, the entering states' read-out and the state pass, block by block; triton and
# mamba_ssm: C.B^T, the chunk states and the state pass (``kernels/ssd/triton_bwd.py``, mamba_ssm's
# ``_mamba_chunk_scan_combined_bwd``).
SCAN_RECOMPUTED: dict[str, tuple[str, ...]] = {
    "torch": ("cb", "chunk_state", "state_out", "state_pass"),
    "triton": ("cb", "chunk_state", "state_pass"),
    "mamba_ssm": ("cb", "chunk_state", "state_pass"),
}


class SSMState(NamedTuple):
    """What a mixer carries from one segment of a sequence to the next.

    ``ssm`` [B, H, P, N] (fp32) is the scan state after the last token; ``conv`` [B, K-1, X] holds
    the last K-1 conv inputs (zeros where they belong to an earlier document than the last one).
    """

    ssm: torch.Tensor
    conv: torch.Tensor


@dataclass
class SSMCache:
    """A mixer's decode state between calls (``Mamba2Mixer.forward(..., cache=)`` updates it):
    the scan state ``ssm`` [B, H, P, N] (fp32) and the last K-1 conv inputs ``conv`` [B, K-1, X]."""

    ssm: torch.Tensor
    conv: torch.Tensor


class GatedRMSNorm(nn.Module):
    """``rmsnorm(y * silu(z))`` over groups of ``group_size`` channels (Mamba-2's norm before out_proj).

    Computed in fp32 (fp64 for fp64 ``y``), and so is the result (the caller casts).
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        if dim % group_size:
            raise ValueError(f"group_size={group_size} must divide dim={dim}")
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self, init_std: float = 0.02) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z: [..., dim] -> [..., dim] fp32 (one op that saves y, z as they come and 1/rms,
        and recomputes the rest in backward: ``rms_norm``)."""
        out_dtype = torch.promote_types(y.dtype, torch.float32)
        return rms_norm(
            y, self.weight, self.eps, gate=z, group_size=self.group_size, out_dtype=out_dtype
        )


class Mamba2Mixer(nn.Module):
    """Mamba-2 (SSD) sequence mixer.

    Under context parallelism (a split ``context``) each rank scans its slice from a zero state,
    the ranks all-gather their (final state, total decay), and each corrects its outputs with the
    state folded from the slices before it (``kernels.ssd.state_passing``); the conv takes its
    K-1 inputs before the slice from the previous rank (a halo). Per layer and rank that moves
    one fp32 [B, H, P, N] state plus [B, H] decays and a [B, K-1, X] halo, whatever T is.
    """

    kernel_op = "ssd"  # which kernel backend setting applies (see kernels.backends)
    kernel_backend = "torch"  # set per instance by apply_kernel_backends

    def __init__(
        self, d_model: int, cfg: SSMConfig, norm_eps: float = 1e-5, d_out: int | None = None
    ) -> None:
        """``d_out``: width of the output (default d_model; Attamba's key/value scans project
        to the key/value width)."""
        super().__init__()
        d_inner = cfg.expand * d_model
        if d_inner % cfg.head_dim:
            raise ValueError(f"head_dim={cfg.head_dim} must divide d_inner={d_inner}")
        n_heads = d_inner // cfg.head_dim
        if n_heads % cfg.n_groups:
            raise ValueError(f"n_groups={cfg.n_groups} must divide n_heads={n_heads}")
        self.cfg = cfg
        self.d_model, self.d_inner, self.n_heads = d_model, d_inner, n_heads
        self.conv_dim = d_inner + 2 * cfg.n_groups * cfg.d_state
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + n_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=True
        )
        self.dt_bias = nn.Parameter(torch.empty(n_heads, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(n_heads, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(n_heads, dtype=torch.float32))
        self.norm = GatedRMSNorm(d_inner, d_inner // cfg.n_groups, eps=norm_eps)
        self.out_proj = nn.Linear(d_inner, d_out or d_model, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_std: float = 0.02) -> None:
        """(Re)initialise every parameter; works after ``to_empty()`` from the meta device."""
        nn.init.normal_(self.in_proj.weight, std=init_std)
        nn.init.normal_(self.out_proj.weight, std=init_std)
        self.conv1d.reset_parameters()
        cfg = self.cfg
        # dt log-uniform in [dt_min, dt_max]; dt_bias = softplus^-1(dt) = dt + log(1 - exp(-dt))
        u = torch.rand(self.n_heads, device=self.dt_bias.device, dtype=torch.float32)
        dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_min)  # exp/log rounding must not leave the range
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.empty_like(self.A_log).uniform_(cfg.a_init_min, cfg.a_init_max)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)
        self.norm.init_weights(init_std)

    def scan_flops(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token of the chunked SSD scan (``kernels.ssd.chunked``), by piece,
        for rows of ``seq_len`` tokens padded to whole chunks of L.

        ``cb``: C.B^T, one [L, L] square per chunk and B/C *group* (its heads share it);
        ``intra``: the masked scores @ x, per head, the full square (the causal mask is
        elementwise); ``chunk_state``: B^T x, each chunk's own final state; ``state_out``: C.h,
        the entering state read out at each position; ``state_pass``: h <- decay * h + state,
        chunk after chunk (a multiply-add per state element and chunk, no matmul).
        """
        cfg = self.cfg
        heads, groups, p, n = self.n_heads, cfg.n_groups, cfg.head_dim, cfg.d_state
        chunk = cfg.chunk_size
        chunks = math.ceil(seq_len / chunk)
        padded = chunks * chunk / seq_len  # computed positions per token
        return {
            "cb": 2 * groups * chunk * n * padded,
            "intra": 2 * heads * chunk * p * padded,
            "chunk_state": 2 * heads * p * n * padded,
            "state_out": 2 * heads * p * n * padded,
            "state_pass": 2 * heads * p * n * chunks / seq_len,
        }

    def flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token: ``proj`` (in/out projections), ``conv`` (K taps per channel,
        elementwise multiply-adds), ``scan`` (the scan's matmuls) and ``state_pass`` (its
        elementwise recurrence between chunks); see ``scan_flops``."""
        pieces = self.scan_flops(seq_len)
        state_pass = pieces.pop("state_pass")
        return {
            "proj": 2.0 * (self.in_proj.weight.numel() + self.out_proj.weight.numel()),
            "conv": 2.0 * self.conv1d.weight.numel(),
            "scan": sum(pieces.values()),
            "state_pass": state_pass,
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (the sum of ``flops_breakdown``)."""
        return sum(self.flops_breakdown(seq_len).values())

    def backward_flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """Backward FLOPs per token by part: two products per forward matmul (input and weight
        gradients; for the conv and the state pass, their multiply-adds backwards), plus what
        is recomputed instead of saved: the conv (``causal_conv_silu``) and the scan pieces of
        the backend (``SCAN_RECOMPUTED``)."""
        fwd = self.flops_breakdown(seq_len)
        out = {part: 2 * flops for part, flops in fwd.items()}
        out["conv"] += fwd["conv"]
        pieces = self.scan_flops(seq_len)
        for name in SCAN_RECOMPUTED.get(self.kernel_backend, ()):
            out["state_pass" if name == "state_pass" else "scan"] += pieces[name]
        return out

    def cache_bytes(self, context_len: int, bytes_per_elem: int = 2) -> int:
        """Bytes of one sequence's decode state (an ``SSMState``), whatever ``context_len`` is:
        the scan state [H, P, N] in fp32 (4 bytes) and the last K-1 conv inputs [K-1, X]."""
        ssm_state = self.n_heads * self.cfg.head_dim * self.cfg.d_state * 4
        conv_state = (self.cfg.d_conv - 1) * self.conv_dim * bytes_per_elem
        return ssm_state + conv_state

    def decode_state(
        self,
        batch: int,
        context_len: int = 0,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> SSMCache:
        """The zero decode state of ``batch`` sequences (its size does not depend on
        ``context_len``): fp32 scan state, conv inputs in ``dtype`` (the activations')."""
        cfg = self.cfg
        device = device if device is not None else self.A_log.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        return SSMCache(
            ssm=torch.zeros(
                batch, self.n_heads, cfg.head_dim, cfg.d_state, device=device, dtype=torch.float32
            ),
            conv=torch.zeros(batch, cfg.d_conv - 1, self.conv_dim, device=device, dtype=dtype),
        )

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        initial_state: torch.Tensor | None = None,
        conv_state: torch.Tensor | None = None,
        return_state: bool = False,
        *,
        context: SequenceContext | None = None,
        cache: SSMCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, SSMState]:
        """Mix along time.

        Args:
            x: [B, T, D] input.
            seq_idx: [B, T] document index per position, or None (one document per row).
            initial_state: [B, H, P, N] scan state left by the previous segment, or None (zeros).
            conv_state: [B, K-1, X] last conv inputs of the previous segment, or None (zeros).
                Both states continue the *first* document of each row: a caller whose row starts
                a new document must pass None (or zeros) for that row.
            return_state: also return the states after the last token.
            context: the sequence context; a split one (context parallelism) replaces
                ``seq_idx`` and the two states, which must then be None.
            cache: decoding: the states the previous call left (replacing ``initial_state``
                and ``conv_state``), updated in place to those after the last token.

        Returns:
            [B, T, D], or ([B, T, D], SSMState) when ``return_state``. Running a sequence in two
            segments, the second from the first's state, equals running it whole.
        """
        if cache is not None:
            seq = context.seq_idx if context is not None else seq_idx
            out, state = self.forward(x, seq, cache.ssm, cache.conv, return_state=True)
            cache.ssm, cache.conv = state.ssm, state.conv
            return out
        cfg, H, G = self.cfg, self.n_heads, self.cfg.n_groups
        split = context is not None and context.split
        if context is not None:
            seq_idx = context.seq_idx
        if split and (initial_state is not None or conv_state is not None or return_state):
            raise ValueError(
                "a split sequence context passes states itself: no states may be given"
            )
        z, xbc, dt_raw = self.in_proj(x).split([self.d_inner, self.conv_dim, H], dim=-1)
        doc = document_ids(seq_idx) if seq_idx is not None else None
        if split:
            conv_state = self._conv_halo(xbc, doc, context)
        scan_dtype = self._scan_dtype(x.device.type)  # read before autocast is turned off
        with torch.autocast(device_type=x.device.type, enabled=False):
            xbc_act = self._causal_conv(xbc, doc, conv_state)  # fp32, silu applied
            xs, b_in, c_out = xbc_act.split(
                [self.d_inner, G * cfg.d_state, G * cfg.d_state], dim=-1
            )
            xs = xs.unflatten(-1, (H, cfg.head_dim))  # [B, T, H, P]
            dt = F.softplus(dt_raw.float() + self.dt_bias.float())  # [B, T, H]
            A = -torch.exp(self.A_log.float())
            y, ssm_state = ssd_scan(
                xs.to(scan_dtype),
                dt,
                A,
                b_in.unflatten(-1, (G, cfg.d_state)).to(scan_dtype),
                c_out.unflatten(-1, (G, cfg.d_state)).to(scan_dtype),
                cfg.chunk_size,
                initial_state=None if initial_state is None else initial_state.float(),
                seq_idx=doc,
                backend=self.kernel_backend,
            )
            y = y.float()  # a bf16 scan's output joins the fp32 skip and the norm
            if split:
                y = y + self._incoming_state_output(ssm_state, dt * A, c_out, context).to(y.dtype)
            y = torch.addcmul(y, self.D.float()[:, None], xs)  # y + D x: one pass, no temporary
            y = self.norm(y.flatten(-2), z)
        out = self.out_proj(y.to(z.dtype))
        if not return_state:
            return out
        return out, SSMState(ssm=ssm_state, conv=self._next_conv_state(xbc, doc, conv_state))

    def _scan_dtype(self, device_type: str) -> torch.dtype:
        """The dtype x, B and C enter the scan in: the autocast dtype (bf16) when autocast is on
        and the backend is a GPU kernel, so its dots run on tensor cores with fp32 accumulation
        and an fp32 state (mamba_ssm's practice); fp32 otherwise (the torch reference, the CPU
        path). dt, A, D and the state stay fp32 on every backend."""
        if self.kernel_backend == "torch" or not torch.is_autocast_enabled(device_type):
            return torch.float32
        return torch.get_autocast_dtype(device_type)

    def _conv_halo(
        self, xbc: torch.Tensor, doc: torch.Tensor | None, context: SequenceContext
    ) -> torch.Tensor:
        """[B, K-1, X] conv inputs before the slice: the previous rank's last K-1 (those of the
        document that continues here; zeros in rows whose slice starts a document)."""
        if context.slice_len < self.cfg.d_conv - 1:
            raise ValueError(
                f"context-parallel slice of {context.slice_len} tokens is shorter than the conv"
                f" halo (ssm.d_conv - 1 = {self.cfg.d_conv - 1})"
            )
        halo = context.comm.shift(self._next_conv_state(xbc, doc, None), 1, "ssm_conv_halo")
        return halo * context.continues[:, None, None].to(halo.dtype)

    def _incoming_state_output(
        self,
        local_state: torch.Tensor,
        log_decay: torch.Tensor,
        c_out: torch.Tensor,
        context: SequenceContext,
    ) -> torch.Tensor:
        """[B, T, H, P] what the state carried in from earlier slices adds to this slice's y."""
        H = local_state.shape[1]
        first = context.first_document()
        decay = slice_decay(log_decay, first[:, -1])  # [B, H]; 0 unless one document passes
        packed = torch.cat([local_state.flatten(1), decay.to(local_state.dtype)], dim=1)
        gathered = context.comm.all_gather(packed, "ssm_state")  # [cp, B, H*P*N + H]
        states = gathered[..., :-H].unflatten(-1, local_state.shape[1:])
        h_in = incoming_state(states, gathered[..., -H:], context.comm.rank)
        c = c_out.unflatten(-1, (self.cfg.n_groups, self.cfg.d_state))
        return initial_state_output(c, log_decay, h_in, first)

    def _conv_prefix(self, xbc: torch.Tensor, conv_state: torch.Tensor | None) -> torch.Tensor:
        """[B, K-1, X] conv inputs before t = 0 (zeros when no state is given)."""
        k1 = self.cfg.d_conv - 1
        if conv_state is None:
            return xbc.new_zeros((xbc.shape[0], k1, self.conv_dim))
        if tuple(conv_state.shape) != (xbc.shape[0], k1, self.conv_dim):
            raise ValueError(
                f"conv_state must be [B, K-1, X] = {(xbc.shape[0], k1, self.conv_dim)},"
                f" got {tuple(conv_state.shape)}"
            )
        return conv_state.to(xbc.dtype)

    def _causal_conv(
        self, xbc: torch.Tensor, doc: torch.Tensor | None, conv_state: torch.Tensor | None
    ) -> torch.Tensor:
        """``silu`` of the depthwise causal conv, [B, T, X] -> [B, T, X] fp32; taps into an
        earlier document read zero (``causal_conv_silu``: taps accumulated in place, the conv
        recomputed in backward)."""
        prefix = None if conv_state is None else self._conv_prefix(xbc, conv_state)
        weight = self.conv1d.weight[:, 0, :]  # [X, K]; tap K-1 is position t
        return causal_conv_silu(xbc, weight, self.conv1d.bias, prefix, doc)

    def _next_conv_state(
        self, xbc: torch.Tensor, doc: torch.Tensor | None, conv_state: torch.Tensor | None
    ) -> torch.Tensor:
        """Last K-1 conv inputs [B, K-1, X], zeroed where they precede the last document."""
        K = self.cfg.d_conv
        padded = torch.cat([self._conv_prefix(xbc, conv_state), xbc], dim=1)
        state = padded[:, padded.shape[1] - (K - 1) :]
        if doc is None:
            return state
        doc_padded = torch.cat([doc[:, :1].expand(-1, K - 1), doc], dim=1)
        same = doc_padded[:, doc_padded.shape[1] - (K - 1) :] == doc[:, -1:]
        return state * same[..., None].to(state.dtype)
