"""Tokenizers: byte-level without training, BPE trained locally, tokenizer.json loading."""

from __future__ import annotations

import glob

import pytest

from data_pipeline.errors import DataConfigError
from data_pipeline.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
from data_pipeline.tokens import EOS_ID, NUM_SPECIAL, SPECIAL_TOKENS

LICENSES = sorted(glob.glob("/usr/share/common-licenses/*"))
TEXT = "Grüße, 世界! tabs\tand\nnewlines  \U0001f600"


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == [NUM_SPECIAL + b for b in TEXT.encode()]
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == NUM_SPECIAL + 256 and tok.eos_id == EOS_ID
    assert [a.tolist() for a in tok.encode_batch([TEXT, ""])] == [ids, []]
    assert load_tokenizer("byte").encode("x") == tok.encode("x")


@pytest.mark.skipif(not LICENSES, reason="no /usr/share/common-licenses")
def test_bpe_trains_keeps_special_ids_and_round_trips(tmp_path):
    tok = train_bpe(LICENSES, vocab_size=400)
    assert tok.vocab_size == 400
    for name, idx in SPECIAL_TOKENS.items():
        assert tok.tok.token_to_id(name) == idx
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (2, 0, 1)
    text = open(LICENSES[0], encoding="utf-8").read()
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) / 1.5  # merges were learned
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(TEXT)) == TEXT  # byte-level: any text, no unknown token
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(text) == ids and loaded.describe()["sha256"] == tok.describe()["sha256"]


def test_bad_tokenizer_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataConfigError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataConfigError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(DataConfigError, match="must be >="):
        train_bpe(LICENSES, vocab_size=100)
    with pytest.raises(DataConfigError, match="not found"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300)
