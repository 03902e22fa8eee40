"""One ``DeviceMesh`` for the whole run, and the sub-meshes each user of parallelism needs.

The mesh has four named dimensions, outermost first: ``dp_replicate``, ``efsdp``, ``cp``, ``ep``
(see ``parallel.dims``): EP innermost (its all-to-alls between neighbouring ranks, inside a node),
and ``cp`` next to ``efsdp`` so that both flatten into the one mesh that shards each EP rank's
experts (an expert DTensor lives on (dp_replicate, efsdp x cp, ep), dims in mesh order).
Flattened views built once from it:
- ``dp_shard`` = efsdp x ep: the FSDP ranks of the dense parameters without context parallelism;
- ``dp_shard_cp`` = efsdp x ep x cp: the FSDP ranks of the dense parameters under context
  parallelism (the CP ranks of a sample also shard the parameters and reduce their gradients,
  as in torchtitan);
- ``efsdp_cp`` = efsdp x cp: likewise for each EP rank's experts;
- ``dp`` = dp_replicate x efsdp x ep: the data-parallel ranks (the reader shards by these);
- ``world``: every rank (MoE load and aux-loss statistics are summed over all routing ranks).
With one process there is no mesh: every accessor returns ``None`` and nothing is built.
"""

from __future__ import annotations

import warnings

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.comm import CommStats
from parallel.dims import MESH_DIMS, PKM_SHARD_DIMS, ParallelDims

FLAT_VIEWS = {
    "dp_shard": ("efsdp", "ep"),
    "dp_shard_cp": ("efsdp", "cp", "ep"),
    "efsdp_cp": ("efsdp", "cp"),
    "dp": ("dp_replicate", "efsdp", "ep"),
    "world": MESH_DIMS,
}


class ParallelMesh:
    """The run's device mesh (or none, with one process) and its named sub-meshes.

    Args:
        dims: the validated layout.
        device_type: ``cpu`` or ``cuda``.
    """

    def __init__(self, dims: ParallelDims, device_type: str) -> None:
        self.dims = dims
        self.comm = CommStats()
        self.mesh: DeviceMesh | None = None
        self._flat: dict[str, DeviceMesh] = {}
        if dims.world_size == 1:
            return
        self.mesh = init_device_mesh(device_type, dims.mesh_shape, mesh_dim_names=MESH_DIMS)
        with warnings.catch_warnings():  # slicing by flattened names: torch's deprecation notice
            warnings.simplefilter("ignore", UserWarning)
            for name, view_dims in FLAT_VIEWS.items():
                self._flat[name] = self.mesh[view_dims]._flatten(name)

    def _slice(self, *names: str) -> DeviceMesh | None:
        """The sub-mesh over ``names``, dropping size-1 ``dp_replicate`` (plain FSDP, not HSDP)."""
        if self.mesh is None:
            return None
        if len(names) == 2 and names[0] == "dp_replicate" and self.dims.dp_replicate == 1:
            names = names[1:]
        if len(names) == 1 and names[0] in self._flat:
            return self._flat[names[0]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return self.mesh[names]

    @property
    def data(self) -> DeviceMesh | None:
        """The data-parallel ranks: ranks here read different samples."""
        return self._slice("dp")

    @property
    def fsdp(self) -> DeviceMesh | None:
        """Mesh of dense parameters: 1-D (dp_shard, times cp) for FSDP, 2-D with dp_replicate
        for HSDP."""
        return self._slice("dp_replicate", "dp_shard_cp" if self.dims.cp > 1 else "dp_shard")

    @property
    def ep(self) -> DeviceMesh | None:
        """The expert-parallel ranks that split the experts of a layer among them."""
        return self._slice("ep")

    @property
    def expert_fsdp(self) -> DeviceMesh | None:
        """Mesh that shards (and replicates) each EP rank's experts: (dp_replicate, efsdp (x cp))."""
        return self._slice("dp_replicate", "efsdp_cp" if self.dims.cp > 1 else "efsdp")

    @property
    def cp(self) -> DeviceMesh | None:
        """The context-parallel ranks that split one sequence (None when cp = 1)."""
        return self._slice("cp") if self.dims.cp > 1 else None

    def table_mesh(self, over: str) -> DeviceMesh | None:
        """The 1-D mesh a PKM value table is split over (``PKM_SHARD_DIMS[over]`` flattened),
        or None when that is a single rank (nothing to split)."""
        return self._flat_dims(over, PKM_SHARD_DIMS[over])

    def table_replicas(self, over: str) -> DeviceMesh | None:
        """The ranks that hold the same PKM shard as this one (every other mesh dimension),
        or None when no other rank does."""
        rest = tuple(d for d in MESH_DIMS if d not in PKM_SHARD_DIMS[over])
        return self._flat_dims(f"{over}_replicas", rest)

    def _flat_dims(self, name: str, dims: tuple[str, ...]) -> DeviceMesh | None:
        """``dims`` (size-1 ones dropped) as one flattened 1-D mesh, built once per name; the
        same mesh object as an existing view when the ranks are the same."""
        dims = tuple(d for d in dims if self.dims.size_of((d,)) > 1)
        if self.mesh is None or not dims:
            return None
        if len(dims) == 1:
            return self._slice(dims[0])
        for view, view_dims in FLAT_VIEWS.items():
            if dims == tuple(d for d in view_dims if self.dims.size_of((d,)) > 1):
                return self._flat[view]
        key = f"pkm_{name}"
        if key not in self._flat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._flat[key] = self.mesh[dims]._flatten(key)
        return self._flat[key]

    @property
    def routing_group(self) -> dist.ProcessGroup | None:
        """Every rank that routes tokens (all of them): MoE statistics are summed over these."""
        return self._flat["world"].get_group() if self.mesh is not None else None

    @property
    def dp_rank(self) -> int:
        return self._flat["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def ep_rank(self) -> int:
        return self._slice("ep").get_local_rank() if self.mesh is not None else 0
