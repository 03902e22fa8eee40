"""Wall time of one op's forward and backward spans within a training step, without host syncs.

On CUDA each span is a pair of events recorded on the stream (read, with a sync, only when the
time is asked for, at a logging step); on CPU a pair of ``perf_counter`` readings. The backward
span runs from the moment the op's output gradient is ready (a hook on the output) to the moment
its input gradient is (a hook on the input), so it covers the op's backward nodes, including any
collectives they run.
"""

from __future__ import annotations

import time

import torch


class SpanTimer:
    """Spans of the current step; ``end_step()`` closes the step, ``last_step_s()`` sums it."""

    def __init__(self) -> None:
        self._spans: list[tuple[object, object]] = []
        self._last: list[tuple[object, object]] = []

    @staticmethod
    def mark(device: torch.device) -> object:
        """A point in time: a recorded CUDA event on CUDA, ``perf_counter()`` elsewhere."""
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, start: object, end: object) -> None:
        self._spans.append((start, end))

    def time_backward(self, output: torch.Tensor, inp: torch.Tensor) -> None:
        """Time the backward from ``output``'s gradient to ``inp``'s (nothing if neither needs
        one)."""
        if not (output.requires_grad and inp.requires_grad):
            return
        started: list[object] = []
        output.register_hook(lambda grad: started.append(self.mark(grad.device)))

        def _stop(grad: torch.Tensor) -> None:
            if started:
                self.add(started.pop(), self.mark(grad.device))

        inp.register_hook(_stop)

    def end_step(self) -> None:
        """The spans recorded so far become the last step's; a new step starts empty."""
        self._last, self._spans = self._spans, []

    def last_step_s(self) -> float:
        """Seconds spent in the spans of the last closed step (syncs on CUDA)."""
        total = 0.0
        for start, end in self._last:
            if isinstance(start, float):
                total += end - start
            else:
                end.synchronize()
                total += start.elapsed_time(end) / 1e3
        return total
