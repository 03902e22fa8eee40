"""ParallelDims: filling in -1, and every impossible layout named by its keys (no processes)."""

from __future__ import annotations

import pytest

from parallel.dims import ParallelDims, layout_problems


def _sizes(**kw: int) -> dict[str, int]:
    return {"dp_replicate": 1, "dp_shard": -1, "cp": 1, "ep": 1, **kw}


@pytest.mark.parametrize(
    ("sizes", "world", "expected"),
    [
        (_sizes(), 1, ParallelDims()),
        (_sizes(), 4, ParallelDims(dp_shard=4)),
        (_sizes(ep=2), 4, ParallelDims(dp_shard=4, ep=2)),
        (_sizes(dp_replicate=-1, dp_shard=2, ep=2), 8, ParallelDims(4, 2, 1, 2)),
        (_sizes(dp_shard=4, ep=-1), 4, ParallelDims(dp_shard=4, ep=4)),
    ],
)
def test_fill_in(sizes: dict[str, int], world: int, expected: ParallelDims) -> None:
    problems, filled = layout_problems(sizes, world, "fsdp2", n_experts=8)
    assert problems == [] and ParallelDims(**filled) == expected


def test_mesh_views_of_a_layout() -> None:
    dims = ParallelDims(dp_replicate=2, dp_shard=4, ep=2)
    assert (dims.world_size, dims.dp_world, dims.efsdp) == (8, 8, 2)
    assert dims.mesh_shape == (2, 2, 1, 2)  # (dp_replicate, efsdp, cp, ep)


@pytest.mark.parametrize(
    ("sizes", "world", "backend", "n_experts", "names"),
    [
        (_sizes(dp_shard=3), 4, "fsdp2", 8, ["parallel.dp_shard=3", "world size is 4"]),
        (_sizes(ep=3), 6, "fsdp2", 8, ["parallel.ep=3", "model.moe.n_experts=8"]),
        (_sizes(dp_shard=2, ep=4), 2, "fsdp2", 8, ["parallel.ep=4", "parallel.dp_shard=2"]),
        (_sizes(ep=2), 2, "deepspeed", 8, ["parallel.backend=deepspeed", "fsdp2"]),
        (_sizes(dp_replicate=2), 2, "ddp", None, ["parallel.dp_replicate=2", "fsdp2"]),
        (_sizes(ep=2), 2, "fsdp2", None, ["no MoE layers"]),
        (_sizes(dp_replicate=-1), 4, "fsdp2", 8, ["at most one"]),
        (_sizes(dp_shard=0), 4, "fsdp2", 8, ["parallel.dp_shard=0"]),
        (_sizes(dp_replicate=3, dp_shard=-1), 4, "fsdp2", 8, ["not a multiple of"]),
    ],
)
def test_impossible_layouts_name_their_keys(
    sizes: dict[str, int], world: int, backend: str, n_experts: int | None, names: list[str]
) -> None:
    problems, _ = layout_problems(sizes, world, backend, n_experts)
    text = "\n".join(problems)
    for name in names:
        assert name in text, text
