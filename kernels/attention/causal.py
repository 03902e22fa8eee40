"""Causal attention over packed documents (the Transformer baseline's attention).

Shape legend: b batch, T time, H query heads, Hkv key/value heads (GQA: Hkv divides H, each kv
head serves H / Hkv query heads), K head dim, W query block length (``QUERY_BLOCK`` or T).

The op (``document_causal_attention_ref`` defines it): query t attends to keys s <= t of its own
document, documents numbered as ``kernels.attention.ref.document_ids`` does (any change of
``seq_idx`` along T starts a new one). Every query sees itself, so no row is empty.

Paths of ``document_causal_attention``:

* no ``seq_idx``: ``scaled_dot_product_attention(is_causal=True)``, which runs the flash kernels
  where there are some (CPU and CUDA), no mask at all.
* ``torch`` (CPU, and CUDA without FlexAttention): queries in blocks of W = min(T, QUERY_BLOCK);
  block [s, e) attends with ``scaled_dot_product_attention`` to keys [0, e) only, under a
  [b, 1, W, e] causal same-document mask. Block boundaries depend on T alone (no host sync, no
  shape from the data), so the path traces with ``torch.compile(fullgraph=True)``. The largest
  mask is b * W * T booleans instead of the dense b * T * T, and the keys after a block's end
  are never scored (about half of the T x T products). SDPA's own autograd would keep each
  block's mask for its backward (the CPU kernel as an additive fp32 mask: b * T * (T + W) / 2 *
  4 bytes in all, 2.2 GB per layer at 32K); CPU training (fp32/fp64, no GQA, eager) therefore
  calls the CPU flash kernels through ``cpu_flash.attend_rebuilding_inputs``, which rebuilds
  the mask from the document ids in backward, so what is kept is O(T). The backward of each key/value prefix
  slice is still a zero-filled [b, Hkv, T, K] gradient (T / W of them per tensor).
* ``flex`` (CUDA): FlexAttention with a document-causal ``mask_mod``, compiled
  (``kernels.attention.flex.flex_over_keys``); its block mask skips every 128 x 128 tile that
  lies above the diagonal or between two documents, and no mask is materialised.

``backend="auto"`` takes ``flex`` on CUDA when this torch has FlexAttention and ``torch``
elsewhere, logged once per device type on the ``kernels`` logger.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from kernels.attention.cpu_flash import additive_mask, attend_rebuilding_inputs, runs_on_cpu_flash
from kernels.attention.flex import flex_over_keys
from kernels.attention.ref import document_ids
from kernels.backends import BackendUnavailableError, import_problem

logger = logging.getLogger("kernels")

# Queries per SDPA call of the blocked path. Measured on CPU (fwd + bwd, 8 heads of 64, packed
# rows): 1024 beats 512 and 768 from T = 2048 up (the CPU flash kernel tiles 768 or more query
# rows 256 at a time, fewer rows 64 at a time); T <= 1024 is one block.
QUERY_BLOCK = 1024
BACKENDS = ("auto", "torch", "flex")

# checked once at import, outside any compiled region
_FLEX_PROBLEM = import_problem("torch.nn.attention.flex_attention", "flex_attention")
_logged: set[str] = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete path (``torch`` or ``flex``) for ``backend`` on ``device``.

    Raises:
        ValueError: unknown backend name.
        BackendUnavailableError: ``flex`` asked for where it cannot train (CPU: no backward;
            a torch without FlexAttention).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown causal attention backend '{backend}'; known: {list(BACKENDS)}")
    cuda = device.type == "cuda"
    if backend == "flex" and (_FLEX_PROBLEM is not None or not cuda):
        reason = _FLEX_PROBLEM or f"needs a CUDA device (device is {device})"
        raise BackendUnavailableError("attention", "flex", reason)
    if backend != "auto":
        return backend
    chosen = "flex" if cuda and _FLEX_PROBLEM is None else "torch"
    if not torch.compiler.is_compiling() and device.type not in _logged:
        _logged.add(device.type)
        why = f"; flex: {_FLEX_PROBLEM}" if cuda and _FLEX_PROBLEM is not None else ""
        logger.info("causal attention over packed documents: %s (auto%s)", chosen, why)
    return chosen


def document_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
    block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """Causal attention in which packed documents do not see each other.

    Args:
        q: [b, T, H, K] queries.
        k, v: [b, T, Hkv, K] keys and values (Hkv divides H).
        seq_idx: [b, T] document numbers of packed rows; ``None``: one document per row.
        scale: score scale, default ``K ** -0.5``.
        backend: ``auto`` | ``torch`` (blocked SDPA) | ``flex`` (CUDA); unused without seq_idx.
        block: queries per SDPA call of the ``torch`` path.

    Returns:
        [b, T, H, K] in q's dtype.
    """
    _check_inputs(q, k, v, seq_idx)
    b, T, H, _ = q.shape
    gqa = k.shape[2] != H
    if seq_idx is None:
        q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, T, K]
        out = F.scaled_dot_product_attention(
            q_, k_, v_, is_causal=True, scale=scale, enable_gqa=gqa
        )
        return out.transpose(1, 2)
    doc = document_ids(seq_idx, b, T, q.device)  # [b, T]
    if resolve_backend(backend, q.device) == "flex":
        return _flex(q, k, v, doc, scale)
    return _blocked(q, k, v, doc, scale, block)


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor | None
) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2]:
        raise ValueError(f"q [b, T, H, K], k/v [b, T, Hkv, K] expected, got {q.shape}, {k.shape}")
    if q.shape[2] % k.shape[2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"Hkv must divide H and head dims agree: q {q.shape}, k {k.shape}")
    if seq_idx is not None and seq_idx.shape != q.shape[:2]:
        raise ValueError(f"seq_idx must be [b, T] = {tuple(q.shape[:2])}, got {seq_idx.shape}")


def _blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc: torch.Tensor,
    scale: float | None,
    block: int,
) -> torch.Tensor:
    """Query blocks of W = min(T, block) rows, each over keys [0, block end) (see module doc)."""
    T, gqa = q.shape[1], k.shape[2] != q.shape[2]
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, T, K]
    pos = torch.arange(T, device=q.device)
    W = min(T, block)
    outs = []
    # split, not slices: the backward of a slice is a zero-filled [b, H, T, K] per block, that of
    # split one cat. Keys and values stay prefix slices (one such tensor per block each).
    for i, q_blk in enumerate(q_.split(W, dim=2)):  # T is static: the same blocks for any packing
        s, e = i * W, min(T, (i + 1) * W)
        k_blk, v_blk = k_[:, :, :e], v_[:, :, :e]
        if runs_on_cpu_flash(q_blk, gqa):  # the mask rebuilt in backward, not kept
            build = functools.partial(_causal_block_inputs, start=s)
            outs.append(attend_rebuilding_inputs(build, q_blk, k_blk, v_blk, doc, scale=scale))
            continue
        mask = _block_mask(doc, pos, s, e)
        outs.append(
            F.scaled_dot_product_attention(
                q_blk, k_blk, v_blk, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2)


def _block_mask(doc: torch.Tensor, pos: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """[b, 1, e - s, e] True where query s + i may see key j: j <= s + i, same document."""
    causal = pos[None, :e] <= pos[s:e, None]  # [W, e]
    same_doc = doc[:, s:e, None] == doc[:, None, :e]  # [b, W, e]
    return (causal & same_doc)[:, None]


def _causal_block_inputs(
    k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor, *, start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values and the additive mask of the query block starting at ``start``."""
    e = k.shape[2]
    mask = _block_mask(doc, torch.arange(e, device=doc.device), start, e)
    return k, v, additive_mask(mask, k.dtype)


def _flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """FlexAttention under a document-causal ``mask_mod`` (compiled on CUDA)."""
    T = doc.shape[1]

    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        # clamped lookups: the tiles past T (T not a multiple of 128) never read out of bounds
        same_doc = doc[b, kv_idx.clamp(max=T - 1)] == doc[b, q_idx.clamp(max=T - 1)]
        return (kv_idx <= q_idx) & same_doc

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return flex_over_keys(q, k, v, mask_mod, scale)


def document_causal_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The op with one dense [b, 1, T, T] causal same-document mask (O(T^2) memory): the
    definition, and the path ``CausalSelfAttention`` took before the blocked one. Same
    arguments and result as ``document_causal_attention``."""
    _check_inputs(q, k, v, seq_idx)
    b, T, H, _ = q.shape
    doc = document_ids(seq_idx, b, T, q.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = causal & (doc[:, :, None] == doc[:, None, :])  # [b, T, T]
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q_, k_, v_, attn_mask=mask[:, None], scale=scale, enable_gqa=k.shape[2] != H
    )
    return out.transpose(1, 2)
