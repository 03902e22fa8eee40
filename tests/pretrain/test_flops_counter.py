"""The analytic FLOP count (``pretrain.flops``) against ``torch.utils.flop_counter`` on real runs.

Every family's small config (the ``-tiny`` ones; transformer and mamba2, which have none, shrunk
by overrides) runs a forward (eval) and a forward + backward (train) on packed CPU rows under
``FlopCounterMode``, at two lengths (64: one block or chunk; 200: padded chunks and blocks,
summaries, several workspace writes). Our count must match per path and in total.

What the counter sees (torch 2.13 ``flop_registry``): mm, addmm, bmm, baddbmm (einsum decomposes
into them), _scaled_mm, convolutions, the CUDA SDPA / flash / efficient / cuDNN attention kernels
and flex attention. What it cannot see, and how each is handled here:

* ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward`` (SDPA on CPU, the
  Transformer's blocked causal attention) are not registered: registered below with torch's own
  ``sdpa_flop_count`` / ``sdpa_backward_flop_count`` (each masked block's full q x k product;
  ``is_causal=True`` is refused, since that kernel then skips tiles).
* ``hydra_kernels::ssd_bounded_fwd`` / ``_bwd`` (the ``torch`` SSD backend) are custom ops, opaque
  to a dispatch mode: counted by re-running their implementations under a nested counter.
* ``aten._grouped_mm`` (the MoE's ``grouped_mm`` backend) is not registered: the tests run the
  ``torch`` MoE backend (a loop of mm), which they assert.
* Elementwise multiply-adds that our count includes (they stand where a matmul would): the SSM's
  depthwise conv taps (``*.conv``, ``*.kv_conv``), the SSD state pass between chunks
  (``*.state_pass``, ``*.kv_state_pass``), the PKM's ``F.embedding_bag`` (``pkm.lookup``) and
  Dreamer's depth scores (``depth.scores``): left out of the comparison, by name (``INVISIBLE``).

Tolerance: 1%. On these CPU backends the count models every executed matmul exactly (the match
is exact up to float rounding); 1% leaves room for rounding only. The errors the count used to
make are each several percent of a block or of the total (``test_the_old_errors_are_caught``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from kernels.attention.causal import document_causal_attention
from kernels.ssd import chunked
from pretrain.flops import component_breakdown, count_flops
from pretrain.models import CausalLM
from pretrain.models.common.attention import _prefix_block_keys
from pretrain.models.common.moe import GroupedExperts
from tests.pretrain.model_helpers import build_from_config, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 0.01
LENGTHS = (64, 200)
BATCH = 2
# parts our count includes that the counter cannot see (elementwise work), "<path>.<part>"
INVISIBLE = {
    "ssm.conv",
    "ssm.state_pass",
    "attention.kv_conv",
    "attention.kv_state_pass",
    "pkm.lookup",
    "depth.scores",
}
# paths whose work partly runs outside their module: Dreamer's layer makes the depth keys and
# values (``DepthAttention.keys_values``) before calling the paths; compared in the total only
OUTSIDE_PATH = {"depth"}
SMALL = ("model.n_layers=2", "model.d_model=64", "model.vocab_size=128")
FAMILIES = {
    "hydra": ("hydra-tiny.yaml",),
    "attamba": ("attamba-tiny.yaml",),
    "dreamer": ("dreamer-tiny.yaml",),
    "transformer": (
        "transformer-29m.yaml",
        *SMALL,
        "model.d_ff=128",
        "model.attention.n_heads=4",
    ),
    # two B/C groups of four heads each: C.B^T is per group, not per head
    "mamba2": (
        "mamba2-29m.yaml",
        *SMALL,
        "model.ssm.d_state=16",
        "model.ssm.head_dim=16",
        "model.ssm.chunk_size=32",
        "model.ssm.n_groups=2",
    ),
}


def _sdpa_cpu(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    if is_causal:
        raise AssertionError("is_causal SDPA skips tiles on CPU: not what this formula counts")
    return sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward(grad, q, k, v, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return sdpa_backward_flop_count(grad, q, k, v)


def _measured_inside(impl: Callable) -> Callable:
    """A raw formula for an opaque op: run its implementation again under a nested counter."""

    def formula(*args: object, out_val: object = None, **kwargs: object) -> int:
        with FlopCounterMode(display=False) as inner:
            impl(*args, **kwargs)
        return inner.get_total_flops()

    formula._get_raw = True
    return formula


OPS = torch.ops
CUSTOM = {
    OPS.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    OPS.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
    OPS.hydra_kernels.ssd_bounded_fwd: _measured_inside(chunked._ssd_forward),
    OPS.hydra_kernels.ssd_bounded_bwd: _measured_inside(chunked._ssd_backward),
}


def _build(family: str) -> CausalLM:
    model = build_from_config(*FAMILIES[family])
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            assert module.kernel_backend == "torch"  # grouped_mm would be invisible
    return model


def _measure(model: CausalLM, seq_len: int, training: bool) -> dict[str, float]:
    """Counted FLOPs per token: ``total``, and each path name summed over the blocks (the
    counter files an op under the modules running when it runs, backward included)."""
    model.train(training)
    ids = random_tokens(model, BATCH, seq_len)
    seq_idx = (torch.arange(seq_len) >= seq_len // 3).long().expand(BATCH, -1)  # packed rows
    with FlopCounterMode(display=False, custom_mapping=CUSTOM) as counter:
        out = model(ids, seq_idx=seq_idx)
        if training:
            (out.logits.float().sum() + out.aux_loss).backward()
    tokens = BATCH * seq_len
    measured: dict[str, float] = defaultdict(float)
    measured["total"] = counter.get_total_flops() / tokens
    for module, ops in counter.get_flop_counts().items():
        parts = module.split(".")  # CausalLM.blocks.<block>.paths.<path>
        if len(parts) == 5 and parts[3] == "paths" and parts[4] not in OUTSIDE_PATH:
            measured[parts[4]] += sum(ops.values()) / tokens
    return dict(measured)


def _predict(model: CausalLM, seq_len: int, training: bool) -> dict[str, float]:
    """Our count (``component_breakdown``) in ``_measure``'s keys, without the parts the
    counter cannot see."""
    predicted: dict[str, float] = defaultdict(float)
    for key, flops in component_breakdown(model, seq_len, training=training).items():
        if key in INVISIBLE:
            continue
        predicted["total"] += flops
        path = key.split(".")[0]
        if key != "head" and path not in OUTSIDE_PATH:
            predicted[path] += flops
    return dict(predicted)


@pytest.mark.parametrize("training", [False, True], ids=["forward", "train"])
@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_count_matches_the_flop_counter(family: str, seq_len: int, training: bool) -> None:
    """Per path and in total: forward FLOPs (eval) and a training step's (forward, backward
    and recomputation, train mode) agree with what the counter sees run."""
    torch.manual_seed(0)
    model = _build(family)
    measured = _measure(model, seq_len, training)
    predicted = _predict(model, seq_len, training)
    assert predicted.keys() == measured.keys()
    for key, value in measured.items():
        assert predicted[key] == pytest.approx(value, rel=TOLERANCE), key


def test_activation_checkpointing_counts_the_recomputed_forward() -> None:
    """Under activation checkpointing each block's forward runs again in backward."""
    model = _build("hydra")
    plain = count_flops(model, 64, training=True).train_per_token
    model.activation_checkpointing = True
    measured = _measure(model, 64, training=True)
    predicted = _predict(model, 64, training=True)
    breakdown = component_breakdown(model, 64, training=True)
    assert sum(breakdown.values()) == pytest.approx(
        count_flops(model, 64, training=True).train_per_token
    )
    assert count_flops(model, 64, training=True).train_per_token > plain
    assert predicted["total"] == pytest.approx(measured["total"], rel=TOLERANCE)


