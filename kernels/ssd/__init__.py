"""Mamba-2 SSD scan: pure-PyTorch references (sequential definition and chunked CPU path)."""

from kernels.ssd.ref import document_ids, ssd_scan_chunked, ssd_scan_sequential

__all__ = ["document_ids", "ssd_scan_chunked", "ssd_scan_sequential"]
