"""SIGTERM / SIGINT -> a flag the loop checks once per step (then all ranks checkpoint and exit)."""

from __future__ import annotations

import signal
import threading


class StopSignal:
    """Install handlers that record a stop request instead of killing the process mid-step."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
