"""The Dreamer family: the looped stack, depth attention, expert attention, the matched
baselines, compilation of the loop and the curriculum's recurrence (causality and packing are
the family-generic tests in test_models.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.curriculum import CurriculumConfig, StageConfig, apply_stage, resolve_stages
from pretrain.models.common.block import GatedPathBlock
from pretrain.models.common.moe import ChunkMoE
from pretrain.models.dreamer.depth import DepthAttention, DepthState, first_depth_state
from pretrain.models.dreamer.experts import ExpertAttention
from pretrain.models.dreamer.stack import CORE, drawn_recurrence
from pretrain.models.lm import CausalLM
from tests.pretrain.model_helpers import CONFIG_DIR, build_from_config, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "dreamer-tiny.yaml"


def _core_outputs(model: CausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """The shared layer's output at each iteration of one forward."""
    outputs: list[torch.Tensor] = []
    handle = model.blocks[CORE].register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    try:
        model(ids)
    finally:
        handle.remove()
    return outputs


def test_the_shared_layer_exists_once_and_runs_r_times() -> None:
    model = build_from_config(TINY).eval()
    assert list(model.blocks) == ["prelude0", CORE, "coda0"]
    assert model.stack.runs_per_forward() == {"prelude0": 1.0, CORE: 3.0, "coda0": 1.0}
    assert len(_core_outputs(model, random_tokens(model, 1, 16))) == 3
    # init scaling counts block runs: 1 + 3 + 1 = 5 residual additions
    model.init_weights()
    std = model.cfg.init_std / math.sqrt(2 * 5)
    wo = model.blocks[CORE].paths["attention"].wo.weight
    assert abs(wo.std().item() - std) / std < 0.15


