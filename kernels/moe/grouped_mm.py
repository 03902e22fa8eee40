"""``grouped_mm`` as an opaque op that a compiled graph can trace on the CPU.

torch's own fake (shape) implementation of ``grouped_mm`` accepts bf16 only, as its CUDA kernel
does, while the CPU kernel computes fp32 too: so a CPU model in fp32, compiled, fails to trace.
``grouped_mm_traceable`` runs the same kernel behind a custom op whose fake only derives the
output shape, with the backward of torch's derivative formula (each gradient is again a grouped
matmul). The MoE uses it on the CPU only; on CUDA torch's op is traced as it is.

Shapes (``offs``: [G] int32 end of each group, empty groups allowed):
- ``a`` [M, K] and ``b`` [G, K, N]: rows of ``a`` grouped, group g times ``b[g]`` -> [M, N].
- ``a`` [K, M] and ``b`` [M, N] (the weight gradient): the shared dimension M grouped -> [G, K, N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TORCH_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@torch.library.custom_op("hydra_pretrain::grouped_mm", mutates_args=())
def grouped_mm_traceable(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch's ``grouped_mm(a, b, offs=offs)`` (see the module docstring for the shapes)."""
    if TORCH_GROUPED_MM is None:
        raise RuntimeError("this torch has neither torch.nn.functional.grouped_mm nor _grouped_mm")
    return TORCH_GROUPED_MM(a, b, offs=offs)


@grouped_mm_traceable.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's signature
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202 - torch.library's signature
    a, b, offs = ctx.saved_tensors
    if b.dim() != 3:
        raise NotImplementedError("grouped_mm_traceable: no backward of the weight-gradient form")
    grad = grad.contiguous()  # grouped_mm rejects zero-stride gradients (e.g. from y.sum())
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = grouped_mm_traceable(grad, b.transpose(-2, -1), offs)
    if ctx.needs_input_grad[1]:
        grad_b = grouped_mm_traceable(a.transpose(-2, -1), grad, offs)
    return grad_a, grad_b, None


grouped_mm_traceable.register_autograd(_backward, setup_context=_setup_context)
