"""prepare: round trip (real license texts and generated text/JSONL/Parquet), manifest,
validation split, worker-count independence, bad input accounting, CLI behaviour."""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

import numpy as np
import pytest

from data_pipeline.prepare import PrepareConfig, add_prepare_arguments, prepare_dataset, run_prepare
from data_pipeline.shards import Manifest, file_sha256
from data_pipeline.tokenizer import load_tokenizer
from tests.data_pipeline.conftest import make_docs, read_windows

LICENSES = sorted(glob.glob("/usr/share/common-licenses/*"))


def rebuild_documents(root, split="train") -> list[list[int]]:
    """Windows -> the token stream -> documents (split at the stored starts), each with its EOS."""
    windows = read_windows(root, split)
    stream: list[int] = []
    starts: set[int] = set()
    for k, (tokens, st) in enumerate(windows):
        offset = len(stream) - (1 if k else 0)  # windows overlap by one token
        starts.update(offset + int(s) for s in st)
        stream += tokens.tolist()[1 if k else 0 :]
        if k < len(windows) - 1:
            assert len(tokens) == Manifest.load(root).seq_len + 1  # only the last is short
    cuts = sorted(starts) + [len(stream)]
    return [stream[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def expected(tok, texts: list[str]) -> list[list[int]]:
    return [tok.encode(t) + [tok.eos_id] for t in texts]


def _cfg(inputs, out, **kw) -> PrepareConfig:
    kw.setdefault("progress", False)
    return PrepareConfig(inputs=[str(i) for i in inputs], output=str(out), **kw)


@pytest.mark.skipif(not LICENSES, reason="no /usr/share/common-licenses")
@pytest.mark.parametrize("bpe", [False, True])
def test_round_trip_license_texts(tmp_path, bpe):
    out = tmp_path / "ds"
    summary = prepare_dataset(
        _cfg(
            ["/usr/share/common-licenses/*"],
            out,
            seq_len=256,
            samples_per_shard=40,
            train_bpe=400 if bpe else None,
        )
    )
    tok = load_tokenizer(out / "tokenizer.json") if bpe else load_tokenizer("byte")
    unique = {}
    for p in LICENSES:  # GPL -> GPL-3 etc. are symlinks: prepare reads each file once
        unique.setdefault(os.path.realpath(p), p)
    texts = [open(p, encoding="utf-8", errors="replace").read() for p in unique.values()]
    texts = [t for t in texts if t.strip()]
    assert rebuild_documents(out) == expected(tok, texts)
    man = Manifest.load(out)
    assert man.dtype == "uint16" and summary["train"]["documents"] == len(texts)
    for info in man.splits["train"]:
        assert file_sha256(out / info.path) == info.sha256
    assert sum(i.tokens for i in man.splits["train"]) == summary["train"]["tokens"] - 1


def _write_mixed_inputs(d):
    docs = make_docs(30, seed=3)
    (d / "a.txt").write_text("\n\n".join(docs[:5]) + "\n\n   \n\n" + docs[5] + "\n")  # paragraphs
    (d / "empty.txt").write_bytes(b"")
    (d / "bad.txt").write_bytes(b"caf\xe9 au lait\n\n" + docs[6].encode() + b"\n")
    lines = [json.dumps({"text": t}) for t in docs[7:15]]
    lines.insert(3, "{broken json")
    lines.insert(5, json.dumps({"other": "no text field"}))
    lines.insert(6, json.dumps({"text": ""}))
    (d / "b.jsonl").write_text("\n".join(lines) + "\n\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = docs[15:22] + ["  ", None] + docs[22:30]
    pq.write_table(pa.table({"text": values, "n": list(range(17))}), d / "c.parquet")
    para = docs[:5] + [docs[5], "caf\ufffd au lait", docs[6]]
    return para + docs[7:15] + docs[15:30]


def test_round_trip_text_jsonl_parquet_and_bad_inputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = _write_mixed_inputs(src)
    out = tmp_path / "ds"
    summary = prepare_dataset(
        _cfg(
            [src / "a.txt", src / "empty.txt", src / "bad.txt", src / "b.jsonl", src / "*.parquet"],
            out,
            text_unit="paragraph",
            seq_len=24,
            samples_per_shard=5,
        )
    )
    assert rebuild_documents(out) == expected(load_tokenizer("byte"), texts)
    assert summary["empty_files"] == 1 and summary["empty_documents"] == 3  # "", "  ", null
    assert summary["undecodable_documents"] == 1 and summary["bad_records"] == 2


def test_validation_split_and_worker_independence(tmp_path):
    src = tmp_path / "docs.jsonl"
    docs = make_docs(80, seed=4)
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in docs))
    tok = load_tokenizer("byte")
    a, b = tmp_path / "a", tmp_path / "b"
    prepare_dataset(_cfg([src], a, field="body", seq_len=32, val_docs=9, workers=0, chunk_docs=7))
    prepare_dataset(_cfg([src], b, field="body", seq_len=32, val_docs=9, workers=2, chunk_docs=7))
    train, val = rebuild_documents(a, "train"), rebuild_documents(a, "val")
    assert len(val) == 9 and len(train) == 71
    assert sorted(train + val) == sorted(expected(tok, docs))
    assert train == [d for d in expected(tok, docs) if d not in val]  # order kept
    for split in ("train", "val"):  # same bytes with 0 and 2 worker processes
        ma, mb = Manifest.load(a).splits[split], Manifest.load(b).splits[split]
        assert [s.sha256 for s in ma] == [s.sha256 for s in mb]
    frac = tmp_path / "frac"
    s = prepare_dataset(_cfg([src], frac, field="body", seq_len=32, val_fraction=0.25))
    assert 8 < s["val"]["documents"] < 32 and s["val"]["documents"] + s["train"]["documents"] == 80


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(70_000)})
    hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    texts = ["w1 w69999 w65536", "w70 w65535 w2", "w0"]
    (tmp_path / "in.txt").write_text("\n".join(texts))
    out = tmp_path / "ds"
    prepare_dataset(
        _cfg(
            [tmp_path / "in.txt"],
            out,
            tokenizer=str(tmp_path / "tokenizer.json"),
            text_unit="line",
            seq_len=4,
        )
    )
    assert Manifest.load(out).dtype == "uint32"
    docs = rebuild_documents(out)
    assert docs[0] == [5, 70003, 65540, 2] and len(docs) == 3


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    return parser.parse_args(argv)


