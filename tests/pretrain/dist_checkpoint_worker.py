"""One rank of the multi-process checkpoint tests (launched by test_checkpoint.py, gloo on CPU).

    python tests/pretrain/dist_checkpoint_worker.py save|load ROOT OUT [--async]

``save``: an FSDP2 (``fully_shard``) model trains two steps on rank-dependent data and is
checkpointed after each (keep_last=1); rank 0 writes the full unsharded model+optimizer state it
saved to ``OUT/reference.pt``. ``load``: a freshly initialised FSDP2 model loads the latest
checkpoint; rank 0 writes the full state it got to ``OUT/loaded.pt`` and every rank writes the
extra dict it received to ``OUT/extra_rank{r}.pt``. The test compares them with a one-process run.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pretrain.checkpoint import CheckpointManager, ModelOptimizerState  # noqa: E402

DIM, VOCAB = 8, 16


class TinyNet(nn.Module):
    """Embedding -> two blocks -> head; blocks in a ModuleDict as the real models keep them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleDict({str(i): nn.Linear(DIM, DIM) for i in range(2)})
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks.values():
            x = x + torch.tanh(block(x))
        return self.head(x)


def build(seed: int, world: int = 1) -> tuple[TinyNet, torch.optim.Optimizer]:
    """The model (FSDP2-sharded when ``world`` > 1) and its optimizer, built after sharding
    because ``fully_shard`` replaces the parameters."""
    torch.manual_seed(seed)
    model = TinyNet()
    if world > 1:
        shard(model, world)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 5), generator=gen)
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded model + flattened optimizer state (collective under FSDP2; full on rank 0)."""
    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True
    )
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    return {
        **{f"model.{k}": v for k, v in model_sd.items()},
        **{f"optim.{k}": v for k, v in optim_sd.items()},
    }


def shard(model: TinyNet, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load"])
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--async", dest="async_save", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # Linear on [B, T, D]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = build(seed=0 if args.mode == "save" else 123, world=world)
    manager = CheckpointManager(
        args.root, keep_last=1, async_save=args.async_save, process_group=dist.group.WORLD
    )
    app_state = {"model": ModelOptimizerState(model, opt)}
    if args.mode == "save":
        for step in (1, 2):
            train_step(model, opt, seed=100 * step + rank)
            extra = {"rank": rank, "step": step, "data": {"consumed": 10 * step + rank}}
            manager.save(step, app_state, extra)
        manager.wait()
        reference = full_state(model, opt)
        if rank == 0:
            torch.save(reference, args.out / "reference.pt")
    else:
        extra = manager.load_latest(app_state)
        loaded = full_state(model, opt)
        if rank == 0:
            torch.save(loaded, args.out / "loaded.pt")
        torch.save(extra, args.out / f"extra_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown of gloo threads: seconds on a busy 2-core machine


if __name__ == "__main__":
    main()
