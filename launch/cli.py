"""``hydra-pretrain``: the command line.

Subcommands: ``params`` (parameter account of a config), ``train`` (one process, or one rank
of torchrun/deepspeed: ``torchrun ... $(which hydra-pretrain) train ...``; ``python -m
launch.train`` is an alias), ``prepare`` (text -> webdataset token shards), ``eval`` (score a
checkpoint on held-out tasks). The ``--help`` text is ``DESCRIPTION``, plain text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pretrain.stop_signal import install_if_training

# `train` handles SIGTERM from here on, before the imports below bring in torch (this runs when
# the hydra-pretrain script imports this module, before it calls main)
install_if_training(sys.argv)

from data_pipeline.prepare import add_prepare_arguments, run_prepare  # noqa: E402
from launch.evaluation import add_eval_arguments, run_eval  # noqa: E402
from launch.export_cmd import add_export_arguments, run_export  # noqa: E402
from launch.generate_cmd import add_generate_arguments, run_generate  # noqa: E402
from launch.logging_setup import ALL_RANKS_ENV, configure_logging  # noqa: E402
from launch.package_check import check_own_packages  # noqa: E402
from pretrain.allocator import apply_malloc_policy  # noqa: E402
from pretrain.config_errors import ConfigError  # noqa: E402

# --help text: plain, no reST (the module docstring is for readers of the code)
DESCRIPTION = """\
Pretraining for hybrid long-context language models (Hydra, Attamba, Dreamer).

The same train command runs one process, or each rank under torchrun or deepspeed:
  hydra-pretrain train --config configs/hydra-tiny.yaml train.steps=200
  torchrun --nproc_per_node 2 $(which hydra-pretrain) train --config CONFIG parallel.backend=fsdp2
  python -m launch.deepspeed_run --num_gpus 2 $(which hydra-pretrain) train --config CONFIG ...
(launch.deepspeed_run: the deepspeed launcher, forwarding SIGTERM to the ranks)

