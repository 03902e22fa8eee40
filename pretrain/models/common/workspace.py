"""Workspace memory: M slots carried from chunk to chunk, read by tokens, then written.

Each document is cut into chunks of C tokens counted from the document's own start (chunk index =
position_in_document // C), so a packed row computes exactly what its documents compute alone.
Inside a document, for chunk c = 0, 1, ...:

1. read: every token of chunk c attends over the slots as left by chunks < c (the learned initial
   slots for c = 0); queries come from the tokens, keys/values from the slots. A token therefore
   sees no token of its own chunk (not even earlier ones) and nothing after it: causal.
2. write: the slots attend over the tokens of chunk c (slots are the queries) to get an update
   u, and take a GRU-like convex step ``slots' = (1 - g) * slots + g * u`` with a per-slot,
   per-channel gate ``g = sigmoid(W_g [norm(slots), u] + b_g)``. The convex step keeps the slots
   bounded over any number of chunks.

The recurrence runs over chunk "segments" (T/C steps plus one per extra document start); the reads
of all segments and the key/value projections of all tokens are batched, so the loop only does
the small slot-side work. Gradients flow through the whole recurrence. Nothing persists across
forward calls. A row has S <= ceil(T/C) + (documents - 1) segments, each padded to C positions;
only a document's last segment can be partial, and its write is never read, so the padding mask
in the write only keeps padding out of the arithmetic.

Shape legend: B batch, T time, D d_model, M slots, H heads, K = D/H head dim, C chunk size,
S segments per row (a segment = the tokens of one chunk of one document, padded to C positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention.ref import continued_chunk_ends
from pretrain.models.common.layers import RMSNorm
from pretrain.models.common.sequence import SequenceContext, resolve_context
from pretrain.models.config import WorkspaceConfig


@dataclass
class _Segments:
    """Where each token sits in the padded segment layout [B, S*C]."""

    flat_index: torch.Tensor  # [B, T] segment * C + position_in_chunk
    n_segments: int  # S
    token_valid: torch.Tensor  # [B, S, C] bool, a real token sits there
    starts_document: torch.Tensor  # [B, S] bool, the segment's first token starts a document


def _build_segments(
    doc_pos: torch.Tensor, chunk: int, one_document: bool, leading_segment: bool = False
) -> _Segments:
    """The segment layout of tokens at positions-in-document ``doc_pos`` [B, T].

    ``leading_segment`` (a context-parallel slice): segment 0 is the chunk that the slice's first
    tokens continue (it began on an earlier rank; those tokens join it); the slice's own chunks
    follow. ``one_document``: every row is one document starting at position 0.
    """
    batch, seq_len = doc_pos.shape
    in_chunk = doc_pos % chunk
    # every segment begins with a token at in-chunk position 0 (a chunk or a document start)
    segment = (in_chunk == 0).long().cumsum(dim=1) - (0 if leading_segment else 1)  # [B, T]
    if one_document and not leading_segment:
        n_segments = math.ceil(seq_len / chunk)
    else:
        n_segments = int(segment.max().item()) + 1  # shape-defining: one host sync per call
    flat_index = segment * chunk + in_chunk
    padded_pos = torch.full(
        (batch, n_segments * chunk), -1, dtype=doc_pos.dtype, device=doc_pos.device
    )
    padded_pos = padded_pos.scatter(1, flat_index, doc_pos).view(batch, n_segments, chunk)
    return _Segments(
        flat_index=flat_index,
        n_segments=n_segments,
        token_valid=padded_pos >= 0,
        starts_document=padded_pos[:, :, 0] == 0,
    )


@dataclass
class WorkspaceCache:
    """The workspace's decode state (``WorkspaceMemory.forward(..., cache=)`` updates it).

    ``slots`` [B, M, D] (fp32): the state the current chunk's tokens read. ``pending``
    [B, C - 1, 2D]: the write keys/values of the current chunk's tokens so far (its first
    ``pos % C`` rows); the chunk's last token completes them and the chunk writes.
    """

    slots: torch.Tensor
    pending: torch.Tensor


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Upcast to at least fp32 (fp64 stays fp64) for the slot state and softmaxes."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., D] -> [..., H, K]."""
    return x.unflatten(-1, (n_heads, x.shape[-1] // n_heads))


class WorkspaceMemory(nn.Module):
    """Chunk-recurrent slot memory; returns the read, which the block adds to the residual.

    Parameters: ``slots`` [M, D] (the initial slots), ``norm`` (tokens) and ``slot_norm`` (slots)
    RMSNorms, read projections ``read_q`` / ``read_kv`` / ``read_out``, write projections
    ``write_q`` / ``write_kv`` / ``write_out`` and the gate ``gate`` (2D -> D, with bias).
    The slot state is kept in fp32 under bf16 autocast.
    """

    # The block gives it the raw residual: it applies its own input RMSNorm (self.norm).
    normalizes_input = True

    def __init__(self, d_model: int, cfg: WorkspaceConfig, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if d_model % cfg.n_heads:
            raise ValueError(f"workspace n_heads={cfg.n_heads} does not divide d_model={d_model}")
        self.d_model = d_model
        self.n_slots = cfg.n_slots
        self.n_heads = cfg.n_heads
        self.chunk_size = cfg.chunk_size
        self.slots = nn.Parameter(torch.empty(cfg.n_slots, d_model))
        self.norm = RMSNorm(d_model, norm_eps)
        self.slot_norm = RMSNorm(d_model, norm_eps)
        self.read_q = nn.Linear(d_model, d_model, bias=False)
        self.read_kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.read_out = nn.Linear(d_model, d_model, bias=False)
        self.write_q = nn.Linear(d_model, d_model, bias=False)
        self.write_kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.write_out = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(2 * d_model, d_model, bias=True)
        self.init_weights()

    def init_weights(self, init_std: float = 0.02) -> None:
        """(Re)initialise every parameter.

        Initial slots ~ N(0, init_std) like embeddings (they are RMS-normalised before use, so
        only their directions matter at first); linears get a truncated normal of std
        ``init_std``; the gate bias starts at 0, so a write first moves a slot halfway to its
        update.
        """
        nn.init.normal_(self.slots, mean=0.0, std=init_std)
        self.norm.init_weights(init_std)
        self.slot_norm.init_weights(init_std)
        for lin in (
            self.read_q,
            self.read_kv,
            self.read_out,
            self.write_q,
            self.write_kv,
            self.write_out,
            self.gate,
        ):
            nn.init.trunc_normal_(lin.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.zeros_(self.gate.bias)

    def flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token of ``_forward_rows`` on rows of ``seq_len`` tokens.

        It writes S = (T - 1) // C chunks per row (the most that are ever read, whatever the
        packing). ``token_proj``: ``read_q`` and ``read_out`` of every token, ``write_kv`` of
        the S * C written tokens. ``slot_proj``: per write ``write_q``, ``write_out`` and the
        gate on the M slots, and ``read_kv`` of the 1 + S slot states read (the initial one
        and one per write); per row, so spread over its tokens. ``attention``: q.k and p.v of
        every token's read over M slots, computed for all T tokens against the initial slots
        and again for the S * C readers of a write, plus each write's M slot queries over its
        C tokens.
        """
        d, m, c = self.d_model, self.n_slots, self.chunk_size
        writes = max(seq_len - 1, 0) // c
        per_write = 2 * m * (d * d + d * d + 2 * d * d)  # write_q, write_out, gate (2D -> D)
        per_state = 2 * m * 2 * d * d  # read_kv (D -> 2D)
        return {
            "token_proj": 2 * 2 * d * d + 2 * 2 * d * d * writes * c / seq_len,
            "slot_proj": (writes * per_write + (1 + writes) * per_state) / seq_len,
            "attention": 2 * 2 * m * d * (seq_len + 2 * writes * c) / seq_len,
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (the sum of ``flops_breakdown``)."""
        return sum(self.flops_breakdown(seq_len).values())

    def cache_bytes(self, context_len: int, bytes_per_elem: int = 2) -> int:
        """Bytes kept per sequence to decode incrementally after ``context_len`` tokens.

        The decode state (``WorkspaceCache``): the slot state [M, D] in fp32 (4 bytes), which
        every token of the current chunk reads, and a buffer for the write keys/values
        [C - 1, 2D] of the current chunk's tokens (``bytes_per_elem`` each), which the write
        at the chunk's end attends over (its last token brings its own); the buffer has a fixed
        size rather than that of the tokens pending at exactly ``context_len``. (An online
        softmax over the fixed slot queries could keep [M, D] + [M, H] fp32 accumulators
        instead.)
        """
        slots = self.n_slots * self.d_model * 4
        pending = (self.chunk_size - 1) * 2 * self.d_model * bytes_per_elem
        return slots + pending

    def decode_state(
        self,
        batch: int,
        context_len: int = 0,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> WorkspaceCache:
        """The decode state of ``batch`` new sequences (the initial slots; the same size after
        any ``context_len``)."""
        device = device if device is not None else self.slots.device
        dtype = dtype if dtype is not None else self.write_kv.weight.dtype
        initial = _wide(self.slots).to(device)[None].expand(batch, -1, -1).clone()
        pending = torch.zeros(
            batch, self.chunk_size - 1, 2 * self.d_model, device=device, dtype=dtype
        )
        return WorkspaceCache(slots=initial, pending=pending)

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        *,
        context: SequenceContext | None = None,
        cache: WorkspaceCache | None = None,
    ) -> torch.Tensor:
        """Read the workspace for every token, writing it chunk by chunk.

        Args:
            x: [B, T, D] input (the residual stream).
            seq_idx: [B, T] int64 document ids of a packed row (non-decreasing), or None.
            context: the sequence context (replaces ``seq_idx``); a split one runs the slices of
                the context-parallel ranks one after another (``_forward_slice``).
            cache: decoding: x continues, at ``context.offset``, the one document whose state
                the cache holds; updated in place.

        Returns:
            [B, T, D] the read of each token, in ``x``'s dtype.
        """
        context = resolve_context(x, seq_idx, context)
        if cache is not None:
            return self._forward_cached(self.norm(x), context.offset, cache).to(x.dtype)
        if context.split:
            return self._forward_slice(x, context)
        return self._forward_rows(self.norm(x), context.doc_pos).to(x.dtype)

    def _forward_rows(self, x_n: torch.Tensor, doc_pos: torch.Tensor) -> torch.Tensor:
        """The recurrence of whole rows in shapes fixed by T alone (no host sync, one compiled
        graph whatever the packing).

        Only a full chunk whose document goes on after it is ever read after its write
        (``continued_chunk_ends``: at most (T - 1) // C of them), and the state after its
        write is read by exactly the next chunk of its document. So the loop runs over those
        slots; a document's first chunk starts from the initial slots; every token of a
        document's first chunk reads the initial slots, every other token the state written
        by the chunk before its own.
        """
        batch, seq_len, d_model = x_n.shape
        chunk, rows = self.chunk_size, torch.arange(batch, device=x_n.device)[:, None, None]
        ends = continued_chunk_ends(doc_pos, chunk)  # [B, S]
        written = ends < seq_len
        offsets = torch.arange(chunk, device=x_n.device)
        # the written chunks' tokens [B, S, C] (padding slots point at a valid, unread place)
        write_pos = (ends.clamp(max=seq_len - 1) - (chunk - 1)).clamp(min=0)[..., None] + offsets
        first_chunk = doc_pos.gather(1, write_pos[..., 0]) == 0  # [B, S]
        initial = _wide(self.slots)[None].expand(batch, -1, -1)  # [B, M, D]
        keys, vals = _heads(self.write_kv(x_n[rows, write_pos]), self.n_heads).chunk(2, dim=-1)
        state, after_write = initial, []
        # unbind, not keys[:, s]: the backward of a slice taken in the loop would build (and
        # add up) a zero gradient of the whole tensor per step, quadratic in T
        steps = zip(
            first_chunk[:, :, None, None].unbind(1),
            keys.unbind(1),
            vals.unbind(1),
            written[:, :, None].expand(-1, -1, chunk).unbind(1),
        )
        for starts, keys_s, vals_s, valid in steps:
            state = torch.where(starts, initial, state)
            state = self._write(state, keys_s, vals_s, valid)
            after_write.append(state)

        q = _heads(self.read_q(x_n), self.n_heads)  # [B, T, H, K]
        mixed = self._mix(q[:, None], initial[:, None])[:, 0]  # [B, T, D]: the initial read
        if after_write:
            # readers of write s: the next chunk of its document, ends[s] + 1 .. + C
            read_pos = ends[..., None] + 1 + offsets  # [B, S, C]
            safe = read_pos.clamp(max=seq_len - 1)
            expected = doc_pos.gather(1, ends.clamp(max=seq_len - 1))[..., None] + 1 + offsets
            reads = written[..., None] & (read_pos < seq_len)
            reads = reads & (doc_pos[rows, safe] == expected)
            later = self._mix(q[rows, safe], torch.stack(after_write, dim=1))  # [B, S, C, D]
            dump = torch.where(reads, read_pos, seq_len).flatten(1)  # non-readers: a spare row
            grid = torch.cat([mixed, mixed.new_zeros(batch, 1, d_model)], dim=1)
            index = dump[..., None].expand(-1, -1, d_model)
            grid = grid.scatter(1, index, later.flatten(1, 2).to(grid.dtype))
            mixed = grid[:, :seq_len]
        return self.read_out(mixed)

    def _forward_cached(self, x_n: torch.Tensor, pos: int, cache: WorkspaceCache) -> torch.Tensor:
        """Decoding: tokens x_n [B, T, D] at positions pos.. read the slots, a piece of one chunk
        at a time; a piece that completes its chunk writes it (the next chunk reads the
        result). -> the reads [B, T, D] (before the dtype cast)."""
        chunk, seq_len = self.chunk_size, x_n.shape[1]
        q = _heads(self.read_q(x_n), self.n_heads)  # [B, T, H, K]
        kv = self.write_kv(x_n)  # [B, T, 2D]
        reads, t = [], 0
        while t < seq_len:
            done = (pos + t) % chunk  # tokens of this chunk in earlier calls or pieces
            end = min(seq_len, t + chunk - done)
            reads.append(self._mix(q[:, None, t:end], cache.slots[:, None])[:, 0])
            if (pos + end) % chunk:
                cache.pending[:, done : done + end - t] = kv[:, t:end]
            else:
                tokens = torch.cat([cache.pending[:, :done].to(kv.dtype), kv[:, t:end]], dim=1)
                keys, vals = _heads(tokens, self.n_heads).chunk(2, dim=-1)
                valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=x_n.device)
                cache.slots = self._write(cache.slots, keys, vals, valid)
            t = end
        return self.read_out(torch.cat(reads, dim=1))

    def _padded(self, x_n: torch.Tensor, seg: _Segments) -> torch.Tensor:
        """Tokens [B, T, D] -> the padded segment layout [B, S, C, D]."""
        batch, seq_len, d_model = x_n.shape
        index = seg.flat_index[..., None].expand(batch, seq_len, d_model)
        padded = x_n.new_zeros(batch, seg.n_segments * self.chunk_size, d_model)
        return padded.scatter(1, index, x_n).view(batch, seg.n_segments, self.chunk_size, d_model)

    def _gather_reads(
        self, padded: torch.Tensor, states: torch.Tensor, seg: _Segments
    ) -> torch.Tensor:
        """The read of every token [B, T, D] from the segment layout."""
        batch, n_seg, chunk, d_model = padded.shape
        read = self._read(padded, states).reshape(batch, n_seg * chunk, d_model)
        index = seg.flat_index[..., None].expand(batch, seg.flat_index.shape[1], d_model)
        return read.gather(1, index)

    # ------------------------------------------------------------------ context parallel

    def _forward_slice(self, x: torch.Tensor, context: SequenceContext) -> torch.Tensor:
        """The recurrence is not affine in the slots (softmax, gate), so the slices run one after
        another: in turn r, rank r continues from the carry of rank r - 1 and hands its own to
        rank r + 1 (one message per turn, ``size - 1`` per layer; the backward mirrors them).

        The carry is the state read by the slice's last segment plus that segment's tokens (a
        chunk may continue on the next rank, whose write then needs them): [B, M*D + C*D + C].
        Every rank takes part in every turn (the collectives' order token makes each turn's
        backward run on every rank, in reverse order).
        """
        batch, seq_len, d_model = x.shape
        chunk = self.chunk_size
        seg = _build_segments(context.doc_pos, chunk, one_document=False, leading_segment=True)
        x_n = self.norm(x)
        initial = _wide(self.slots)[None].expand(batch, -1, -1)  # [B, M, D]
        no_tokens = initial.new_zeros(batch, chunk * d_model + chunk)
        carry = torch.cat([initial.flatten(1), no_tokens], dim=1)
        reads = None
        for turn in range(context.comm.size):
            if turn == context.comm.rank:
                reads, out = self._slice_turn(x_n, seg, carry, initial)
            else:
                out = carry  # not this rank's turn: pass on what it has
            carry = context.comm.pass_on(out, turn, "workspace_carry")
        return reads.to(x.dtype)

    def _slice_turn(
        self, x_n: torch.Tensor, seg: _Segments, carry: torch.Tensor, initial: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's recurrence from the incoming carry -> (reads [B, T, D], outgoing carry)."""
        batch, _, d_model = x_n.shape
        chunk, n_slots = self.chunk_size, self.n_slots
        state_in, tokens_in, valid_in = carry.split(
            [n_slots * d_model, chunk * d_model, chunk], dim=1
        )
        tokens_in = tokens_in.view(batch, 1, chunk, d_model).to(x_n.dtype)
        valid_in = valid_in.view(batch, 1, chunk) > 0.5
        padded = self._padded(x_n, seg)
        # the continued chunk: earlier ranks' tokens at its first in-chunk positions, ours after
        padded = torch.cat([padded[:, :1] + tokens_in, padded[:, 1:]], dim=1)
        valid = torch.cat([seg.token_valid[:, :1] | valid_in, seg.token_valid[:, 1:]], dim=1)
        seg = replace(seg, token_valid=valid)
        states, last_write = self._run_slots(
            padded, seg, state_in.view(batch, n_slots, d_model), initial, write_last=True
        )
        # The last write is read by nobody here (the next rank redoes it with the whole chunk),
        # but every rank must give every write parameter a gradient, zero or not: FSDP2
        # reduce-scatters only the parameters that have one, and the ranks must agree.
        never = torch.zeros((), dtype=torch.bool, device=x_n.device)
        tie = torch.where(never, last_write.sum(), 0.0)
        reads = self._gather_reads(padded, states, seg) + tie.to(x_n.dtype)
        # the segment of each row's last token (rows with fewer segments end in empty padding
        # segments, whose writes must not reach the next rank)
        last = (seg.flat_index[:, -1] // chunk)[:, None]  # [B, 1]
        rows = torch.arange(batch, device=x_n.device)[:, None]
        out = torch.cat(
            [
                states[rows, last].flatten(1),
                padded[rows, last].flatten(1).to(states.dtype),
                valid[rows, last].flatten(1).to(states.dtype),
            ],
            dim=1,
        )
        return reads, out

    # ------------------------------------------------------------------ the recurrence

    def _run_slots(
        self,
        tokens: torch.Tensor,
        seg: _Segments,
        state_in: torch.Tensor | None = None,
        initial: torch.Tensor | None = None,
        write_last: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The chunk recurrence: the slot state each segment reads, [B, S, M, D] (fp32 or wider).

        Args:
            tokens: [B, S, C, D] normalised tokens in the padded segment layout.
            seg: the segment layout.
            state_in: [B, M, D] state read by the first segment (default: the initial slots).
            initial: [B, M, D] the initial slots, where documents start (default: computed).
            write_last: also run the last segment's write and return its result [B, M, D].
        """
        batch = tokens.shape[0]
        if initial is None:
            initial = _wide(self.slots)[None].expand(batch, -1, -1)  # [B, M, D]
        keys, vals = _heads(self.write_kv(tokens), self.n_heads).chunk(2, dim=-1)  # [B, S, C, H, K]
        state = initial if state_in is None else state_in
        states = []
        steps = zip(  # unbind: see _forward_rows
            seg.starts_document[:, :, None, None].unbind(1),
            keys.unbind(1),
            vals.unbind(1),
            seg.token_valid.unbind(1),
        )
        for s, (starts, keys_s, vals_s, valid) in enumerate(steps):
            state = torch.where(starts, initial, state)
            states.append(state)
            if s + 1 < seg.n_segments or write_last:  # else read by nobody: skipped
                state = self._write(state, keys_s, vals_s, valid)
        if write_last:
            return torch.stack(states, dim=1), state
        return torch.stack(states, dim=1)

    def _write(
        self, state: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """One gated write of a segment's tokens into the slots.

        Args:
            state: [B, M, D] fp32 slots before the write.
            keys, vals: [B, C, H, K] projections of the segment's tokens.
            valid: [B, C] bool, real tokens (padding is masked out).

        Returns:
            [B, M, D] fp32 slots after the write.
        """
        state_n = self.slot_norm(state)
        q = _heads(self.write_q(state_n), self.n_heads)  # [B, M, H, K]
        scores = _wide(torch.einsum("bmhk,bchk->bhmc", q, keys)) / math.sqrt(q.shape[-1])
        # A finite fill keeps a fully padded segment NaN-free (its result is never read).
        scores = scores.masked_fill(~valid[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1).to(vals.dtype)
        mixed = torch.einsum("bhmc,bchk->bmhk", probs, vals).flatten(-2)  # [B, M, D]
        update = self.write_out(mixed)
        g = torch.sigmoid(_wide(self.gate(torch.cat((state_n.to(update.dtype), update), dim=-1))))
        return (1.0 - g) * state + g * update.to(state.dtype)

    def _read(self, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Tokens of each segment attend over the slots that segment reads.

        Args:
            tokens: [B, S, C, D] normalised tokens.
            states: [B, S, M, D] fp32 slot state read by each segment.

        Returns:
            [B, S, C, D] the reads.
        """
        q = _heads(self.read_q(tokens), self.n_heads)  # [B, S, C, H, K]
        return self.read_out(self._mix(q, states))

    def _mix(self, q: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Queries [B, S, C, H, K] attend over the slots [B, S, M, D] -> [B, S, C, D] (before
        ``read_out``)."""
        keys, vals = _heads(self.read_kv(self.slot_norm(states)), self.n_heads).chunk(2, dim=-1)
        scores = _wide(torch.einsum("bschk,bsmhk->bshcm", q, keys)) / math.sqrt(q.shape[-1])
        probs = F.softmax(scores, dim=-1).to(vals.dtype)
        return torch.einsum("bshcm,bsmhk->bschk", probs, vals).flatten(-2)
