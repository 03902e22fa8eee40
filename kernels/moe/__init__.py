"""Mixture-of-experts expert compute: a loop reference, a sorted dropless CPU path, grouped_mm."""

from kernels.moe.ref import (
    grouped_mm_problem,
    moe_experts_grouped_mm,
    moe_experts_loop_ref,
    moe_experts_sorted,
)

__all__ = [
    "grouped_mm_problem",
    "moe_experts_grouped_mm",
    "moe_experts_loop_ref",
    "moe_experts_sorted",
]
