"""Sampling from a causal LM with its incremental decode cache (``pretrain.models.decode``).

The prompt runs through the model once (it fills the cache, at a forward's cost); each new token
is then one cached step. Sampling: greedy at ``temperature = 0``, else softmax(logits /
temperature), optionally restricted to the ``top_k`` most likely tokens, drawn with a
``torch.Generator`` seeded by ``seed`` (the same seed, model and prompt give the same tokens).

Shape legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from pretrain.models.decode import new_decode_cache
from pretrain.models.lm import CausalLM


@dataclass(frozen=True)
class SamplingSettings:
    """How each next token is chosen."""

    max_new_tokens: int = 32  # tokens to generate after the prompt
    temperature: float = 1.0  # 0: greedy (argmax); otherwise softmax(logits / temperature)
    top_k: int | None = None  # sample among the k most likely tokens only (None: all)
    seed: int | None = None  # seeds the sampling generator (None: a nondeterministic seed)
    eos_id: int | None = None  # stop a row after it emits this token (others go on)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token ids [B] from the last position's logits [B, V].

    Args:
        logits: [B, V] scores of the next token.
        temperature: 0 picks the argmax; otherwise the softmax of logits / temperature is sampled.
        top_k: keep only the k largest logits of each row before sampling (None: keep all).
        generator: the random source (on the logits' device).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: CausalLM,
    prompt_ids: torch.Tensor,
    settings: SamplingSettings,
    progress: bool = False,
) -> torch.Tensor:
    """Continue each row of ``prompt_ids`` with ``settings.max_new_tokens`` sampled tokens.

    Args:
        model: the language model (put in eval mode here; left there).
        prompt_ids: [B, T] int64 token ids on the model's device, T >= 1 (rows of equal length).
        settings: how tokens are chosen and how many.
        progress: show a progress bar over the new tokens.

    Returns:
        [B, T + n] the prompts followed by the new tokens; after a row emits ``eos_id`` it is
        padded with ``eos_id`` (n < max_new_tokens when every row has stopped).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be [B, T] with T >= 1, got {tuple(prompt_ids.shape)}")
    model.eval()
    device = prompt_ids.device
    generator = torch.Generator(device=device)
    if settings.seed is not None:
        generator.manual_seed(settings.seed)
    else:
        generator.seed()
    cache = new_decode_cache(model, prompt_ids.shape[0], device=device)
    logits = model(prompt_ids, cache=cache).logits[:, -1]
    tokens = [prompt_ids]
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=device)
    steps = tqdm(range(settings.max_new_tokens), desc="generate", unit="tok", disable=not progress)
    for step in steps:
        next_ids = sample_next(logits, settings.temperature, settings.top_k, generator)
        if settings.eos_id is not None:
            next_ids = next_ids.masked_fill(done, settings.eos_id)
            done = done | (next_ids == settings.eos_id)
        tokens.append(next_ids[:, None])
        if bool(done.all()) or step + 1 == settings.max_new_tokens:
            break  # no forward for a token nobody reads
        logits = model(next_ids[:, None], cache=cache).logits[:, -1]
    return torch.cat(tokens, dim=1)
