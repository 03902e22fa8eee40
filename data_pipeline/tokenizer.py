"""Tokenizers: a byte-level tokenizer that needs no training, and Hugging Face byte-level BPE
(trained locally on files, or loaded from a ``tokenizer.json``). Nothing is downloaded.

Every tokenizer reserves the special ids of ``data_pipeline.tokens`` (PAD/BOS/EOS and the task
markers) at the same ids, so text shards and synthetic tasks can share a model's vocabulary.
A foreign ``tokenizer.json`` (not trained here) is accepted when it has an EOS token; its own
special ids are used and recorded in the shard manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from data_pipeline.errors import DataConfigError
from data_pipeline.tokens import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, SPECIAL_TOKENS

# Names under which foreign tokenizers commonly keep their specials (first match wins).
_EOS_NAMES = ("<eos>", "<|endoftext|>", "</s>", "<|end_of_text|>")
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer(Protocol):
    """What ``prepare`` and the trainer need from a tokenizer."""

    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def describe(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: byte ``b`` is id ``NUM_SPECIAL + b``; vocab ``NUM_SPECIAL + 256``."""

    vocab_size = NUM_SPECIAL + 256
    eos_id = EOS_ID
    bos_id: int | None = BOS_ID
    pad_id = PAD_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self.encode_batch([text])[0].tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text as uint32 arrays (no BOS/EOS added)."""
        return [
            np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint32) + NUM_SPECIAL
            for t in texts
        ]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        data = bytes(i - NUM_SPECIAL for i in ids if NUM_SPECIAL <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def describe(self) -> dict:
        """What the manifest records about this tokenizer."""
        return {"kind": "byte", "vocab_size": self.vocab_size}


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with its special ids resolved."""

    def __init__(self, tok: object, source: str = "") -> None:
        from tokenizers import Tokenizer as _HF

        assert isinstance(tok, _HF)
        self.tok = tok
        self.source = source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = _find_special(tok, _EOS_NAMES)
        if self.eos_id is None:
            raise DataConfigError(
                f"tokenizer {source or '(in memory)'} has no EOS token (looked for {_EOS_NAMES})"
            )
        self.bos_id = _find_special(tok, _BOS_NAMES)
        pad = _find_special(tok, _PAD_NAMES)
        self.pad_id = self.eos_id if pad is None else pad  # padding is never a label anyway

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text as uint32 arrays (no BOS/EOS added)."""
        encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens skipped)."""
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json``."""
        self.tok.save(str(path))

    def describe(self) -> dict:
        """What the manifest records about this tokenizer (kind, size and content hash)."""
        blob = self.tok.to_str().encode()
        return {
            "kind": "bpe",
            "vocab_size": self.vocab_size,
            "source": self.source,
            "sha256": hashlib.sha256(blob).hexdigest(),
        }


def _find_special(tok: object, names: Sequence[str]) -> int | None:
    for name in names:
        idx = tok.token_to_id(name)  # type: ignore[attr-defined]
        if idx is not None:
            return int(idx)
    return None


def train_bpe(
    files: Sequence[str | Path],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> HFTokenizer:
    """Train a byte-level BPE on local text files.

    Args:
        files: text files to learn merges from.
        vocab_size: final vocabulary size, including the ``NUM_SPECIAL`` reserved ids and the
            256 byte symbols.
        min_frequency: a pair must occur this often to be merged.
        show_progress: the trainer's own progress bar.

    Returns:
        The tokenizer; the reserved special tokens have ids ``0 .. NUM_SPECIAL-1``.
    """
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < NUM_SPECIAL + 256:
        raise DataConfigError(
            f"bpe vocab_size={vocab_size} must be >= {NUM_SPECIAL + 256}"
            f" ({NUM_SPECIAL} special ids + 256 byte symbols)"
        )
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing or not files:
        raise DataConfigError(f"tokenizer training files not found: {missing or '(none given)'}")
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train([str(f) for f in files], trainer)
    for name, idx in SPECIAL_TOKENS.items():
        assert tok.token_to_id(name) == idx, "BPE trainer did not keep the special ids in order"
    return HFTokenizer(tok, source="trained")


def load_tokenizer(spec: str | Path) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` -> the byte tokenizer; a path -> that ``tokenizer.json`` (or a directory with one).

    Raises:
        DataConfigError: the path does not exist or is not a tokenizer file.
    """
    if str(spec) == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer as _HF

    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataConfigError(f"tokenizer not found: {spec} (expected 'byte' or a tokenizer.json)")
    try:
        tok = _HF.from_file(str(path))
    except Exception as err:  # the Rust side raises a plain Exception with its parse message
        raise DataConfigError(f"cannot load tokenizer {path}: {err}") from None
    return HFTokenizer(tok, source=str(path))


def tokenizer_from_manifest(info: dict, base: Path) -> ByteTokenizer | HFTokenizer:
    """Rebuild the tokenizer a dataset was prepared with (for decoding and checks)."""
    if info.get("kind") == "byte":
        return ByteTokenizer()
    return load_tokenizer(base / info.get("file", "tokenizer.json"))
