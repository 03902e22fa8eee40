"""Whole-model properties for every CPU-sized config: causality, packing, gradients, bf16."""

from __future__ import annotations

import pytest
import torch

from pretrain.loss import lm_loss
from pretrain.models.common.block import GatedPathBlock
from tests.pretrain.model_helpers import (
    CPU_CONFIGS,
    FAMILY_CONFIGS,
    SHRINK,
    build_from_config,
    random_tokens,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# The 29M configs are exercised at a short length to keep the suite fast on 2 cores; the chunk
# and window sizes in them are shrunk by overrides so that several chunks/windows are crossed.
SHORT = {
    "hydra-tiny.yaml": (),
    "hydra-29m.yaml": (
        "model.ssm.chunk_size=16",
        "model.attention.window=16",
        "model.attention.summary_chunk=8",
        "model.moe.chunk_size=8",
        "model.workspace.chunk_size=8",
    ),
    "transformer-29m.yaml": (),
    "mamba2-29m.yaml": ("model.ssm.chunk_size=16",),
    "attamba-tiny.yaml": (),
    "attamba-29m.yaml": ("model.ssm.chunk_size=16", "model.attamba.leading_tokens=8"),
    "dreamer-tiny.yaml": (),
    "dreamer-29m.yaml": (),
}
LENGTH = {"hydra-tiny.yaml": 96}


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_causality(name: str) -> None:
    model = build_from_config(name, *SHORT[name]).eval()
    length = LENGTH.get(name, 48)
    ids = random_tokens(model, 2, length)
    with torch.no_grad():
        ref = model(ids).logits
        for t in (0, length // 3, length - 2):
            perturbed = ids.clone()
            perturbed[:, t + 1 :] = random_tokens(model, 2, length - t - 1, seed=100 + t)
            out = model(perturbed).logits
            torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, t + 1 :], ref[:, t + 1 :]), (
                "perturbation had no effect"
            )


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_packed_documents_equal_documents_run_alone(name: str) -> None:
    model = build_from_config(name, *SHORT[name]).eval()
    lengths = [37, 50, 9]  # documents start mid-chunk and mid-window
    docs = [random_tokens(model, 1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    seq_idx = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed_logits = model(packed, seq_idx=seq_idx).logits
        alone = torch.cat([model(doc).logits for doc in docs], dim=1)
    torch.testing.assert_close(packed_logits, alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_gradients_reach_every_parameter_and_bf16_is_finite(name: str) -> None:
    model = build_from_config(name, *SHRINK.get(name, ()))
    ids = random_tokens(model, 4, 128)
    out = model(ids[:, :-1])
    (lm_loss(out.logits, ids[:, 1:]) + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reached {missing}"
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids[:, :-1])
    loss = lm_loss(out.logits, ids[:, 1:]) + out.aux_loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_output_interface_and_aux_loss() -> None:
    hydra = build_from_config("hydra-tiny.yaml")
    ids = random_tokens(hydra, 2, 64)
    out = hydra(ids)
    assert out.logits.shape == (2, 64, hydra.cfg.vocab_size)
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() > 0
    transformer = build_from_config("transformer-29m.yaml", "model.n_layers=1")
    assert transformer(ids % transformer.cfg.vocab_size).aux_loss.item() == 0.0


def test_switched_off_path_costs_nothing() -> None:
    model = build_from_config("hydra-tiny.yaml")
    calls: dict[str, int] = {}

    def count(name: str):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1

        return hook

    for block in model.blocks.values():
        assert isinstance(block, GatedPathBlock)
        for name, module in block.paths.items():
            module.register_forward_hook(count(name))
    model.set_active_paths(["ssm", "ffn"])
    model(random_tokens(model, 1, 32))
    assert set(calls) == {"ssm", "ffn"}
    with pytest.raises(ValueError, match="unknown path"):
        model.set_active_paths(["attn"])
