"""FLOP count per token, per component, for MFU and for predicted throughput ratios.

The count is of what the code executes, not of an idealised op: each path module reports the
matmuls its forward runs on its configured kernel backend at sequence length T. So: full [L, L]
squares where a kernel computes a square and masks it (the SSD chunk; a blocked causal attention
with T <= 1024 scores the whole T x T square on CPU); C.B^T once per B/C group, not per head; the
keys a blocked attention kernel actually scores (two blocks of the window plus the gathered
summaries), not the ones a query sees; projections per chunk or per slot where they run per
chunk (the workspace); rows padded to whole chunks or blocks. Matmuls count 2 FLOPs per
multiply-add. A few elementwise multiply-adds that stand where a matmul would are counted and
named (the SSM's depthwise ``conv`` and inter-chunk ``state_pass``, the PKM's ``lookup``, Dreamer's
depth ``scores``); other elementwise work (norms, activations, softmax, gating) is left out: it
is memory-bound and small next to the matmuls. The CPU paths are checked against
``torch.utils.flop_counter`` on real forward and backward runs of every family
(``tests/pretrain/test_flops_counter.py``); the GPU kernels that skip masked tiles (flex,
flash-attn) are counted at the keys a query sees, their tile rounding left out.

Training counts each part's real backward instead of a flat 3x forward: two products per forward
matmul (input and weight gradients) by default; every attention kernel here is flash-style and
recomputes q.k in backward (2.5x the forward's scores); the SSM adds what its backward
recomputes (the conv, and the scan pieces of its backend, ``ssm.SCAN_RECOMPUTED``); under
activation checkpointing every block's forward runs twice. So
``FlopCount.train_per_token`` counts executed (hardware) FLOPs: the trainer's ``hfu`` and the
throughput benchmarks use it; ``FlopCount.model_train_per_token`` (3x forward, recomputation not
counted) is the usual model-FLOPs convention behind the trainer's ``mfu``.

Per module (``path_breakdown``): ``flops_breakdown(seq_len) -> {part: forward FLOPs per token}``
(``flops_per_token`` is its sum), or ``flops_breakdown_for_runs(seq_len, runs)`` where the cost
of a run depends on the runs before it (Dreamer's depth attention), and optionally
``backward_flops_breakdown(seq_len)`` (default: 2x each forward part). A module reporting none
counts two FLOPs per weight.

``component_breakdown(model, seq_len, training=False)`` is the per-part view (the profiler's,
``benchmarks/profile_step.py``): keys ``"<path>.<part>"`` summed over the blocks, plus ``"head"``.
The parts: ``proj`` (SwiGLU); ``proj``, ``conv``, ``scan``, ``state_pass`` (SSM); ``qkv``,
``scores``, ``out`` (attention, depth attention); ``q``, ``kv_proj``, ``kv_conv``, ``kv_scan``,
``kv_state_pass``, ``scores``, ``out`` (Attamba); ``router``, ``experts`` (MoE, expert
attention); ``token_proj``, ``slot_proj``, ``attention`` (workspace); ``query``, ``search``,
``lookup``, ``out`` (PKM). E.g. ``"ssm.scan"``, ``"moe.experts"``, ``"attention.scores"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from pretrain.models.lm import CausalLM


def path_breakdown(module: nn.Module, seq_len: int, runs: float = 1.0) -> dict[str, float]:
    """Forward FLOPs per token of one block path run ``runs`` times, by part: its own
    ``flops_breakdown_for_runs(seq_len, runs)`` where the cost of a run depends on how many came
    before (depth attention), else ``runs`` times its ``flops_breakdown(seq_len)`` (or its
    ``flops_per_token`` as one part ``total``), or two per weight (``proj``) for a module that
    reports none (a plain per-token map)."""
    for_runs = getattr(module, "flops_breakdown_for_runs", None)
    if for_runs is not None:
        return for_runs(seq_len, runs)
    own = getattr(module, "flops_breakdown", None)
    if own is not None:
        return {part: runs * flops for part, flops in own(seq_len).items()}
    total = getattr(module, "flops_per_token", None)
    if total is not None:
        return {"total": runs * total(seq_len)}
    return {"proj": runs * 2.0 * sum(p.numel() for p in module.parameters())}


def path_backward_breakdown(module: nn.Module, seq_len: int, runs: float = 1.0) -> dict[str, float]:
    """Backward FLOPs per token of one block path run ``runs`` times, by part (the keys of
    ``path_breakdown``): ``runs`` times the module's ``backward_flops_breakdown(seq_len)`` (what
    its backward recomputes included), else two products per forward matmul, 2x each forward
    part (always so for a module whose runs cost differently, ``flops_breakdown_for_runs``)."""
    own = getattr(module, "backward_flops_breakdown", None)
    if own is not None and getattr(module, "flops_breakdown_for_runs", None) is None:
        return {part: runs * flops for part, flops in own(seq_len).items()}
    return {part: 2 * flops for part, flops in path_breakdown(module, seq_len, runs).items()}


def _active_paths(model: CausalLM, training: bool) -> Iterator[tuple[str, nn.Module, float]]:
    """(path name, module, runs per forward) of every active path of every block; a block the
    stack loops runs its R at evaluation or (``training``) at the next training step."""
    runs = model.stack.runs_per_forward(training)
    for block_name, block in model.blocks.items():
        for name, module in block.paths.items():
            if block.active.get(name, True):
                yield name, module, runs[block_name]


def _step_parts(model: CausalLM, module: nn.Module, seq_len: int, runs: float) -> dict[str, float]:
    """Training-step FLOPs per token of one path by part: forward, backward, and the forward
    again where activation checkpointing recomputes each block in backward."""
    fwd = path_breakdown(module, seq_len, runs)
    bwd = path_backward_breakdown(module, seq_len, runs)
    repeat = 2 if model.activation_checkpointing else 1
    return {part: repeat * flops + bwd[part] for part, flops in fwd.items()}


def _by_component(
    model: CausalLM, seq_len: int, training: bool, step: bool
) -> dict[str, dict[str, float]]:
    """{component: {part: FLOPs per token}}, paths summed over blocks, and ``head`` (part "").
    ``training``: the stack's settings of the next training step; ``step``: a training step's
    FLOPs (forward, backward, recomputation), else one forward's."""
    out: dict[str, dict[str, float]] = {}
    for name, module, runs in _active_paths(model, training):
        if step:
            parts = _step_parts(model, module, seq_len, runs)
        else:
            parts = path_breakdown(module, seq_len, runs)
        mine = out.setdefault(name, {})
        for part, flops in parts.items():
            mine[part] = mine.get(part, 0.0) + flops
    head = float(2 * model.cfg.vocab_size * model.cfg.d_model)  # D -> V
    out["head"] = {"": 3 * head if step else head}  # backward: input and weight gradients
    return out


