"""No graph breaks and no host syncs in the blocks ``train.compile=true`` compiles.

Every family's blocks, every path switched on (MoE and workspace included), are compiled with
``fullgraph=True`` (a graph break, or a host sync that decides a shape, raises) and a packed
batch runs forward and backward through them, with the results of the eager model: logits,
every gradient, and the expert load the MoE layers record (counted once per forward, as in
eager). ``backend="eager"`` traces with Dynamo without Inductor's code generation, so this checks
the tracing, quickly, not the generated code; ``test_trainer_compile.py`` trains with Inductor.

The MoE runs on ``kernels.moe=grouped_mm`` (what ``auto`` picks on a GPU without megablocks):
the ``torch`` expert loop needs each expert's row count on the host, one graph break per MoE
layer.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from pretrain.models.kernel_backends import apply_kernel_backends
from tests.pretrain.model_helpers import SHRINK, build_from_config, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

T = 160

CONFIGS = {
    "transformer": ("transformer-29m.yaml",),
    "mamba2": ("mamba2-29m.yaml",),
    # SSM, sparse global attention, MoE, workspace, PKM: every component in 2 blocks (as the
    # trainer tests' FAST config), where the 4 of hydra-tiny are 3 distinct blocks to trace
    "hydra": (
        "hydra-tiny.yaml",
        "model.n_layers=2",
        "model.workspace.after_blocks=[1]",
        "model.pkm.after_blocks=[0]",
    ),
    # 2 of the 4 layers: cyclic chunking still gives an aligned layer and a shifted one
    # (offsets 0 and 2), and each distinct layer costs one more Dynamo trace
    "attamba": (
        "attamba-tiny.yaml",
        "model.moe.enabled=true",
        "model.attamba.use_moe=true",
        "model.n_layers=2",
    ),
    "dreamer": ("dreamer-tiny.yaml",),  # one shared layer looped over depth
}


def _packed(batch: int) -> torch.Tensor:
    seq_idx = torch.zeros(batch, T, dtype=torch.long)
    seq_idx[:, 50:] = 1
    seq_idx[-1, 97:] = 2
    return seq_idx


def _expert_load(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in model.named_buffers() if name.endswith("per_expert")}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_blocks_compile_fullgraph_and_match_eager(family: str) -> None:
    name, *overrides = CONFIGS[family]
    model = build_from_config(name, *overrides, *SHRINK.get(name, ()))
    apply_kernel_backends(model, {"moe": "grouped_mm"})
    model.train()
    ids, seq_idx = random_tokens(model, 2, T), _packed(2)
    eager = model(ids, seq_idx).logits
    eager.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    eager_load = _expert_load(model)
    model.zero_grad(set_to_none=True)
    for buf in eager_load:
        model.get_buffer(buf).zero_()

    torch._dynamo.reset()  # blocks of other families share code objects: start from no cache
    counters.clear()
    for block in model.blocks.values():
        block.compile(fullgraph=True, backend="eager")
    compiled = model(ids, seq_idx).logits
    compiled.square().mean().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did go through Dynamo
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert eager_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in eager_grads:
            torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    load = _expert_load(model)
    assert (family in ("hydra", "attamba", "dreamer")) == bool(load)
    for buf, counts in eager_load.items():
        assert counts.sum() > 0
        torch.testing.assert_close(load[buf], counts, rtol=0, atol=0, msg=buf)
