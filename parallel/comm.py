"""Counting what goes through each process group: bytes and messages per group and operation.

The dispatchers and collectives of ``parallel/`` record every call here; the trainer logs and
resets the counts each step, and ``benchmarks/comm_volume.py`` checks them against formulas.
A message is one point-to-point transfer this rank sends (an all-to-all over n ranks sends n-1;
the rank's own slice is a local copy and not counted); bytes are what this rank sends.
"""

from __future__ import annotations

from collections import defaultdict


class CommStats:
    """Bytes and messages this rank sent, keyed by ``group/op``."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.messages: dict[str, int] = defaultdict(int)

    def add(self, key: str, nbytes: int, messages: int) -> None:
        self.bytes[key] += int(nbytes)
        self.messages[key] += int(messages)

    def metrics(self) -> dict[str, float]:
        """``comm/<group>/<op>/bytes`` and ``.../messages`` since the last ``reset``."""
        out: dict[str, float] = {}
        for key in sorted(self.bytes):
            out[f"comm/{key}/bytes"] = float(self.bytes[key])
            out[f"comm/{key}/messages"] = float(self.messages[key])
        return out

    def reset(self) -> None:
        self.bytes.clear()
        self.messages.clear()
