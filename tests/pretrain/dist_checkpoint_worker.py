"""One rank of the multi-process checkpoint tests (launched by test_checkpoint.py, gloo on CPU).

    python tests/pretrain/dist_checkpoint_worker.py LOAD_ROOT SAVE_ROOT OUT [--async]

Both directions in one launch (starting processes is the slow part on a 2-core machine):
1. a freshly initialised FSDP2 (``fully_shard``) model loads the checkpoint in LOAD_ROOT, trains a
   step and loads it again; rank 0 writes the full states it got to ``OUT/loaded.pt``, every rank
   the extra dict it received to ``OUT/extra_rank{r}.pt``;
2. another FSDP2 model trains two steps on rank-dependent data, checkpointing into SAVE_ROOT after
   each (keep_last=1); rank 0 writes the full model+optimizer state it saved to
   ``OUT/reference.pt``.
The test compares them with a one-process run.
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
    """Embedding -> two blocks -> head; blocks in a ModuleDict as the real models keep them.
    ``spare`` is never used (a component the curriculum has not switched on): it has no
    optimizer state, and a checkpoint without that state must still load."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleDict({str(i): nn.Linear(DIM, DIM) for i in range(2)})
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.spare = nn.Linear(DIM, DIM)

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
    """A copy of the unsharded model + flattened optimizer state (collective under FSDP2; the
    full state lands on rank 0). Copied: for a plain model the state dict aliases the params."""
    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True
    )
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    state = {
        **{f"model.{k}": v for k, v in model_sd.items()},
        **{f"optim.{k}": v for k, v in optim_sd.items()},
    }
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def shard(model: TinyNet, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def load_phase(root: Path, out: Path, rank: int, world: int) -> None:
    """A freshly initialised FSDP2 model loads the latest checkpoint under ``root``, trains a
    step, and loads it again (a roll-back into an optimizer that already has state)."""
    model, opt = build(seed=123, world=world)
    manager = CheckpointManager(root, process_group=dist.group.WORLD)
    app_state = {"model": ModelOptimizerState(model, opt)}
    extra = manager.load_latest(app_state)
    loaded = full_state(model, opt)
    train_step(model, opt, seed=7 + rank)
    manager.load_latest(app_state)
    reloaded = full_state(model, opt)
    if rank == 0:
        torch.save({"loaded": loaded, "reloaded": reloaded}, out / "loaded.pt")
    torch.save(extra, out / f"extra_rank{rank}.pt")


def save_phase(root: Path, out: Path, rank: int, world: int, async_save: bool) -> None:
    """An FSDP2 model trains two steps on rank-dependent data, checkpointing after each."""
    model, opt = build(seed=0, world=world)
    manager = CheckpointManager(
        root, keep_last=1, async_save=async_save, process_group=dist.group.WORLD
    )
    app_state = {"model": ModelOptimizerState(model, opt)}
    for step in (1, 2):
        train_step(model, opt, seed=100 * step + rank)
        extra = {"rank": rank, "step": step, "data": {"consumed": 10 * step + rank}}
        manager.save(step, app_state, extra)
    manager.wait()
    reference = full_state(model, opt)
    if rank == 0:
        torch.save(reference, out / "reference.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("load_root", type=Path, help="a checkpoint root to load (saved by 1 rank)")
    parser.add_argument("save_root", type=Path, help="where to save this run's checkpoints")
    parser.add_argument("out", type=Path, help="where to write states for the test to compare")
    parser.add_argument("--async", dest="async_save", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # Linear on [B, T, D]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    load_phase(args.load_root, args.out, rank, world)
    save_phase(args.save_root, args.out, rank, world, args.async_save)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown of gloo threads: seconds on a busy 2-core machine


if __name__ == "__main__":
    main()
