"""Bytes and messages per step through each process group, measured and checked against formulas.

Run:  python benchmarks/comm_volume.py --out comm_volume.json

Measured (CPU, 2 gloo ranks, ``parallel.ep=2``): one MoE layer of the config (its d_model,
experts, top-k, chunk size and routing), forward + backward on one row of ``train.seq_len``
tokens per rank, random inputs, the config's init. The counts come from the dispatcher and the
routing reducer (``parallel.comm.CommStats``): what this rank sends to other ranks. The expert
hidden size is cut to 64 for the measurement: no traffic depends on it. Both routings are run:
the payload is the same (every (token, slot) row crosses once each way, forward and backward);
chunk routing sends each chunk's rows for one expert as one contiguous run of C rows, counted as
``segments`` (distinct (routing unit, expert) runs in the send buffer).

Formulas (per MoE layer and micro-batch, per rank, N tokens on the rank, k slots, D d_model,
b bytes per activation element, ep ranks, uniform routing):
    all-to-all bytes  = 4 * N * k * (ep - 1) / ep * D * b     (dispatch + combine, fwd + bwd)
                      = 2 * (rows sent + rows received) * D * b, exactly, for a given routing
    all-to-all msgs   = 4 * (ep - 1);  split sizes: (ep - 1) msgs of E/ep int64
    routing all-reduce: (E + 1) floats per micro-batch (aux loss) + E per step (bias update)
FSDP2 (formula only; its collectives are torch's): per step and rank, dense parameters P_d
all-gathered in forward and again in backward (reshard_after_forward) and reduce-scattered in
fp32: ~ (n-1)/n * P_d * (2 b_p + 4) bytes over the dp_shard mesh; expert parameters P_e / ep the
same over the efsdp mesh; HSDP adds an all-reduce of the gradient shards over dp_replicate:
~ 2 (r-1)/r * (P / shard) * 4 bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

if __name__ == "__main__":
    _here = Path(__file__).resolve().parent  # benchmarks/kernels.py would shadow ``kernels``
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from parallel.dims import ParallelDims  # noqa: E402
from parallel.expert import apply_expert_parallel  # noqa: E402
from parallel.local_ranks import run_on_ranks  # noqa: E402
from parallel.mesh import ParallelMesh  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.models.common.moe import ChunkMoE  # noqa: E402
from pretrain.models.config import MoEConfig  # noqa: E402
from pretrain.models.lm import build_model  # noqa: E402
from pretrain.models.params import count_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "hydra-29m": ROOT / "configs/hydra-29m.yaml",
    "hydra-1.6b": ROOT / "configs/hydra-1.6b.yaml",
}
MEASURE_D_EXPERT = 64
FP32, BF16 = 4, 2


def _measure_rank(rank: int, world: int, d_model: int, moe: dict, seq_len: int, out: str) -> None:
    torch.manual_seed(0)
    layer = ChunkMoE(d_model, MoEConfig(**moe)).train()
    mesh = ParallelMesh(ParallelDims(dp_shard=world, ep=world), "cpu")
    apply_expert_parallel([layer], mesh)
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(1, seq_len, d_model, generator=gen, requires_grad=True)
    y, aux = layer(x)
    (y.square().mean() + aux).backward()
    layer.after_optimizer_step(stepped=True)
    routing = layer.route(x.detach())
    tok_expert = routing.expert_idx  # [N, k]
    n_local = moe["n_experts"] // world
    to_rank = torch.bincount((tok_expert // n_local).flatten(), minlength=world)  # [world]
    table = [torch.zeros_like(to_rank) for _ in range(world)]
    torch.distributed.all_gather(table, to_rank)  # table[src][dst]: rows src sends to dst
    sent = int(to_rank.sum() - to_rank[rank])
    received = int(sum(table[src][rank] for src in range(world) if src != rank))
    segments = int(routing.expert_idx[routing.counted].numel())  # one run per (unit, expert)
    if rank == 0:
        result = {
            "bytes": dict(mesh.comm.bytes),
            "messages": dict(mesh.comm.messages),
            "rows_sent_off_rank": sent,
            "rows_received_from_other_ranks": received,
            "rows": int(tok_expert.numel()),
            "segments": segments,
        }
        Path(out).write_text(json.dumps(result))


class CollectiveCounter:
    """Counts the payload of torch's collectives per process group while installed.

    FSDP2 calls ``dist.all_gather_single`` (payload: this rank's shard) and
    ``dist.reduce_scatter_single`` (payload: the full gradient it reduces); the counts are taken
    there, so they are FSDP2's real calls, not our formula.
    """

    NAMES = ("all_gather_single", "reduce_scatter_single", "all_reduce")

    def __init__(self, groups: dict[str, object]) -> None:
        self.groups = groups
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._saved: dict[str, object] = {}

    def _name_of(self, group: object) -> str:
        """The mesh views this group serves (several when they are one group, e.g. world 2)."""
        names = [name for name, g in self.groups.items() if g is group]
        return "=".join(names) or "other"

    def __enter__(self) -> CollectiveCounter:
        dist = torch.distributed
        for op in self.NAMES:
            original = getattr(dist, op)
            self._saved[op] = original

            def counted(*args, _op=op, _original=original, **kwargs):
                tensor = _payload(_op, args, kwargs)
                key = f"{self._name_of(kwargs.get('group'))}/{_op}"
                self.bytes[key] = self.bytes.get(key, 0) + tensor.numel() * tensor.element_size()
                self.calls[key] = self.calls.get(key, 0) + 1
                return _original(*args, **kwargs)

            setattr(dist, op, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for op, original in self._saved.items():
            setattr(torch.distributed, op, original)


def _payload(op: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor a collective call carries from this rank (its input)."""
    if op == "all_reduce":
        return args[0] if args else kwargs["tensor"]
    if "input" in kwargs or "input_tensor" in kwargs:
        return kwargs.get("input", kwargs.get("input_tensor"))
    return args[1]


def _step_rank(rank: int, world: int, name: str, out: str) -> None:
    """One forward + backward of the whole model under FSDP2 with dp_shard=2, ep=2."""
    from parallel.dist import DistInfo
    from pretrain.models.parallelize import parallelize_hydra
    from pretrain.train_config import ParallelConfig, TrainConfig

    cfg = load_config(CONFIGS[name])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    dims = ParallelDims(dp_shard=world, ep=world)
    mesh = ParallelMesh(dims, "cpu")
    info = DistInfo(rank=rank, world_size=world)
    parallelize_hydra(model, mesh, info, ParallelConfig(backend="fsdp2", ep=world), TrainConfig())
    groups = {
        "dp_shard": mesh.fsdp.get_group(),
        "efsdp": mesh.expert_fsdp.get_group(),
        "ep": mesh.ep.get_group(),
        "world": mesh.routing_group,
    }
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len), generator=gen)
    with CollectiveCounter(groups) as counter:
        out_ = model(ids)
        (out_.logits.float().square().mean() + out_.aux_loss).backward()
    if rank == 0:
        moe_layers = [m for m in model.modules() if isinstance(m, ChunkMoE)]
        expert = sum(p.numel() for m in moe_layers for p in m.experts.parameters())
        total = sum(p.numel() for p in model.parameters())
        result = {
            "collectives_bytes": counter.bytes,
            "collectives_calls": counter.calls,
            "ep_dispatcher_bytes": dict(mesh.comm.bytes),
            "params_dense": total - expert,
            "params_expert": expert,
        }
        Path(out).write_text(json.dumps(result))


