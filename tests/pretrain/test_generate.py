"""Incremental decoding (``pretrain.models.decode``), sampling (``pretrain.generate``) and the
``generate`` command.

Decoding must give, at every position, the logits a full forward of the whole sequence gives:
fp32, eval mode, every curriculum component on, to 1e-5 absolute + 1e-5 relative (logits are
O(1); what differs is only the order of fp32 sums: a scan stepped token by token against the
chunked scan, a dense softmax against the blocked one). Each family decodes a short prompt then
one token at a time (a 1-token prompt), a prompt longer than its attention window (crossing
several summary chunks, workspace chunks and MoE units) then one token at a time, and pieces of
several tokens. After each token the cache's tensors are those ``new_decode_cache`` sizes for
that context and their bytes those of ``pretrain.models.cache``'s account.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from launch.cli import main
from pretrain.checkpoint.export import pretrained_config, write_export
from pretrain.generate import SamplingSettings, generate, sample_next
from pretrain.models.cache import inference_cache_bytes
from pretrain.models.decode import DecodeCache, new_decode_cache, tensor_shapes
from pretrain.models.lm import CausalLM
from tests.pretrain.model_helpers import build_from_config, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = RTOL = 1e-5
TINY_TRANSFORMER = ("model.d_model=64", "model.n_layers=2", "model.d_ff=128",
                    "model.attention.n_heads=4", "model.vocab_size=128")  # fmt: skip
TINY_MAMBA2 = ("model.d_model=64", "model.n_layers=2", "model.vocab_size=128",
               "model.ssm.d_state=16", "model.ssm.head_dim=16", "model.ssm.chunk_size=32")  # fmt: skip
# family -> (config, overrides, sequence length, a prompt longer than the attention window)
FAMILIES = {
    # window 32, summaries of 16 tokens, 8 kept: 200 tokens fill and evict them; the 90-token
    # prompt leaves 3 chunks behind its window, 2 workspace chunks and 5 MoE units
    "hydra": ("hydra-tiny.yaml", (), 200, 90),
    # leading window 8, chunks of 4 with per-layer (cyclic) offsets
    "attamba": ("attamba-tiny.yaml", (), 64, 30),
    "dreamer": ("dreamer-tiny.yaml", (), 48, 20),  # full attention looped 3 times
    "transformer": ("transformer-29m.yaml", TINY_TRANSFORMER, 48, 20),
    "mamba2": ("mamba2-29m.yaml", TINY_MAMBA2, 80, 40),  # scan chunks of 32
}


def _model(family: str) -> CausalLM:
    config, overrides, _, _ = FAMILIES[family]
    return build_from_config(config, *overrides).eval()


def _pieces(length: int, first: int, step: int) -> list[int]:
    """A prompt of ``first`` tokens, then pieces of ``step`` tokens up to ``length``."""
    rest = length - first
    return [first] + [step] * (rest // step) + ([rest % step] if rest % step else [])


def _decode(
    model: CausalLM,
    ids: torch.Tensor,
    pieces: list[int],
    cache: DecodeCache | None = None,
    check: Callable[[DecodeCache], None] | None = None,
) -> torch.Tensor:
    """Logits [B, T, V] of ``ids`` decoded in ``pieces``, each a call on the cache (``check``
    looks at the cache after each call)."""
    cache = cache if cache is not None else new_decode_cache(model, ids.shape[0])
    out, pos = [], 0
    with torch.no_grad():
        for n in pieces:
            out.append(model(ids[:, pos : pos + n], cache=cache).logits)
            pos += n
            if check is not None:
                check(cache)
    return torch.cat(out, dim=1)


def _sized_as_accounted(model: CausalLM, batch: int) -> Callable[[DecodeCache], None]:
    """A check that the real state after N tokens has the shapes of ``new_decode_cache(N)``
    and the bytes of ``pretrain.models.cache`` (fp32: 4 bytes per element, times the batch)."""

    def check(cache: DecodeCache) -> None:
        n = cache.position
        sized = new_decode_cache(model, batch, n, device="meta")
        for key, paths in cache.states.items():
            for path, state in paths.items():
                assert tensor_shapes(state) == tensor_shapes(sized.states[key][path]), (n, key)
        account = inference_cache_bytes(model, n, bytes_per_elem=4)
        measured = cache.nbytes()
        assert {k: measured.get(k, 0) for k in account} == {
            k: batch * v for k, v in account.items()
        }

    return check


@pytest.mark.parametrize("family", list(FAMILIES))
def test_incremental_logits_equal_the_full_forward(family: str) -> None:
    """Three schedules; token by token, the cache's size is also checked after every call."""
    model = _model(family)
    _, _, length, long_prompt = FAMILIES[family]
    ids = random_tokens(model, 2, length)
    with torch.no_grad():
        full = model(ids).logits
    schedules = {
        "one token at a time": ([1] * length, _sized_as_accounted(model, 2)),
        "a long prompt, then tokens": (_pieces(length, long_prompt, 1), None),
        "pieces of 7": (_pieces(length, 5, 7), None),
    }
    for name, (pieces, check) in schedules.items():
        decoded = _decode(model, ids, pieces, check=check)
        torch.testing.assert_close(
            decoded, full, atol=ATOL, rtol=RTOL, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_bf16_cache_bytes_are_the_account_under_autocast() -> None:
    """bf16 keys, values, conv inputs and pending writes; fp32 scan state, sums, slots, routing."""
    model = _model("hydra")
    ids = random_tokens(model, 1, 70)
    cache = new_decode_cache(model, 1, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _decode(model, ids, _pieces(70, 60, 1), cache)
    assert cache.nbytes() == {k: v for k, v in inference_cache_bytes(model, 70, 2).items() if v}


def test_a_wrong_summary_in_the_cache_changes_the_logits() -> None:
    """The comparison above can fail: halving one cached summary's values moves the logits far
    past the tolerance (as a decoder that mixed up summaries would)."""
    model = _model("hydra")
    ids = random_tokens(model, 2, 140)
    with torch.no_grad():
        full = model(ids).logits
    cache = new_decode_cache(model, 2)
    _decode(model, ids[:, :100], [100], cache)
    summaries = [p["attention"].summaries for p in cache.states.values() if "attention" in p]
    assert all(s.keys.shape[1] == 4 for s in summaries)  # (100 - 32 + 1) // 16 chunks left
    summaries[0].values[:, 0] *= 0.5
    decoded = _decode(model, ids[:, 100:], [1] * 40, cache)
    assert (decoded - full[:, 100:]).abs().max() > 10 * ATOL


def test_decoding_refuses_training_mode() -> None:
    model = _model("transformer").train()
    with pytest.raises(ValueError, match="eval mode"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=new_decode_cache(model, 1))


def test_greedy_generation_follows_the_full_forward_argmax() -> None:
    model = _model("hydra")
    prompt = random_tokens(model, 2, 40)
    out = generate(model, prompt, SamplingSettings(max_new_tokens=12, temperature=0.0))
    assert out.shape == (2, 52) and torch.equal(out[:, :40], prompt)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    assert torch.equal(out[:, 40:], logits[:, 39:].argmax(dim=-1))


def test_sampling_is_deterministic_under_a_seed() -> None:
    model = _model("attamba")
    prompt = random_tokens(model, 1, 12)

    def sample(**kw: object) -> torch.Tensor:
        return generate(model, prompt, SamplingSettings(max_new_tokens=16, **kw))

    assert torch.equal(sample(seed=3), sample(seed=3))
    assert not torch.equal(sample(seed=3), sample(seed=4))
    assert torch.equal(sample(seed=5, top_k=1), sample(temperature=0.0))


def test_top_k_samples_only_the_k_most_likely_tokens() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    allowed = logits.topk(3, dim=-1).indices
    for _ in range(50):
        picked = sample_next(logits, 1.5, 3, gen)
        assert (allowed == picked[:, None]).any(dim=-1).all()


def test_rows_stop_at_eos() -> None:
    model = _model("transformer")
    prompt = random_tokens(model, 2, 5)
    greedy = generate(model, prompt, SamplingSettings(max_new_tokens=6, temperature=0.0))
    eos = int(greedy[0, 6])  # row 0's second new token
    out = generate(model, prompt, SamplingSettings(max_new_tokens=6, temperature=0.0, eos_id=eos))
    assert torch.equal(out[0, 7:], torch.full_like(out[0, 7:], eos))  # padded after it
    first_eos = (greedy[1, 5:] == eos).nonzero()
    stop = 6 if len(first_eos) == 0 else int(first_eos[0]) + 1
    assert torch.equal(out[1, 5 : 5 + stop], greedy[1, 5 : 5 + stop])


def _export(model: CausalLM, tokenizer: dict, out: Path) -> Path:
    write_export(model, pretrained_config(model, tokenizer, {}), out)
    return out


def test_cli_generates_token_ids_from_an_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _model("hydra")
    export = _export(model, {"kind": "ids", "vocab_size": 128}, tmp_path / "export")
    args = ["generate", "--model", str(export), "--prompt", "5 17 3 9", "--max-new-tokens", "6"]
    assert main([*args, "--temperature", "0"]) == 0
    ids = [int(t) for t in capsys.readouterr().out.split()]
    expected = generate(model, torch.tensor([[5, 17, 3, 9]]), SamplingSettings(6, temperature=0))
    assert ids == expected[0, 4:].tolist()
    assert main([*args, "--seed", "7", "--top-k", "5"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--seed", "7", "--top-k", "5"]) == 0
    assert capsys.readouterr().out == first and len(first.split()) == 6
    assert main([*args[:-4], "--prompt", "5 x"]) == 2
    assert "space-separated token ids" in capsys.readouterr().err


def test_cli_generates_text_with_the_exported_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from data_pipeline.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    model = build_from_config("hydra-tiny.yaml", f"model.vocab_size={tok.vocab_size}").eval()
    export = _export(model, tok.describe(), tmp_path / "export")
    args = ["generate", "--model", str(export), "--prompt", "hi", "--temperature", "0"]
    assert main([*args, "--max-new-tokens", "5", "--ignore-eos"]) == 0
    text = capsys.readouterr().out[:-1]  # print's newline
    ids = generate(model, torch.tensor([tok.encode("hi")]), SamplingSettings(5, temperature=0))
    assert text == tok.decode(ids[0, 2:].tolist())
