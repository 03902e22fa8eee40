"""``hydra-pretrain``: the command line.

Subcommands: ``params`` (parameter account of a config), ``train`` (single-process training),
``prepare`` (text -> webdataset token shards), ``eval`` (score a checkpoint on held-out tasks).
"""

from __future__ import annotations

import argparse
import json
import sys

from data_pipeline.prepare import add_prepare_arguments, run_prepare
from launch.evaluation import add_eval_arguments, run_eval
from launch.package_check import check_own_packages
from pretrain.config_errors import ConfigError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="YAML run config, e.g. configs/hydra-tiny.yaml"
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. model.d_model=256 train.steps=10"
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
        f" training {flops.train_per_token / 1e6:,.2f}M (3x forward)"
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

    return train_main(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hydra-pretrain", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    params = sub.add_parser("params", help="print the parameter account of a config")
    _add_config_args(params)
    params.add_argument("--json", action="store_true", help="print one JSON object")
    params.set_defaults(func=run_params)

    train = sub.add_parser("train", help="train a model (single process)")
    _add_config_args(train)
    train.set_defaults(func=run_train)

    prepare = sub.add_parser("prepare", help="tokenise text into webdataset token shards")
    add_prepare_arguments(prepare)
    prepare.set_defaults(func=run_prepare)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on held-out tasks and shards")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=run_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    check_own_packages()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
