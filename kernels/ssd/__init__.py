"""Mamba-2 SSD scan: pure-PyTorch references (sequential definition and chunked autograd form)
and the bounded-memory chunked CPU path."""

from kernels.ssd.chunked import ssd_scan_bounded
from kernels.ssd.ref import document_ids, ssd_scan_chunked, ssd_scan_sequential

__all__ = ["document_ids", "ssd_scan_bounded", "ssd_scan_chunked", "ssd_scan_sequential"]
