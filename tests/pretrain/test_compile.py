"""No graph breaks and no host syncs in the blocks ``train.compile=true`` compiles.

Each family's blocks are compiled with ``fullgraph=True`` (a graph break or a host sync that
decides a shape raises) and a packed batch runs forward and backward through them, with the
results of the eager model. ``backend="eager"`` traces with Dynamo without Inductor's code
generation, so this checks the tracing, quickly, not the generated code.

Not yet covered (and so not tested here): blocks with an MoE (the load count is recorded
eagerly, outside the graph, and CPU ``grouped_mm`` traces only in bf16). The workspace and the
sparse global attention are compiled alone in their own tests (``test_workspace.py``,
``tests/kernels/test_static_summaries.py``), since every Hydra block that has them has an MoE.
"""

from __future__ import annotations

import pytest
import torch

from tests.pretrain.model_helpers import SHRINK, build_from_config, random_tokens

T = 160


def _packed(batch: int) -> torch.Tensor:
    seq_idx = torch.zeros(batch, T, dtype=torch.long)
    seq_idx[:, 50:] = 1
    seq_idx[-1, 97:] = 2
    return seq_idx


@pytest.mark.parametrize(
    "name, blocks",
    [
        ("transformer-29m.yaml", None),
        ("mamba2-29m.yaml", None),
        ("attamba-tiny.yaml", None),
        # hydra-tiny's blocks without MoE or workspace: SSM + FFN, SSM + FFN + PKM (its attention
        # is compiled alone in tests/kernels/test_static_summaries.py)
        ("hydra-tiny.yaml", ("0", "2")),
    ],
)
def test_blocks_compile_fullgraph_and_match_eager(name: str, blocks: tuple | None) -> None:
    model = build_from_config(name, *SHRINK.get(name, ()))
    model.train()
    ids, seq_idx = random_tokens(model, 2, T), _packed(2)
    eager = model(ids, seq_idx).logits
    eager.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    chosen = [model.blocks[b] for b in blocks] if blocks else list(model.blocks.values())
    for block in chosen:
        block.compile(fullgraph=True, backend="eager")
    compiled = model(ids, seq_idx).logits
    compiled.square().mean().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in eager_grads:
            torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)
