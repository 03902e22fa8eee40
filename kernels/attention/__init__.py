"""Attention kernels: sparse global attention (local window + chunk summaries) and its reference."""

from kernels.attention.ref import (
    ChunkSummaries,
    build_chunk_summaries,
    document_ids,
    sparse_global_attention,
    sparse_global_attention_dense_ref,
    summary_visibility_dense,
)

__all__ = [
    "ChunkSummaries",
    "build_chunk_summaries",
    "document_ids",
    "sparse_global_attention",
    "sparse_global_attention_dense_ref",
    "summary_visibility_dense",
]
