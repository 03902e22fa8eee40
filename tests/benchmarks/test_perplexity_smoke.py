"""Smoke test of ``benchmarks/perplexity.py``: a tiny license-text corpus, two tiny models, a few
steps each through the real trainer; JSON, table, plot, and the prepared corpus reused."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
# shared by both configs: shrinks transformer-29m, keeps hydra-tiny's memories inside 2 blocks
TINY_MODEL = ["model.d_model=64", "model.n_layers=2", "model.d_ff=128", "model.attention.n_heads=4",
              "model.workspace.after_blocks=[1]", "model.pkm.after_blocks=[0]"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")
bench = load_benchmark("perplexity.py")


def test_two_tiny_models_at_equal_tokens_then_the_corpus_is_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, data = tmp_path / "perplexity.json", tmp_path / "data"
    corpus = ["--sources", "licenses", "--corpus-mb", "0.06", "--vocab", "300", "--seq-len", "64",
              "--workers", "0", "--data-dir", str(data)]  # fmt: skip
    configs = [str(ROOT / "configs" / f) for f in ("hydra-tiny.yaml", "transformer-29m.yaml")]
    argv = [*corpus, "--configs", *configs, "--set", *TINY_MODEL, "--tokens", str(4 * 2 * 64),
            "--batch-size", "2", "--eval-every", "2", "--eval-batches", "2", "--device", "cpu",
            "--threads", "1", "--work-dir", str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    report = bench.main(argv)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert out.with_suffix(".png").stat().st_size > 0
    assert {"settings", "corpus", "models", "torch", "wall_s"} <= report.keys()
    c = report["corpus"]
    assert c["files"] >= 2 and c["groups"]["licenses"]["files"] == c["files"]
    assert 0 < c["bytes"] <= 0.06e6 and not c["reused"]
    assert c["vocab_size"] <= 300 and c["train"]["tokens"] > 0 and c["val"]["tokens"] > 0
    assert c["val"]["documents"] == 1  # 2% of a few files, at least one
    assert report["settings"]["steps"] == 4 and report["settings"]["eval_batches"] >= 1

    models = report["models"]
    assert set(models) == {"hydra-tiny", "transformer-29m"}
    for m in models.values():
        assert "error" not in m
        assert m["tokens"] == 4 * 2 * 64 and m["steps"] == 4
        assert [p["step"] for p in m["curve"]] == [2, 4]
        assert [p["tokens"] for p in m["curve"]] == [2 * 128, 4 * 128]
        assert math.isfinite(m["final_eval_loss"])
        assert m["final_perplexity"] == pytest.approx(math.exp(m["final_eval_loss"]))
        assert m["final_eval_loss"] < math.log(300) + 1.0  # near or below uniform, not diverged
        assert m["params"] > 0 and m["train_s"] > 0 and m["tokens_per_s"] > 0
        assert m["attention_flops_per_token"] > 0
        # each part's real backward: 2x its forward, more where attention or the scan recompute
        fwd = m["forward_flops_per_token"]
        assert 3 * fwd < m["train_flops_per_token"] <= 3.5 * fwd
        assert set(m["cache_bytes"]) == {"64", "8192"}
    assert models["hydra-tiny"]["family"] == "hydra"
    assert models["transformer-29m"]["family"] == "transformer"
    # the same held-out windows for both models
    assert models["hydra-tiny"]["eval_tokens"] == models["transformer-29m"]["eval_tokens"] > 0
    assert "| hydra-tiny |" in capsys.readouterr().out

    manifest = data / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = bench.main([*corpus, "--prepare-only"])
    assert again["corpus"]["reused"] and manifest.stat().st_mtime_ns == stamp
    assert {k: v for k, v in again["corpus"].items() if k != "reused"} == {
        k: v for k, v in c.items() if k != "reused"
    }


def test_corpus_skips_non_text_and_duplicates_and_stops_at_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {
        "a.txt": b"plain text\n" * 10,  # 110 bytes
        "b.txt": b"plain text\n" * 10,  # a byte-for-byte copy of a.txt
        "c.gz": gzip.compress(b"compressed"),
        "d.bin": b"has a \0 byte",
        "e.txt": "caf\xe9".encode("latin-1"),  # not UTF-8
        "f.txt": b"  \n",
        "g.txt": b"more text\n" * 5,  # 50 bytes: 160 in all
        "h.txt": b"does not fit\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.setitem(bench.SOURCES, "tmp", ("test files", lambda: sorted(tmp_path.iterdir())))
    corpus = bench.select_corpus(["tmp"], max_bytes=165)
    assert [p.name for p in corpus.files] == ["a.txt", "g.txt"]
    assert corpus.bytes == 160 and corpus.groups["tmp"] == {"files": 2, "bytes": 160}
    assert corpus.skipped == {
        "duplicate": 1,
        "compressed": 1,
        "binary": 1,
        "not_utf8": 1,
        "empty": 1,
    }
    (tmp_path / "g.txt").write_bytes(b"other text\n" * 5)
    assert bench.select_corpus(["tmp"], max_bytes=165).digest != corpus.digest


def test_flags_that_would_make_the_runs_unequal_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="train.lr"):
        bench.main(["--set", "model.d_model=64", "train.lr=1", "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="must differ"):
        bench.main(["--configs", "a/x.yaml", "b/x.yaml", "--data-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before the corpus is read
