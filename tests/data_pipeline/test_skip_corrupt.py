"""Corrupt shards and samples: ``on_corrupt=error`` names the shard; ``skip`` leaves them out
(no repeated rows, only good data), counts them, warns once per shard, resumes exactly across a
skip, and stops at ``data.max_skipped_fraction``; the count is the trainer's
``data/skipped_samples`` metric."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.config import ReaderConfig, SourceConfig
from data_pipeline.errors import CorruptShardError, DataConfigError, TooManySkippedSamples
from data_pipeline.reader import build_reader
from data_pipeline.shards import Manifest
from tests.data_pipeline.conftest import make_docs, prepare_docs, read_windows
from tests.data_pipeline.test_reader import _all, _cfg, _key, _rows, _same, _take

pytestmark = pytest.mark.usefixtures("one_thread")

BAD_SHARD = 1  # of the small dataset: 7 windows, manifest windows 7..13


def _damage(root: Path, shard: int, how: str) -> str:
    """Damage one shard of the dataset at ``root`` in place; returns the tar's path."""
    tar = root / Manifest.load(root).splits["train"][shard].path
    data = bytearray(tar.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # a byte of the first sample's tokens: that sample fails its CRC, no other
        with tarfile.open(tar) as tf:
            tokens = next(m for m in tf if ".tokens." in m.name)
        data[tokens.offset_data + 3] ^= 0x40
    tar.write_bytes(bytes(data))
    return str(tar)


def _copy(src: Path, dst: Path, damage: dict[int, str]) -> dict[int, str]:
    shutil.copytree(src, dst)
    return {shard: _damage(dst, shard, how) for shard, how in damage.items()}


def _good_rows(root: Path, lost: set[int]) -> Counter:
    """The rows the small dataset's windows make, less the manifest windows ``lost``."""
    return Counter(_key(t) for i, (t, _) in enumerate(read_windows(root)) if i not in lost)


def _skip_cfg(path, **kw) -> ReaderConfig:
    kw.setdefault("on_corrupt", "skip")
    kw.setdefault("max_skipped_fraction", 1.0)
    return _cfg(path, **kw)


def _shard_warnings(caught, tar: str) -> list[str]:
    return [str(w.message) for w in caught if tar in str(w.message)]


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("verify", [True, False])
def test_on_corrupt_error_names_the_shard(small_dataset, tmp_path, how, verify):
    tar = _copy(small_dataset, tmp_path / "bad", {BAD_SHARD: how})[BAD_SHARD]
    for workers in (0, 1):  # a worker's error reaches the main process as the same type
        cfg = _cfg(tmp_path / "bad", epochs=1, verify_sha256=verify, num_workers=workers)
        with pytest.raises(CorruptShardError, match=re.escape(tar)):
            _all(build_reader(cfg))


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("verify", [True, False])
def test_skip_yields_each_good_sample_once_and_counts_the_rest(
    small_dataset, tmp_path, how, verify
):
    bad = tmp_path / "bad"
    tar = _copy(small_dataset, bad, {BAD_SHARD: how})[BAD_SHARD]
    whole = how == "truncate" or verify  # the sha256 check condemns a flipped byte's shard
    lost = set(range(7, 14)) if whole else {7}
    good = _good_rows(small_dataset, lost)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = build_reader(_skip_cfg(bad, epochs=1, batch_size=1, verify_sha256=verify))
        rows = _rows(_all(reader))
    assert Counter(rows) == good  # every good window exactly once, nothing else
    assert reader.skipped == len(lost) == reader.state_dict()["skipped"]
    assert reader.state_dict()["skipped_by_shard"] == {tar: len(lost)}
    (message,) = _shard_warnings(caught, tar)  # once, however many of its samples were skipped
    assert ("unusable" in message) == whole and "data/skipped_samples" in message


def test_a_truncated_shard_repeats_no_row_on_any_rank_or_worker(small_dataset, tmp_path):
    """The operator drill: batches after a truncated shard were one good sample, repeated."""
    tar = _copy(small_dataset, tmp_path / "bad", {BAD_SHARD: "truncate"})[BAD_SHARD]
    good = _good_rows(small_dataset, set(range(7, 14)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the bad shard early in the epoch, then 40 of its 46 good rows (2 ranks x 2 workers)
        cfg = _skip_cfg(tmp_path / "bad", batch_size=4, num_workers=2, shuffle_shards=False)
        readers = [build_reader(cfg, r, 2) for r in (0, 1)]
        rows = [row for reader in readers for row in _rows(_take(reader, 5))]
    assert len(rows) == 40 < sum(good.values())
    assert not Counter(rows) - good  # no row twice, no row from the bad shard
    assert sum(reader.skipped for reader in readers) == 7  # each rank counts its share
    assert len(_shard_warnings(caught, tar)) == 1  # once per process, not per reader or worker


def test_resume_across_skips_is_exact(small_dataset, tmp_path):
    # skips in many blocks, so that some saved states fall inside a block that had skips
    _copy(small_dataset, tmp_path / "bad", {BAD_SHARD: "truncate", 3: "flip", 5: "flip"})

    def cfg(workers: int = 0) -> ReaderConfig:
        return _skip_cfg(tmp_path / "bad", batch_size=4, verify_sha256=False, num_workers=workers)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref_reader = build_reader(cfg())
        ref, counts, partial = [], [], []
        for batch in ref_reader:  # 12 x 4 rows: past the end of the first epoch's good rows
            ref.append(batch)
            counts.append(ref_reader.skipped)
            partial.append(ref_reader.state_dict()["partial_rows"])
            if len(ref) == 12:
                break
        assert counts[-1] >= 9  # the truncated shard and 2 flipped samples (and again?)
        assert any(partial)  # after a skip, some states fall inside a block of samples
        _same(_take(build_reader(cfg()), 12), ref)  # same config, same batches
        for k in range(1, 12):
            first = build_reader(cfg())
            _take(first, k)
            state = json.loads(json.dumps(first.state_dict()))
            assert state["skipped"] == counts[k - 1]
            resumed = build_reader(cfg(workers=2 if partial[k - 1] else 0))
            resumed.load_state_dict(state)
            _same(_take(resumed, 12 - k), ref[k:])
            assert resumed.skipped == counts[-1]  # nothing counted twice or lost


def test_too_many_skips_stop_with_a_clear_error(small_dataset, tmp_path):
    bad = tmp_path / "bad"
    tar = _copy(small_dataset, bad, {BAD_SHARD: "truncate"})[BAD_SHARD]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(TooManySkippedSamples) as err:
            _all(build_reader(_skip_cfg(bad, max_skipped_fraction=0.05, batch_size=1)))
        # 7 of the epoch's 53 windows are more than 5%: stopped at the 3rd (> 0.05 * 53)
        message = str(err.value)
        assert len(read_windows(small_dataset)) == 53
        assert "too many corrupt samples skipped: 3, 5.66% of 53" in message
        assert "max_skipped_fraction=0.05" in message
        assert tar in message and re.search(r"\d+\.\d+%", message)
        # one bad window in ~60 is within a 5% limit for a whole epoch and more
        _copy(small_dataset, tmp_path / "flip", {BAD_SHARD: "flip"})
        fine = _skip_cfg(tmp_path / "flip", max_skipped_fraction=0.05, verify_sha256=False)
        assert build_reader(fine).skipped == 0
        reader = build_reader(ReaderConfig(**{**fine.__dict__, "epochs": 2}))
        _all(reader)
        assert reader.skipped == 2  # the flipped window, in each epoch
        # nothing readable at all: an error even at the loosest limit, not an endless search
        everything = {
            i: "truncate" for i in range(len(Manifest.load(small_dataset).splits["train"]))
        }
        _copy(small_dataset, tmp_path / "none", everything)
        with pytest.raises(TooManySkippedSamples, match="100.00%"):
            _take(build_reader(_skip_cfg(tmp_path / "none")), 1)


def test_max_skipped_fraction_is_validated(small_dataset):
    from pretrain.config import load_config
    from pretrain.config_errors import ConfigError

    for value in (0.0, -0.1, 1.5):
        with pytest.raises(
            DataConfigError, match=r"data\.max_skipped_fraction: must be in \(0, 1\]"
        ):
            _cfg(small_dataset, max_skipped_fraction=value)
        with pytest.raises(ConfigError, match=r"data\.max_skipped_fraction: must be in \(0, 1\]"):
            load_config(None, [f"data.max_skipped_fraction={value}"])
    assert ReaderConfig(sources=[SourceConfig(task="chaining")]).max_skipped_fraction == 0.01


def test_trainer_logs_skipped_samples(tmp_path):
    from parallel.dist import DistInfo
    from pretrain.build import build_trainer
    from pretrain.config import load_config
    from tests.pretrain.trainer_helpers import FAST, TINY

    data = prepare_docs(make_docs(40, seed=3), tmp_path, tmp_path / "data", 64, per_shard=8)
    n_shards = len(Manifest.load(data).splits["train"])
    tars = [_damage(data, shard, "truncate") for shard in range(0, n_shards, 2)]  # half the data
    overrides = [
        *FAST,
        "train.steps=3",
        "model.vocab_size=272",
        f"data.sources=[{{path: {data}}}]",
        "data.on_corrupt=skip",
        "data.max_skipped_fraction=0.9",
        "checkpoint.enabled=false",
        f"run.dir={tmp_path / 'run'}",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = build_trainer(load_config(TINY, overrides), DistInfo(), log=lambda m: None)
        history = trainer.run()
    counts = [row["data/skipped_samples"] for row in history if "loss" in row]
    assert len(counts) == 3 and counts == sorted(counts) and n_shards >= 4
    assert 0 < counts[-1] == trainer.reader.skipped  # the bad half, as the stream met it
    assert all(len(_shard_warnings(caught, tar)) <= 1 for tar in tars)
    assert sum(len(_shard_warnings(caught, tar)) for tar in tars) >= 1