def test_the_old_errors_are_caught() -> None:
    """The tolerance is tight enough to see each error the old count made: C.B^T per head
    (B/C are shared by a group of heads) and training as a flat 3x forward (flash-style
    attention recomputes its scores in backward)."""
    mamba = _build("mamba2")
    measured = _measure(mamba, 64, training=False)["total"]
    predicted = _predict(mamba, 64, training=False)["total"]
    mixer = mamba.blocks["0"].paths["ssm"]
    groups, heads = mixer.cfg.n_groups, mixer.n_heads
    cb = mixer.scan_flops(64)["cb"] * len(mamba.blocks)  # per group, as computed
    per_head = predicted + cb * (heads / groups - 1)
    assert predicted == pytest.approx(measured, rel=TOLERANCE)
    assert per_head != pytest.approx(measured, rel=TOLERANCE)

    transformer = _build("transformer")
    trained = _measure(transformer, 64, training=True)["total"]
    flat = 3 * count_flops(transformer, 64).forward_per_token
    assert count_flops(transformer, 64).train_per_token == pytest.approx(trained, rel=TOLERANCE)
    assert flat != pytest.approx(trained, rel=TOLERANCE)


@pytest.mark.parametrize(("seq_len", "block"), [(40, 16), (48, 16), (7, 16)])
def test_causal_query_blocks_score_up_to_their_end(seq_len: int, block: int) -> None:
    """The blocked causal path over several query blocks (the model tests fit in one block of
    ``QUERY_BLOCK``): block [s, e) scores keys [0, e), as ``_prefix_block_keys`` counts."""
    heads, dim = 2, 8
    q, k, v = (torch.randn(1, seq_len, heads, dim) for _ in range(3))
    seq_idx = torch.zeros(1, seq_len, dtype=torch.long)
    with FlopCounterMode(display=False, custom_mapping=CUSTOM) as counter:
        document_causal_attention(q, k, v, seq_idx, backend="torch", block=block)
    expected = 2 * 2 * heads * dim * seq_len * _prefix_block_keys(seq_len, block)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_breakdown_keys_and_sums(family: str) -> None:
    """``component_breakdown`` keys read ``<path>.<part>`` (and ``head``) and sum to the
    forward and training totals of ``count_flops``."""
    model = _build(family)
    for training in (False, True):
        breakdown = component_breakdown(model, 200, training=training)
        assert "head" in breakdown
        assert all(k == "head" or k.count(".") == 1 for k in breakdown)
        count = count_flops(model, 200, training=training)
        total = count.train_per_token if training else count.forward_per_token
        assert sum(breakdown.values()) == pytest.approx(total)
        assert count.forward_per_token < count.train_per_token
