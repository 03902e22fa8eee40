"""Parallel dimensions of a run: how the world's ranks split into data, expert and context groups.

Layout (outermost first): ``dp_replicate x dp_shard x cp`` = world size. Expert parallelism
borrows its ranks from ``dp_shard`` (torchtitan's dp2ep, Megatron's expert-data-parallel): each
FSDP group of ``dp_shard`` ranks splits into ``dp_shard / ep`` expert-sharding groups ("efsdp")
of ``ep`` expert-parallel ranks, so EP costs no extra devices. Dense parameters are sharded over
``dp_shard`` (replicated over ``dp_replicate``: HSDP); expert parameters are split over ``ep`` and
sharded over ``efsdp`` (replicated over ``dp_replicate``). Context-parallel ranks (``cp``) split
each sequence; they also shard parameters: FSDP runs over ``dp_shard x cp`` (experts over
``efsdp x cp``).

``-1`` on one dimension fills it in from the world size. Everything is validated before anything
is built; ``layout_problems`` collects every problem, each naming its config keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# parallel dimensions (beyond plain data parallelism) each backend can run
BACKEND_SUPPORT = {
    "none": (),
    "ddp": ("cp",),
    "fsdp2": ("dp_replicate", "ep", "cp"),
    "deepspeed": (),
}
DIM_KEYS = ("dp_replicate", "dp_shard", "cp", "ep")
MESH_DIMS = ("dp_replicate", "efsdp", "cp", "ep")  # the device mesh's dimensions, outermost first
# the mesh dimensions a PKM value table can be split over (``parallel.pkm_shard``); the table
# is replicated over the others. ``fsdp``: the ranks that shard the dense parameters.
PKM_SHARD_DIMS = {
    "fsdp": ("efsdp", "cp", "ep"),
    "dp_shard": ("efsdp", "ep"),
    "efsdp": ("efsdp",),
    "ep": ("ep",),
    "cp": ("cp",),
    "none": (),
}


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each parallel dimension; their product (without ``ep``) is the world size."""

    dp_replicate: int = 1  # HSDP replicas: each holds a full FSDP-sharded copy
    dp_shard: int = 1  # FSDP ranks that shard the dense parameters
    cp: int = 1  # context-parallel ranks that split one sequence
    ep: int = 1  # expert-parallel ranks, carved out of dp_shard

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def dp_world(self) -> int:
        """Ranks that read different samples (the data reader shards over these)."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """Ranks that shard one expert's parameters (FSDP over experts inside an EP slice)."""
        return self.dp_shard // self.ep

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        """The one device mesh: (dp_replicate, efsdp, cp, ep)."""
        return (self.dp_replicate, self.efsdp, self.cp, self.ep)

    def size_of(self, mesh_dims: tuple[str, ...]) -> int:
        """Ranks along the named mesh dimensions (``mesh_shape``'s names) together."""
        sizes = dict(zip(MESH_DIMS, self.mesh_shape, strict=True))
        return math.prod(sizes[d] for d in mesh_dims)

    def describe(self) -> str:
        return (
            f"dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} (efsdp={self.efsdp} x"
            f" ep={self.ep}) cp={self.cp} -> world {self.world_size}"
        )


def _filled(sizes: dict[str, int], world_size: int | None, problems: list[str]) -> dict[str, int]:
    """Replace the one ``-1`` by what the world size leaves; record what cannot be filled."""
    unknown = [k for k, v in sizes.items() if v == -1]
    for key, value in sizes.items():
        if value < 1 and value != -1:
            problems.append(f"parallel.{key}={value}: must be >= 1 (or -1 to fill in)")
    if len(unknown) > 1:
        problems.append(
            f"parallel.{{{', '.join(unknown)}}} are all -1: at most one can be filled in from the"
            " world size"
        )
        return sizes
    if not unknown or world_size is None:
        return sizes
    (key,) = unknown
    known = {k: v for k, v in sizes.items() if k != key and k != "ep" and v >= 1}
    rest = math.prod(known.values())
    if key == "ep":
        fill = sizes["dp_shard"] if sizes["dp_shard"] >= 1 else 1
    elif world_size % rest:
        problems.append(
            f"parallel.{key}=-1: world size {world_size} is not a multiple of"
            f" {' x '.join(f'{k}={v}' for k, v in known.items())} = {rest}"
        )
        return sizes
    else:
        fill = world_size // rest
    return {**sizes, key: fill}


def layout_problems(
    sizes: dict[str, int],
    world_size: int | None,
    backend: str,
    n_experts: int | None,
) -> tuple[list[str], dict[str, int]]:
    """Every problem of a layout, each naming its keys; and the sizes with ``-1`` filled in.

    Args:
        sizes: ``{"dp_replicate", "dp_shard", "cp", "ep"}`` as configured (``-1`` allowed once).
        world_size: the launcher's world size; ``None`` checks what the config alone decides.
        backend: ``parallel.backend``.
        n_experts: experts per MoE layer, or None when the model has no MoE.
    """
    problems: list[str] = []
    sizes = _filled(dict(sizes), world_size, problems)
    rep, shard, cp, ep = (sizes[k] for k in DIM_KEYS)
    if ep > 1:
        if n_experts is None:
            problems.append(f"parallel.ep={ep}: the model has no MoE layers (model.moe)")
        elif n_experts % ep:
            problems.append(
                f"parallel.ep={ep} must divide model.moe.n_experts={n_experts} (each EP rank holds"
                " n_experts/ep experts)"
            )
        if shard >= 1 and shard % ep:
            problems.append(
                f"parallel.ep={ep} must divide parallel.dp_shard={shard}: EP ranks are carved out"
                " of the data-parallel (FSDP) ranks"
            )
    supported = BACKEND_SUPPORT.get(backend, ())
    for key, value in (("dp_replicate", rep), ("ep", ep), ("cp", cp)):
        if value > 1 and key not in supported:
            which = [b for b, dims in BACKEND_SUPPORT.items() if key in dims]
            problems.append(
                f"parallel.{key}={value} is not supported with parallel.backend={backend};"
                f" it needs parallel.backend={' or '.join(which)}"
            )
    if world_size is not None and min(rep, shard, cp) >= 1 and rep * shard * cp != world_size:
        problems.append(
            f"parallel.dp_replicate={rep} x parallel.dp_shard={shard} x parallel.cp={cp} ="
            f" {rep * shard * cp}, but the world size is {world_size}"
        )
    return problems, sizes