def measure_step(name: str, tmp: Path) -> dict:
    """A whole model's step at world 2 (dp_shard=2 x ep=2), every group counted; the FSDP
    formula: the dense shards all-gathered in forward and again in backward, the full fp32
    gradients reduce-scattered. The experts' FSDP mesh (efsdp) has one rank here: FSDP2 issues
    no collective on it; their rows go through the EP dispatcher (counted by it)."""
    out = tmp / f"{name}-step.json"
    run_on_ranks(2, _step_rank, name, str(out))
    r = json.loads(out.read_text())
    shard = r["params_dense"] / 2
    r["formula_dense_reduce_scatter_bytes"] = r["params_dense"] * FP32
    r["formula_dense_all_gather_bytes"] = 2 * shard * FP32
    r["measured_over_formula_all_gather"] = (
        sum(v for k, v in r["collectives_bytes"].items() if k.endswith("/all_gather_single"))
        / r["formula_dense_all_gather_bytes"]
    )
    r["measured_over_formula_reduce_scatter"] = (
        sum(v for k, v in r["collectives_bytes"].items() if k.endswith("/reduce_scatter_single"))
        / r["formula_dense_reduce_scatter_bytes"]
    )
    return r


def measure(name: str, routing: str, tmp: Path) -> dict:
    cfg = load_config(CONFIGS[name])
    m = cfg.model
    moe = {
        "n_experts": m.moe.n_experts,
        "top_k": m.moe.top_k,
        "d_expert": MEASURE_D_EXPERT,
        "chunk_size": m.moe.chunk_size,
        "routing": routing,
        "aux_loss_coef": m.moe.aux_loss_coef,
        "z_loss_coef": m.moe.z_loss_coef,
    }
    out = tmp / f"{name}-{routing}.json"
    run_on_ranks(2, _measure_rank, m.d_model, moe, cfg.train.seq_len, str(out))
    result = json.loads(out.read_text())
    n, k, d, ep = cfg.train.seq_len, m.moe.top_k, m.d_model, 2
    result["formula_all_to_all_bytes"] = 4 * n * k * (ep - 1) / ep * d * FP32
    result["formula_all_to_all_messages"] = 4 * (ep - 1)
    result["measured_over_formula"] = (
        result["bytes"]["ep/all_to_all"] / result["formula_all_to_all_bytes"]
    )
    # exact given this routing: dispatch and combine-backward send the rank's own rows away,
    # combine and dispatch-backward send back the rows it received
    rows = result["rows_sent_off_rank"] + result["rows_received_from_other_ranks"]
    result["exact_all_to_all_bytes"] = 2 * rows * d * FP32
    return result


