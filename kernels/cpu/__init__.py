"""Fused CPU kernels (C++, built on first use) for the elementwise chains PyTorch runs slowly."""

from kernels.cpu.native import describe, native_kernels, runs_natively

__all__ = ["describe", "native_kernels", "runs_natively"]