Run "hydra-pretrain COMMAND --help" for the flags of a command."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the line breaks of descriptions and adds each option's default to its help, unless
    the help already says it (a default of None needs words: its help explains it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.required
            or action.default is None
            or action.default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with ``HelpFormatter``; subcommands added with ``add_parser`` get
    it too (argparse makes them of their parent's class)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - ArgumentParser's
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def package_version() -> str:
    """The installed distribution's version (``importlib.metadata``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hydra-pretrain")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _add_local_rank(parser: argparse.ArgumentParser) -> None:
    # deepspeed's launcher passes --local_rank=N (torch.distributed.launch --local-rank=N);
    # LOCAL_RANK in the environment says the same, and is what we read
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="YAML run config, e.g. configs/hydra-tiny.yaml"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. model.d_model=256 train.steps=10 (default: none)",
    )


def _format_count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


# context lengths of the inference-cache account, besides the config's own train.seq_len
CACHE_CONTEXTS = (8192, 65536)


def run_params(args: argparse.Namespace) -> int:
    from pretrain.config import load_config
    from pretrain.flops import count_flops
    from pretrain.models import build_model
    from pretrain.models.cache import inference_cache_bytes
    from pretrain.models.params import count_parameters
    from pretrain.optim import param_group_name

    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg.model, device="meta")  # no memory: the 1.6B config is fine anywhere
    account = count_parameters(model).as_dict()
    account["family"] = cfg.model.family
    contexts = sorted({cfg.train.seq_len, *CACHE_CONTEXTS})
    caches = {length: inference_cache_bytes(model, length) for length in contexts}
    account["inference_cache"] = {str(length): cache for length, cache in caches.items()}
    flops = count_flops(model, cfg.train.seq_len)
    account["flops_per_token"] = {
        "seq_len": cfg.train.seq_len,
        "forward": flops.forward_per_token,
        "train": flops.train_per_token,
        "components": flops.components,
    }
    if args.json:
        print(json.dumps(account))
        return 0
    print(f"{cfg.model.family} model from {args.config}")
    print(f"{'component':<18}{'total':>16}{'active/token':>16}")
    for name, c in account["components"].items():
        print(f"{name:<18}{c['total']:>16,}{c['active']:>16,}")
    total, active = account["total_params"], account["active_params"]
    print(
        f"{'TOTAL':<18}{total:>16,}{active:>16,}   ({_format_count(total)} total, "
        f"{_format_count(active)} active)"
    )
    tables = sum(
        p.numel() for n, p in model.named_parameters() if param_group_name(n, p) == "pkm_values"
    )
    print(_per_rank_line(cfg, total, tables))
    print(
        f"FLOPs per token at {cfg.train.seq_len} tokens: forward {flops.forward_per_token / 1e6:,.2f}M,"
        f" training {flops.train_per_token / 1e6:,.2f}M executed"
        f" ({flops.train_per_token / flops.forward_per_token:.2f}x forward: real backward and"
        " recomputation)"
    )
    for length, cache in caches.items():
        print(_cache_line(length, cache["total"]))
    return 0


def _cache_line(context_len: int, total_bytes: int) -> str:
    """One sequence's decode cache (bf16 activations, fp32 recurrent states) at a context."""
    return (
        f"inference cache at {context_len} tokens: {total_bytes / 2**20:,.2f} MiB per sequence,"
        f" {total_bytes / context_len:,.1f} bytes/token"
    )


# fp32 parameter + fp32 gradient + two fp32 AdamW moments (FSDP2 shards all four)
STATE_BYTES_PER_PARAM = 16


def _per_rank_line(cfg, total: int, tables: int) -> str:  # noqa: ANN001 - a RunConfig
    """Parameter and optimizer memory per rank, and tokens per rank, under ``cfg.parallel``;
    the PKM value tables (``tables`` parameters) are split over ``parallel.pkm_shard``."""
    from parallel.dims import PKM_SHARD_DIMS, ParallelDims

    pc = cfg.parallel
    if pc.backend != "fsdp2" or min(pc.dp_shard, pc.cp, pc.ep) < 1:
        return (
            f"per rank: parallel.backend={pc.backend} dp_shard={pc.dp_shard} cp={pc.cp}: set"
            " fsdp2 with explicit dp_shard and cp for a per-rank account"
        )
    # HSDP replicas do not change what one rank holds: count one
    dims = ParallelDims(1, pc.dp_shard, pc.cp, pc.ep)
    shards = pc.dp_shard * pc.cp  # dense over dp_shard x cp; experts over ep x efsdp x cp
    # pkm_shard=none leaves the table to FSDP: sharded like the rest, all-gathered in each forward
    split = pc.pkm_shard != "none"
    table_shards = dims.size_of(PKM_SHARD_DIMS[pc.pkm_shard]) if split else shards
    state_gb = STATE_BYTES_PER_PARAM * ((total - tables) / shards + tables / table_shards) / 1e9
    tokens = cfg.train.seq_len // pc.cp
    line = (
        f"per rank (fsdp2 over dp_shard={pc.dp_shard} x cp={pc.cp} = {shards} shards):"
        f" params+grads+AdamW {state_gb:.2f} GB; {tokens:,} of each row's {cfg.train.seq_len:,}"
        " tokens (activation memory: docs/results.md, Context parallelism)"
    )
    if tables:
        table_gb = STATE_BYTES_PER_PARAM * tables / table_shards / 1e9
        how = (
            f"split by columns over {table_shards} ranks (parallel.pkm_shard={pc.pkm_shard})"
            if split
            else f"in FSDP: each forward all-gathers all {tables * 4 / 1e9:.2f} GB (fp32)"
        )
        line += (
            f"\nPKM value tables: {_format_count(tables)} params, {how}: {table_gb:.2f} GB of"
            f" params+grads+AdamW per rank ({STATE_BYTES_PER_PARAM * tables / 1e9:.2f} GB whole)"
        )
    return line


def run_train(args: argparse.Namespace) -> int:
    from launch.train import train_main

    return train_main(args.config, args.overrides, log_all_ranks=args.log_all_ranks)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` flags (also ``python -m launch.train``'s, and every launcher's)."""
    _add_config_args(parser)
    parser.add_argument(
        "--log-all-ranks",
        action="store_true",
        help=f"log every rank's records, marked [rank N] (also {ALL_RANKS_ENV}=1); by default"
        " only rank 0 logs, the other ranks only their warnings and errors",
    )
    _add_local_rank(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="hydra-pretrain", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _add_local_rank(parser)  # deepspeed puts it before the subcommand
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:])

    params = command("params", "print the parameter account of a config")
    _add_config_args(params)
    params.add_argument("--json", action="store_true", help="print one JSON object")
    params.set_defaults(func=run_params)

    train = command("train", "train a model: one process, or each rank under torchrun or deepspeed")
    add_train_arguments(train)
    train.set_defaults(func=run_train)

    prepare = command("prepare", "tokenise text into webdataset token shards")
    add_prepare_arguments(prepare)
    prepare.set_defaults(func=run_prepare)

    evaluate = command("eval", "evaluate a checkpoint on held-out tasks and shards")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=run_eval)

    export = command("export", "export a checkpoint as model.safetensors + config.json")
    add_export_arguments(export)
    export.set_defaults(func=run_export)

    generate = command("generate", "continue a prompt with an exported model (cached decoding)")
    add_generate_arguments(generate)
    generate.set_defaults(func=run_generate)
    return parser


def _run(argv: list[str] | None) -> int:
    check_own_packages()
    args = build_parser().parse_args(argv)
    configure_logging(all_ranks=getattr(args, "log_all_ranks", False))
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """``hydra-pretrain``: run the command in ``argv`` (default: the command line).

    As a rank of torchrun or deepspeed (``WORLD_SIZE`` > 1, arguments from the command line)
    it never returns: the process ends through ``parallel.dist.run_and_exit``, which flushes and
    leaves with ``os._exit`` after a process group (a plain exit can abort at interpreter
    finalization). Called with ``argv``, it returns the exit code.

    A command line (``argv`` None) first applies the malloc policy (``pretrain.allocator``,
    before any large allocation); a call with ``argv`` (a test, a script) leaves the calling
    process's allocator as it is.
    """
    if argv is None:
        apply_malloc_policy()
    if argv is None and int(os.environ.get("WORLD_SIZE") or 1) > 1:
        from parallel.dist import run_and_exit

        run_and_exit(lambda: _run(sys.argv[1:]))
    return _run(argv)


if __name__ == "__main__":
    sys.exit(main())