def step_formula(name: str, dims: ParallelDims) -> dict:
    """Per-step bytes each rank sends, per process group, on a GPU layout (bf16 activations)."""
    cfg = load_config(CONFIGS[name])
    m, tc = cfg.model, cfg.train
    model = build_model(m, device="meta")  # shapes only
    total = count_parameters(model).total
    moe_layers = [mod for mod in model.modules() if isinstance(mod, ChunkMoE)]
    n_moe_layers = len(moe_layers)
    expert = sum(p.numel() for mod in moe_layers for p in mod.experts.parameters())
    dense = total - expert
    tokens = tc.batch_size * tc.seq_len * tc.grad_accum  # per rank per step
    ep, shard, rep = dims.ep, dims.dp_shard, dims.dp_replicate
    a2a = 4 * tokens * m.moe.top_k * (ep - 1) / ep * m.d_model * BF16 * n_moe_layers
    fsdp_dense = (shard - 1) / shard * dense * (2 * BF16 + FP32)
    efsdp = dims.efsdp
    fsdp_expert = (efsdp - 1) / efsdp * expert / ep * (2 * BF16 + FP32)
    hsdp = 2 * (rep - 1) / rep * (dense / shard + expert / ep / efsdp) * FP32 if rep > 1 else 0
    return {
        "layout": dims.describe(),
        "params_dense": dense,
        "params_expert": expert,
        "ep_all_to_all_GB": a2a / 1e9,
        "ep_all_to_all_messages": 4 * (ep - 1) * n_moe_layers * tc.grad_accum,
        "fsdp_dense_GB": fsdp_dense / 1e9,
        "fsdp_expert_GB": fsdp_expert / 1e9,
        "hsdp_replicate_GB": hsdp / 1e9,
    }


LAYOUTS = {
    "8 GPUs": ParallelDims(dp_shard=8, ep=8),
    "8 GPUs, ep=4": ParallelDims(dp_shard=8, ep=4),
    "64 GPUs": ParallelDims(dp_replicate=8, dp_shard=8, ep=8),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="comm_volume.json")
    parser.add_argument("--shapes", nargs="+", default=list(CONFIGS))
    args = parser.parse_args(argv)
    import tempfile

    measured, formulas, steps = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if "hydra-29m" in args.shapes:
            st = measure_step("hydra-29m", Path(tmp))
            steps["hydra-29m"] = st
            print("hydra-29m  whole step, world 2 (dp_shard=2 x ep=2), fwd+bwd of 1 row:")
            for key in sorted(st["collectives_bytes"]):
                print(
                    f"  {key:34s} {st['collectives_bytes'][key] / 2**20:9.2f} MiB"
                    f" in {st['collectives_calls'][key]} calls"
                )
            for key, nbytes in sorted(st["ep_dispatcher_bytes"].items()):
                print(f"  {key + ' (dispatcher)':34s} {nbytes / 2**20:9.2f} MiB")
            print(
                f"  dense params {st['params_dense']:,}: reduce-scatter measured / formula"
                f" {st['measured_over_formula_reduce_scatter']:.3f}, all-gather measured /"
                f" (2 x shard) {st['measured_over_formula_all_gather']:.3f}"
            )
        for name in args.shapes:
            for routing in ("chunk", "token"):
                r = measure(name, routing, Path(tmp))
                measured[f"{name}/{routing}"] = r
                print(
                    f"{name:11s} {routing:5s} a2a {r['bytes']['ep/all_to_all'] / 2**20:8.2f} MiB"
                    f" in {r['messages']['ep/all_to_all']} msgs (formula x{r['measured_over_formula']:.3f},"
                    f" exact {r['exact_all_to_all_bytes'] == r['bytes']['ep/all_to_all']})"
                    f" | splits {r['bytes']['ep/splits']} B | routing all-reduce"
                    f" {r['bytes']['routing/all_reduce']} B | segments {r['segments']}/{r['rows']} rows"
                )
    for name in args.shapes:
        for label, dims in LAYOUTS.items():
            f = step_formula(name, dims)
            formulas[f"{name}/{label}"] = f
            print(
                f"{name:11s} {label:13s} per step and rank: EP a2a {f['ep_all_to_all_GB']:.3f} GB"
                f" | FSDP dense {f['fsdp_dense_GB']:.3f} GB | FSDP experts"
                f" {f['fsdp_expert_GB']:.3f} GB | HSDP {f['hsdp_replicate_GB']:.3f} GB"
            )
    meta = {"torch": torch.__version__, "machine": platform.machine(), "ep": 2, "world": 2}
    Path(args.out).write_text(
        json.dumps(
            {"meta": meta, "measured": measured, "measured_step": steps, "formula": formulas},
            indent=1,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
