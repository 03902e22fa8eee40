"""The full fp32 model weights of a DeepSpeed engine checkpoint, read offline in one process.

Under ZeRO 1-3 the fp32 master weights live in the ranks' optimizer partitions (ZeRO-3 also
partitions the model states); DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` merges them
without a process group, on CPU, and puts tied parameters (``shared_params``) back. Nothing here
verifies the directory: callers check it against its manifest first
(``pretrain.checkpoint.verify``).

DeepSpeed's reader calls ``torch.load(weights_only=False)``, which runs pickled code; its loads
are made ``weights_only=True`` here, with the DeepSpeed classes its files hold allowlisted (the
same list the training resume uses, ``parallel.deepspeed.deepspeed_safe_globals``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint.errors import CheckpointError

logger = logging.getLogger("pretrain.checkpoint")


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside is ``weights_only=True`` (DeepSpeed asks for False)."""
    from parallel.deepspeed import deepspeed_safe_globals

    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def load_deepspeed_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The full model state dict (parameters in fp32, buffers as saved) of one checkpoint.

    Args:
        ckpt_dir: a ``step_XXXXXXXX`` directory written by ``parallel.deepspeed``
            (DeepSpeed's tag directory), any world size, ZeRO stage 1, 2 or 3.

    Raises:
        CheckpointError: DeepSpeed could not read or merge it (the message says why).
    """
    # DeepSpeed's logger writes to the sys.stdout it finds at import: make that stderr, so a
    # command's stdout (the export's JSON) stays clean
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir = Path(ckpt_dir)
    chatter = io.StringIO()  # the merge prints its progress to stdout: kept for the debug log
    try:
        with _weights_only_loads(), contextlib.redirect_stdout(chatter):
            state = get_fp32_state_dict_from_zero_checkpoint(
                str(ckpt_dir.parent), tag=ckpt_dir.name
            )
    except Exception as exc:  # DeepSpeed raises ValueError, FileNotFoundError, KeyError, ...
        raise CheckpointError(
            f"cannot read the DeepSpeed weights of {ckpt_dir}: {type(exc).__name__}: {exc}"
        ) from None
    logger.debug("DeepSpeed merge of %s: %s", ckpt_dir, chatter.getvalue().strip())
    return dict(state)
