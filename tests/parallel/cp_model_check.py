"""A model under context parallelism against the same model in one process, on every rank.

Each spawned rank builds the same model and batch, computes the one-process reference itself
(whole rows, no communication), then its slice under a ``ContextGroup`` over all ranks, and
compares: its logits with the reference's columns, the global loss, and every parameter's
gradient summed over the ranks (each rank's loss is its share of the global mean).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.comm import CommStats
from parallel.context import ContextGroup
from pretrain.models.common.sequence import SequenceContext
from tests.pretrain.model_helpers import build_from_config

# document lengths per row for each cp degree: a boundary inside a slice, one exactly at a slice
# boundary, one document spanning three slices (slice length 45 at cp=2, 23 at cp=4)
DOCUMENTS = {
    1: [[30, 15, 45], [7, 83]],
    2: [[30, 15, 45], [7, 83]],
    4: [[10, 36, 46], [5, 75, 12]],
}
SLICE = {1: 90, 2: 45, 4: 23}


def packed_seq_idx(lengths: list[list[int]]) -> torch.Tensor:
    rows = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]
    return torch.stack(rows)


def _loss_share(logits: torch.Tensor, labels: torch.Tensor, n_tokens: int) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / n_tokens


def check_model(
    rank: int, world: int, config: str, overrides: tuple[str, ...], packed: bool = True
) -> None:
    """Assert that ``world``-way context parallelism gives the one-process numbers (rows packed
    with ``DOCUMENTS``, or one document per row without ``seq_idx``)."""
    model = build_from_config(config, *overrides)
    model.train()
    seq_idx = packed_seq_idx(DOCUMENTS[world])
    batch, length = seq_idx.shape
    if not packed:
        seq_idx = None
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, length), generator=gen)
    labels = torch.randint(0, model.cfg.vocab_size, (batch, length), generator=gen)
    n_tokens = labels.numel()

    ref = model(tokens, seq_idx=seq_idx)
    ref_loss = _loss_share(ref.logits, labels, n_tokens)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    stats = CommStats()
    comm = ContextGroup(dist.group.WORLD, stats)
    context = SequenceContext.of_slice(seq_idx, batch, length, comm, tokens.device)
    cols = slice(context.offset, context.offset + context.slice_len)
    out = model(tokens[:, cols], context=context)
    loss = _loss_share(out.logits, labels[:, cols], n_tokens)
    loss.backward()

    # every collective first, then the comparisons: a failing rank must not leave the others
    # waiting in a collective (the next check would pair with the wrong one)
    total = loss.detach().clone()
    dist.all_reduce(total)
    # every rank must give every parameter a gradient (FSDP2 reduce-scatters only those that
    # have one, so ranks that disagree desynchronise); a missing one is summed as zeros here
    grads, missing = {}, []
    for name, param in model.named_parameters():
        if name not in ref_grads:
            continue
        if param.grad is None:
            missing.append(name)
        grads[name] = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
        dist.all_reduce(grads[name])
    torch.testing.assert_close(out.logits, ref.logits[:, cols], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, ref_loss.detach(), rtol=1e-5, atol=0)
    assert not missing, f"no gradient on rank {rank}: {missing}"
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert sum(stats.bytes.values()) > 0


def run_checks(rank: int, world: int, checks: dict[str, tuple], out_dir: str) -> None:
    """Run named checks ``fn(rank, world, *args)`` one after another in one set of ranks (one
    spawn for many checks); each rank writes ``{name: traceback or ""}`` to ``out_dir``."""
    results = {}
    for name, (fn, *args) in checks.items():
        try:
            fn(rank, world, *args)
            results[name] = ""
        except Exception:  # noqa: BLE001 - reported per check by the test that reads it
            results[name] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def spawn_checks(world: int, checks: dict[str, tuple], out_dir: Path) -> list[dict[str, str]]:
    """``run_checks`` on ``world`` spawned gloo ranks; per rank, ``{name: traceback or ""}``."""
    from parallel.local_ranks import run_on_ranks

    run_on_ranks(world, run_checks, checks, str(out_dir))
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def assert_passed(results: list[dict[str, str]], name: str) -> None:
    """Fail with every rank's traceback of check ``name``."""
    errors = [f"rank {r}:\n{res[name]}" for r, res in enumerate(results) if res[name]]
    assert not errors, "\n".join(errors)