def component_breakdown(model: CausalLM, seq_len: int, training: bool = False) -> dict[str, float]:
    """FLOPs per token of ``model`` at ``seq_len`` by part: ``"<path>.<part>"`` summed over the
    blocks (active paths only) plus ``"head"``.

    ``training=False``: one forward at evaluation settings; they sum to
    ``count_flops(model, seq_len).forward_per_token``. ``training=True``: one training step,
    forward + backward (+ recomputation), at the next training step's settings (a looped
    block's R); they sum to ``count_flops(model, seq_len, training=True).train_per_token``.
    """
    out = {}
    for name, parts in _by_component(model, seq_len, training, step=training).items():
        for part, flops in parts.items():
            out[f"{name}.{part}" if part else name] = flops
    return out


def component_flops_per_token(
    model: CausalLM, seq_len: int, training: bool = False
) -> dict[str, float]:
    """Forward FLOPs per token of each component of ``model`` at sequence length ``seq_len``.

    Components are the block paths (keyed by path name, active ones only) plus the head; a block
    that the stack runs several times per forward (a looped block) counts once per run, at
    evaluation settings or (``training``) at the next training step's (a looped block's R).
    """
    parts = _by_component(model, seq_len, training, step=False)
    return {name: sum(p.values()) for name, p in parts.items()}


@dataclass
class FlopCount:
    """FLOPs per token of one model at one sequence length.

    ``components``: forward FLOPs per component; ``train_components``: those of a training step
    (forward, backward and recomputation) per component.
    """

    forward_per_token: float
    components: dict[str, float]
    train_components: dict[str, float]

    @property
    def train_per_token(self) -> float:
        """FLOPs per token of a training step: each component's forward, real backward and
        recomputation (no flat 3x; see the module docstring)."""
        return sum(self.train_components.values())

    @property
    def model_train_per_token(self) -> float:
        """Model FLOPs per token of a training step, the MFU convention (PaLM's): forward plus a
        backward of two products per forward matmul, 3x forward, nothing recomputed counted."""
        return 3.0 * self.forward_per_token


def count_flops(model: CausalLM, seq_len: int, training: bool = False) -> FlopCount:
    """Forward and training FLOPs per token of ``model`` at ``seq_len`` (``training``: with
    the stack's per-step settings of the next training step, see ``component_flops_per_token``)."""
    parts = component_flops_per_token(model, seq_len, training)
    return FlopCount(
        forward_per_token=sum(parts.values()),
        components=parts,
        train_components={
            name: sum(p.values())
            for name, p in _by_component(model, seq_len, training, step=True).items()
        },
    )


# Dense bf16 peak of common accelerators, for MFU (TFLOP/s). CPU has no entry: MFU is not reported.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device by name, or None when unknown."""
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None
