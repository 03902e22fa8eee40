"""``hydra-pretrain generate``: continue a prompt with an exported model.

    hydra-pretrain generate --model export/ --prompt "The cat" --max-new-tokens 64 --top-k 40
    hydra-pretrain generate --model export/ --prompt "5 17 3" --temperature 0     # token ids

The model and its tokenizer come from an export directory (``hydra-pretrain export``:
``config.json``, ``model.safetensors``, ``tokenizer.json``), loaded by ``load_pretrained``. An
export of a run on synthetic tasks only has no text tokenizer: the prompt is then space-separated
token ids and the continuation is printed as ids. Decoding uses the model's incremental cache
(``pretrain.models.decode``): the prompt runs once, then each new token is one cached step.
Prints the continuation (not the prompt) on stdout; errors are one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


class GenerateError(RuntimeError):
    """A request that cannot run (a bad prompt or setting); printed as one line."""


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``generate`` subcommand's flags."""
    parser.add_argument(
        "--model", required=True, help="export directory (config.json + model.safetensors)"
    )
    parser.add_argument(
        "--prompt",
        required=True,
        help="text to continue; space-separated token ids when the export has no tokenizer",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy"
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="sample among the k most likely tokens (default: all)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the sampler (default: a random one)"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="'ids', 'byte' or a tokenizer.json path instead of the export's (default: the"
        " export's)",
    )
    parser.add_argument(
        "--ignore-eos", action="store_true", help="keep going after the tokenizer's end token"
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run"
    )


def _tokenizer(args: argparse.Namespace) -> Any:
    """The tokenizer to use, or None for raw token ids."""
    from data_pipeline.errors import DataConfigError
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.checkpoint.export import exported_tokenizer

    spec = args.tokenizer
    try:
        if spec is None:
            return exported_tokenizer(args.model)
        return None if spec == "ids" else load_tokenizer(spec)
    except DataConfigError as err:
        raise GenerateError(f"tokenizer: {err}") from None


def prompt_ids(prompt: str, tokenizer: Any, vocab_size: int) -> list[int]:
    """Token ids of ``prompt``: encoded by ``tokenizer``, or parsed as integers when None.

    Raises:
        GenerateError: an empty prompt, a non-integer or an id outside the vocabulary.
    """
    if tokenizer is not None:
        ids = tokenizer.encode(prompt)
    else:
        try:
            ids = [int(tok) for tok in prompt.split()]
        except ValueError:
            raise GenerateError(
                "this model has no tokenizer: the prompt must be space-separated token ids"
            ) from None
    if not ids:
        raise GenerateError("the prompt has no tokens")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise GenerateError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})")
    return ids


def generate_text(args: argparse.Namespace) -> str:
    """Load the export, sample, and return the continuation as text (or ids)."""
    import torch

    from launch.evaluation import _device  # the same --device rule as eval's
    from pretrain import load_pretrained
    from pretrain.generate import SamplingSettings, generate

    device = _device(args.device)
    model = load_pretrained(args.model, device=device)
    tokenizer = _tokenizer(args)
    ids = prompt_ids(args.prompt, tokenizer, model.cfg.vocab_size)
    eos = None if tokenizer is None or args.ignore_eos else tokenizer.eos_id
    try:
        settings = SamplingSettings(
            args.max_new_tokens, args.temperature, args.top_k, args.seed, eos
        )
    except ValueError as err:
        raise GenerateError(str(err)) from None
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    out = generate(model, prompt, settings, progress=sys.stderr.isatty())
    new = out[0, len(ids) :].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return tokenizer.decode(new) if tokenizer is not None else " ".join(map(str, new))


def run_generate(args: argparse.Namespace) -> int:
    """The ``generate`` subcommand: the continuation on stdout (exit 0), or one error line on
    stderr (exit 2)."""
    from pretrain.checkpoint.errors import CheckpointError
    from pretrain.eval import EvalError

    try:
        text = generate_text(args)
    except (GenerateError, CheckpointError, EvalError) as err:
        print(f"generate error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0
