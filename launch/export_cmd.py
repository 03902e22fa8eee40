"""``hydra-pretrain export``: a run's checkpoint as ``model.safetensors`` + ``config.json`` (+ the
tokenizer), for sharing and for ``pretrain.load_pretrained``.

    hydra-pretrain export --run runs/hydra-tiny --out export/hydra-tiny       # newest valid step
    hydra-pretrain export --run runs/X --step 40 --out export/X --force       # replace an export

Any checkpoint the trainer writes exports: DCP (``parallel.backend`` fsdp2, ddp or none, any
world size) and DeepSpeed engine checkpoints (ZeRO 1-3; the partitions are merged offline). The
checkpoint is verified (manifest, sizes, sha256) before anything is written; without ``--step`` a
bad newest checkpoint is skipped with a warning, as a resuming run would. Prints one JSON object.
The layout of an export: docs/checkpoints.md, "Export".
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("launch.export")


class ExportError(RuntimeError):
    """An export that cannot be written; the command prints the message and exits with 2."""


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``export`` subcommand's flags."""
    parser.add_argument(
        "--run",
        required=True,
        help="run directory, its checkpoints/ directory or one step_XXXXXXXX checkpoint",
    )
    parser.add_argument(
        "--step",
        type=int,
        default=None,
        help="checkpoint step to export (default: the newest checkpoint that verifies)",
    )
    parser.add_argument("--out", required=True, help="export directory (created if missing)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out (replaces model.safetensors, config.json and"
        " tokenizer.json there; other files are left alone)",
    )
    parser.add_argument(
        "--tokenizer",
        default="auto",
        help="tokenizer to ship: 'auto' (default: the one the run's shard sources were prepared"
        " with, or 'ids' for a run on synthetic tasks only), 'byte', 'ids' (token ids are the"
        " vocabulary), or a tokenizer.json / directory holding one",
    )


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} is not empty; pass --force to write the export into it")


def _run_tokenizer(cfg: Any) -> tuple[dict[str, Any], Path | None]:
    """(description, tokenizer.json to copy) of the tokenizer the run's shards were made with."""
    from data_pipeline.errors import DataConfigError
    from data_pipeline.shards import Manifest
    from pretrain.checkpoint.export import IDS_TOKENIZER

    shard_paths = [src.path for src in cfg.data.sources if src.path is not None]
    if not shard_paths:  # synthetic tasks emit token ids directly
        return {"kind": IDS_TOKENIZER, "vocab_size": cfg.model.vocab_size}, None
    try:
        manifest = Manifest.load(shard_paths[0])  # the reader requires one tokenizer for all
    except DataConfigError as err:
        raise ExportError(
            f"cannot find the run's tokenizer: {err}; pass --tokenizer byte|ids|PATH"
        ) from None
    info = dict(manifest.tokenizer)
    if info.get("kind") == "byte":
        return info, None
    info.setdefault("file", "tokenizer.json")
    path = Path(shard_paths[0]) / info["file"]
    if not path.is_file():
        raise ExportError(f"the run's tokenizer {path} is missing; pass --tokenizer PATH")
    return {**info, "file": "tokenizer.json"}, path


def _chosen_tokenizer(spec: str, cfg: Any) -> tuple[dict[str, Any], Path | None]:
    """(description for config.json, tokenizer.json to copy or None) for ``--tokenizer``."""
    from data_pipeline.errors import DataConfigError
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.checkpoint.export import IDS_TOKENIZER

    if spec == "auto":
        info, path = _run_tokenizer(cfg)
    elif spec == IDS_TOKENIZER:
        info, path = {"kind": IDS_TOKENIZER, "vocab_size": cfg.model.vocab_size}, None
    else:
        try:
            tok = load_tokenizer(spec)
        except DataConfigError as err:
            raise ExportError(f"--tokenizer: {err}") from None
        info = tok.describe()
        path = Path(tok.source) if spec != "byte" else None
        if path is not None:
            info["file"] = "tokenizer.json"
    if info["vocab_size"] > cfg.model.vocab_size:
        raise ExportError(
            f"the tokenizer has {info['vocab_size']} ids, more than the model's"
            f" model.vocab_size={cfg.model.vocab_size}"
        )
    return info, path


def export_run(args: argparse.Namespace) -> dict[str, Any]:
    """Verify and load the checkpoint, write the export; returns the summary printed."""
    from tqdm import tqdm

    from pretrain.checkpoint import files
    from pretrain.checkpoint.export import pretrained_config, write_export
    from pretrain.eval import load_checkpoint_model
    from pretrain.models.params import count_parameters

    out = Path(args.out)
    _check_out(out, args.force)
    with tqdm(total=2, desc="export: verify + load checkpoint", file=sys.stderr) as bar:
        loaded = load_checkpoint_model(args.run, args.step, "cpu")
        tokenizer, tokenizer_file = _chosen_tokenizer(args.tokenizer, loaded.cfg)
        bar.update()
        bar.set_description(f"export: write {out}")
        engine = files.read_manifest(loaded.path).get("engine", files.ENGINE_DCP)
        source = {
            "checkpoint": str(loaded.path.resolve()),
            "step": loaded.step,
            "engine": engine,
            "world_size": loaded.world_size,
            "stage": loaded.stage.cfg.name,
        }
        config = pretrained_config(loaded.model, tokenizer, source)
        weights = write_export(loaded.model, config, out, tokenizer_file)
        bar.update()
    return {
        "out": str(out),
        "weights": str(weights),
        **source,
        "family": loaded.cfg.model.family,
        "params": count_parameters(loaded.model).total,
        "tokenizer": tokenizer["kind"],
    }


def _one_line(message: str) -> str:
    return message.replace(":\n  ", ": ").replace("\n  ", "; ").replace("\n", " ")


def run_export(args: argparse.Namespace) -> int:
    """The ``export`` subcommand: exit 0 with a JSON summary on stdout, 2 with one line on stderr."""
    from pretrain.eval import EvalError

    try:
        summary = export_run(args)
    except (ExportError, EvalError) as err:
        print(f"export error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