def test_r1_without_depth_attention_is_a_plain_block() -> None:
    """R = 1, no prelude/coda, depth attention off: the model is embedding -> one block of
    causal attention and a sigmoid token MoE -> head, rebuilt here from the same weights."""
    model = build_from_config(
        TINY,
        "model.n_layers=1",
        "model.dreamer.n_prelude=0",
        "model.dreamer.n_coda=0",
        "model.dreamer.recurrence=1",
        "model.dreamer.depth_attention=false",
    ).double()
    layer = model.blocks[CORE]
    experts: ExpertAttention = layer.paths["moe"]
    with torch.no_grad():
        experts.depth_embedding.weight.zero_()  # the plain block has no depth to embed
        experts.expert_bias.copy_(torch.randn(experts.cfg.n_experts) * 0.1)
    plain_moe = ChunkMoE(model.cfg.d_model, experts.cfg).double()
    with torch.no_grad():
        # q . K / sqrt(Q) with q = W_q x is x . (K W_q / sqrt(Q)): one router matrix
        router = experts.router.weight @ experts.query.weight / math.sqrt(experts.key_dim)
        plain_moe.router.weight.copy_(router)
        plain_moe.experts.load_state_dict(experts.experts.state_dict())
        plain_moe.expert_bias.copy_(experts.expert_bias)
    plain = GatedPathBlock(
        model.cfg.d_model,
        {"attention": layer.paths["attention"], "moe": plain_moe},
        gated=False,
        norm_eps=model.cfg.norm_eps,
    ).double()
    plain.norms.load_state_dict(layer.norms.state_dict())
    ids = random_tokens(model, 2, 40)
    out = model(ids)
    h, aux = plain(model.tok_embeddings(ids))
    logits = F.linear(model.norm(h), model.tok_embeddings.weight)
    torch.testing.assert_close(out.logits, logits, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.aux_loss, aux.to(out.aux_loss.dtype), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("entry", [0, 1, 2, 3])
def test_depth_attention_sees_exactly_the_earlier_iterations(entry: int) -> None:
    """Memory entry j is the state entering iteration j (the output of iteration j - 1):
    perturbing it moves iteration j's output and later ones, never earlier ones."""
    model = build_from_config(TINY, "model.dreamer.recurrence=4").eval()
    depth: DepthAttention = model.blocks[CORE].paths["depth"]
    ids = random_tokens(model, 2, 24)
    with torch.no_grad():
        ref = _core_outputs(model, ids)
        calls = {"n": 0}
        original = depth.keys_values

        def perturbed(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k, v = original(state)
            calls["n"] += 1
            if calls["n"] - 1 == entry:
                k, v = k + torch.randn_like(k), v + torch.randn_like(v)
            return k, v

        depth.keys_values = perturbed
        out = _core_outputs(model, ids)
    assert len(out) == 4 and calls["n"] == 4
    for r in range(4):
        if r < entry:
            torch.testing.assert_close(out[r], ref[r], atol=0, rtol=0)
        else:
            assert not torch.allclose(out[r], ref[r]), f"iteration {r} ignored entry {entry}"


def test_depth_attention_is_per_position() -> None:
    """A position attends over its own states only: changing positions >= 5 of one memory entry
    leaves the outputs at positions < 5 exactly as they were (causal in sequence)."""
    path = DepthAttention(32, 4, recurrence=3, norm_eps=1e-5).double()
    state = first_depth_state(torch.device("cpu"))
    for _ in range(3):
        state = state.extended(*path.keys_values(torch.randn(1, 10, 32, dtype=torch.float64)))
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    keys = list(state.keys)
    keys[1] = keys[1].clone()
    keys[1][:, 5:] += 1.0
    poked = DepthState(state.index, state.index_tensor, tuple(keys), state.values)
    out, out_poked = path(x, depth=state), path(x, depth=poked)
    torch.testing.assert_close(out_poked[:, :5], out[:, :5], atol=0, rtol=0)
    assert not torch.allclose(out_poked[:, 5:], out[:, 5:])


def _loop_reference(module: ExpertAttention, x: torch.Tensor, r: int) -> torch.Tensor:
    """Expert attention one token and one expert at a time: sigmoid scores of the depth-shifted
    query against each expert key, top-k of the biased scores, normalised weights, SwiGLU."""
    ex = module.experts
    q = x @ module.query.weight.T + module.depth_embedding.weight[r]
    scores = torch.sigmoid(q @ module.router.weight.T / math.sqrt(module.key_dim))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        chosen = (scores[t] + module.expert_bias).topk(module.cfg.top_k).indices.tolist()
        total = sum(scores[t, e] for e in chosen)
        for e in chosen:
            hidden = F.silu(x[t] @ ex.w1[e]) * (x[t] @ ex.w3[e])
            out[t] = out[t] + scores[t, e] / total * (hidden @ ex.w2[e])
    return out


@pytest.mark.parametrize("r", [0, 2])
def test_expert_attention_equals_a_loop_over_experts(r: int) -> None:
    torch.manual_seed(r)
    model = build_from_config(TINY)
    module: ExpertAttention = model.blocks[CORE].paths["moe"].double()
    with torch.no_grad():
        module.expert_bias.copy_(torch.randn(module.cfg.n_experts) * 0.05)
    x = torch.randn(1, 12, model.cfg.d_model, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(1, 12, model.cfg.d_model, dtype=torch.float64)
    y, _ = module(x, depth_index=torch.tensor(r))
    y.backward(grad_out)
    got = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    x.grad = None
    module.zero_grad()
    ref = _loop_reference(module, x[0], r)
    ref.backward(grad_out[0])
    want = [x.grad] + [p.grad for p in module.parameters()]
    torch.testing.assert_close(y[0], ref, atol=1e-10, rtol=1e-10)
    for name, a, b in zip(["x", *dict(module.named_parameters())], got, want, strict=True):
        if b is None:  # only the aux-loss-free balancing bias: not a parameter
            continue
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


def test_routing_changes_with_depth() -> None:
    """The depth embedding enters the router: the same tokens pick other experts at another r."""
    model = build_from_config(TINY)
    module: ExpertAttention = model.blocks[CORE].paths["moe"]
    with torch.no_grad():
        module.depth_embedding.weight.normal_(std=1.0)
        x = torch.randn(64, model.cfg.d_model)
        a = module.router_logits(x, torch.tensor(0)).topk(2).indices
        b = module.router_logits(x, torch.tensor(1)).topk(2).indices
    assert not torch.equal(a, b)


def test_bias_update_once_per_optimizer_step_over_micro_batches() -> None:
    """Two micro-batches, then one optimizer step: the bias moves once, by rate * sign of the
    load of both micro-batches (all depths) against its mean."""
    model = build_from_config(TINY).train()
    module: ExpertAttention = model.blocks[CORE].paths["moe"]
    rate = module.cfg.bias_update_rate
    assert rate > 0
    for seed in (1, 2):
        model(random_tokens(model, 2, 32, seed=seed)).logits.sum().backward()
    load = module.tokens_per_expert.clone()
    per_depth = module.tokens_per_depth.clone()
    assert load.sum() == 2 * 2 * 32 * 3 * module.cfg.top_k  # rows x tokens x depths x k
    torch.testing.assert_close(per_depth.sum(0), load)
    module.after_optimizer_step(stepped=True)
    torch.testing.assert_close(module.expert_bias, rate * torch.sign(load.mean() - load))
    torch.testing.assert_close(module.depth_load, per_depth)
    assert module.tokens_per_expert.sum() == 0 and module.tokens_per_depth.sum() == 0
    metrics = module.selection_metrics()
    assert set(metrics) >= {"distinct_experts_per_token", "depth2/set_entropy_bits"}
    k = module.cfg.top_k
    assert k <= metrics["distinct_experts_per_token"] <= min(module.cfg.n_experts, 3 * k)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    ids = random_tokens(build_from_config(TINY), 2, 32)
    grads = []
    for checkpointing in (False, True):
        model = build_from_config(TINY)
        model.activation_checkpointing = checkpointing
        out = model(ids)
        (out.logits.square().mean() + out.aux_loss).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=lambda m, n=name: f"{n}: {m}")


def _static_shape_experts(x_sorted, counts, w1, w3, w2, backend="torch"):  # noqa: ANN001, ANN201
    """The SwiGLU experts without the torch loop's per-expert slices (whose sizes are routing
    counts: dynamo recompiles on them, whatever r is), for counting compilations due to r."""
    expert = torch.repeat_interleave(
        torch.arange(counts.shape[0]), counts, output_size=x_sorted.shape[0]
    )
    gate = torch.einsum("md,mdf->mf", x_sorted, w1[expert])
    up = torch.einsum("md,mdf->mf", x_sorted, w3[expert])
    return torch.einsum("mf,mfd->md", F.silu(gate) * up, w2[expert])


def _frames_compiled(recurrence: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Dynamo frames compiled for two training steps of the tiny model at ``recurrence``, and
    the compiled and eager logits of the first."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = build_from_config(TINY, f"model.dreamer.recurrence={recurrence}")
    eager = build_from_config(TINY, f"model.dreamer.recurrence={recurrence}")
    counter = CompileCounter()
    model.blocks[CORE].compile(backend=counter)
    ids = random_tokens(model, 2, 32)
    out = model(ids)
    out.logits.sum().backward()
    model(random_tokens(model, 2, 32, seed=5)).logits.sum().backward()
    frames = counter.frame_count
    torch._dynamo.reset()
    return frames, out.logits, eager(ids).logits


def test_compiled_and_checkpointed_layer_counts_each_depth_once() -> None:
    """Compiled expert attention under activation checkpointing: the backward's recompute of
    each iteration must not count the load (or remember the selections) a second time."""
    torch._dynamo.reset()
    model = build_from_config(TINY).train()
    model.activation_checkpointing = True
    model.blocks[CORE].compile(backend="aot_eager")
    module: ExpertAttention = model.blocks[CORE].paths["moe"]
    out = model(random_tokens(model, 2, 32))
    (out.logits.sum() + out.aux_loss).backward()
    torch._dynamo.reset()
    assert len(module.depth_selections) == 3
    assert module.tokens_per_expert.sum() == 2 * 32 * 3 * module.cfg.top_k
    assert module.tokens_per_depth.sum(1).tolist()[:3] == [2 * 32 * module.cfg.top_k] * 3


def test_the_loop_compiles_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared layer's compiled paths (sequence and expert attention) get r as a tensor and
    the same shapes at every iteration: three iterations compile exactly the frames one does
    (a recompile per r would add frames per iteration)."""
    import pretrain.models.common.moe as moe_module

    monkeypatch.setattr(moe_module, "swiglu_experts", _static_shape_experts)
    model = build_from_config(TINY)
    model.blocks[CORE].compile()
    compiled = [n for n, m in model.blocks[CORE].paths.items() if m._compiled_call_impl]
    assert sorted(compiled) == ["attention", "moe"]
    frames_1, _, _ = _frames_compiled(1)
    frames_3, logits, eager_logits = _frames_compiled(3)
    assert frames_1 > 0 and frames_3 == frames_1
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)


def test_curriculum_sets_the_recurrence_and_eval_uses_the_configured_one() -> None:
    model = build_from_config(TINY, "model.dreamer.train_recurrence=[1,4]")
    stages = resolve_stages(
        CurriculumConfig([StageConfig(name="shallow", steps=2, recurrence=2), StageConfig()]),
        total_steps=10,
        seq_len=32,
        rows_per_step=1,
    )
    ids = random_tokens(model, 1, 16)
    model.train()
    apply_stage(model, stages, 1)
    assert len(_core_outputs(model, ids)) == 2
    for step in (2, 5, 9):  # the last stage draws R per step, from the step alone
        apply_stage(model, stages, step)
        assert len(_core_outputs(model, ids)) == drawn_recurrence(step, 1, 4)
    assert {drawn_recurrence(s, 1, 4) for s in range(50)} == {1, 2, 3, 4}
    model.eval()
    assert len(_core_outputs(model, ids)) == 3  # dreamer.recurrence


def test_matched_baselines_match_what_they_say(capsys: pytest.CaptureFixture) -> None:
    """transformer-29m matches dreamer-29m's parameters, -flops its training FLOPs per token
    at train.seq_len and -mem its decode cache there, each within 1%, as `params` reports."""
    from launch.cli import main

    def _params_json(config: str) -> dict:
        assert main(["params", "--config", str(CONFIG_DIR / config), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    dreamer = _params_json("dreamer-29m.yaml")
    seq = str(dreamer["flops_per_token"]["seq_len"])

    def close(a: float, b: float) -> bool:
        return abs(a - b) <= 0.01 * b

    params = _params_json("transformer-29m.yaml")
    assert close(params["total_params"], dreamer["total_params"])
    flops = _params_json("transformer-29m-flops.yaml")
    assert close(flops["flops_per_token"]["train"], dreamer["flops_per_token"]["train"])
    mem = _params_json("transformer-29m-mem.yaml")
    assert close(mem["inference_cache"][seq]["total"], dreamer["inference_cache"][seq]["total"])
    # and each matches only its own quantity (three different baselines)
    assert not close(params["flops_per_token"]["train"], dreamer["flops_per_token"]["train"])
    assert not close(flops["total_params"], dreamer["total_params"])
    assert not close(mem["total_params"], dreamer["total_params"])


def test_bad_dreamer_configs_name_their_keys() -> None:
    from pretrain.config import ConfigError, load_config

    cases = {
        "model.n_layers=4": "model.n_layers",
        "model.moe.routing=chunk": "model.moe.routing",
        "model.moe.score_func=softmax": "model.moe.score_func",
        "model.dreamer.depth_heads=3": "model.dreamer.depth_heads",
        "model.dreamer.recurrence=9": "model.dreamer.max_recurrence",
        "model.dreamer.train_recurrence=[3,2]": "model.dreamer.train_recurrence",
        "model.moe.every=2": "model.moe.every",
        "parallel.cp=2": "parallel.cp",
    }
    for override, key in cases.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(CONFIG_DIR / TINY, [override])
    with pytest.raises(ConfigError, match=r"recurrence: model.family=transformer"):
        load_config(
            CONFIG_DIR / "transformer-29m.yaml",
            ["curriculum.stages=[{name: a, recurrence: 2}]"],
        )


def test_eval_command_scores_a_dreamer_run(tmp_path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    """The unchanged eval entry point on a Dreamer checkpoint, including the routing-MI task
    whose hook re-routes each expert-attention call with its depth."""
    from launch.cli import main
    from parallel.dist import DistInfo
    from pretrain.build import build_trainer
    from pretrain.config import load_config
    from tests.pretrain.trainer_helpers import DREAMER_FAST, FAST

    run = tmp_path / "run"
    overrides = [*FAST, *DREAMER_FAST, "train.steps=2", "checkpoint.every=2", f"run.dir={run}"]
    build_trainer(load_config(CONFIG_DIR / TINY, overrides), DistInfo(), log=lambda m: None).run()
    capsys.readouterr()
    args = ["eval", "--run", str(run), "--tasks", "domain_mixture", "--batches", "1"]
    assert main([*args, "--batch-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    scores = report["tasks"]["domain_mixture"]
    assert math.isfinite(scores["loss"]) and "expert_mi_bits/Lcore" in scores


def test_flops_count_the_depth_a_step_trains_at() -> None:
    """Training FLOPs follow the step's R (a stage's or a drawn one); evaluation's use
    dreamer.recurrence; a model built for R = 2 counts what the R = 4 model trains at R = 2."""
    from pretrain.flops import count_flops

    deep = build_from_config(TINY, "model.dreamer.recurrence=4")
    shallow = build_from_config(TINY, "model.dreamer.recurrence=2")
    deep.set_step(0, recurrence=2)
    trained = count_flops(deep, 64, training=True).components
    assert trained == count_flops(shallow, 64).components
    assert count_flops(deep, 64).forward_per_token > sum(trained.values())
