"""Suite-wide setup (before any test module is imported) and shared fixtures."""

import os
from collections.abc import Iterator

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and any test module may import it
# (through kernels.backends or a benchmark script): set it before all of them on a CPU machine,
# so every Triton kernel test runs in the interpreter whatever the collection order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny ops: one intra-op thread avoids oversubscribing a shared 2-core machine.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