def test_cli_summary_refusal_overwrite_and_missing_input(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(make_docs(10)))
    out = tmp_path / "out"
    argv = [str(src), "-o", str(out), "--seq-len", "16", "--workers", "0", "--no-progress"]
    assert run_prepare(_parse(argv + ["--text-unit", "line"])) == 0
    report = capsys.readouterr().out
    assert "10 documents" in report and "tokens/s" in report and "shards" in report
    first = Manifest.load(out).splits["train"][0].sha256
    assert run_prepare(_parse(argv)) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert Manifest.load(out).splits["train"][0].sha256 == first  # untouched
    assert run_prepare(_parse(argv + ["--overwrite"])) == 0  # one document per file now
    assert Manifest.load(out).stats["train"]["documents"] == 1
    assert not list(out.glob(".prepare-tmp-*"))
    assert run_prepare(_parse([str(tmp_path / "nope.txt"), "-o", str(tmp_path / "o2")])) == 2
    assert "input path not found" in capsys.readouterr().err
    assert run_prepare(_parse([str(tmp_path / "*.none"), "-o", str(tmp_path / "o3")])) == 2
    assert "matches no file" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.me").write_text("x")
    assert run_prepare(_parse([str(src), "-o", str(foreign), "--overwrite"])) == 2
    assert (foreign / "keep.me").exists()


def test_shards_read_with_plain_webdataset(small_dataset):
    import webdataset as wds

    man = Manifest.load(small_dataset)
    url = str(small_dataset / man.splits["train"][0].path)
    samples = list(wds.WebDataset(url, shardshuffle=False))
    ours = read_windows(small_dataset)[: len(samples)]
    for s, (tokens, starts) in zip(samples, ours, strict=True):
        assert np.array_equal(np.frombuffer(s["tokens.u16"], "<u2"), tokens)
        assert np.array_equal(np.frombuffer(s["starts.u32"], "<u4"), starts)
    shutil.rmtree(small_dataset / "nonexistent", ignore_errors=True)
