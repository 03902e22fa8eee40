"""Suite-wide setup that must happen before any test module is imported."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and any test module may import it
# (through kernels.backends or a benchmark script): set it before all of them on a CPU machine,
# so every Triton kernel test runs in the interpreter whatever the collection order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
