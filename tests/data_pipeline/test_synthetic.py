"""Synthetic tasks: answers correct by construction (independent solver), packing invariants,
determinism, rank disjointness and exact resume (also on another world size)."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.errors import DataConfigError
from data_pipeline.synthetic import (
    SPECIAL_TOKENS,
    TASKS,
    build_synthetic_stream,
    build_task,
    check_sample,
    split_documents,
)
from data_pipeline.tokens import EOS_ID, IGNORE_INDEX, NUM_SPECIAL, PAD_ID

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 192
TASK_KWARGS = {
    "chaining": {"hops": [1, 2, 4], "n_symbols": 64},
    "distant_premise": {"n_facts": 3, "distance": None},
    "associative_recall": {"n_pairs": 6, "n_queries": 3},
    "domain_mixture": {"n_domains": 3, "pairs_per_doc": 8, "domain_weights": [1.0, 2.0, 1.0]},
    "fact_lookup": {"n_facts": 40, "queries_per_doc": 5, "zipf": 1.0},
}


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_special_tokens_defined_once():
    assert SPECIAL_TOKENS["<pad>"] == PAD_ID == 0
    assert SPECIAL_TOKENS["<bos>"] == 1 and SPECIAL_TOKENS["<eos>"] == EOS_ID == 2
    assert sorted(SPECIAL_TOKENS.values()) == list(range(NUM_SPECIAL))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_checker_solves_every_problem(name):
    stream = build_synthetic_stream(name, vocab_size=128, seq_len=SEQ, seed=3, **TASK_KWARGS[name])
    correct = total = 0
    for sample in _take(stream, 12):
        assert sample["input_ids"].shape == (SEQ,) and sample["input_ids"].dtype == torch.int64
        assert sample["labels"].dtype == torch.int64 and sample["seq_idx"].dtype == torch.int64
        assert sample["answer_mask"].dtype == torch.bool
        assert bool((sample["seq_idx"].diff() >= 0).all())
        assert int(sample["input_ids"].max()) < 128
        c, t = check_sample(stream.task, sample)
        correct, total = correct + c, total + t
    assert total > 0 and correct == total


@pytest.mark.parametrize("name", sorted(TASKS))
def test_checker_detects_a_wrong_answer(name):
    """The checker can fail: change one answer token and it must notice."""
    stream = build_synthetic_stream(name, vocab_size=128, seq_len=SEQ, seed=5, **TASK_KWARGS[name])
    sample = _take(stream, 1)[0]
    t = int(sample["answer_mask"].nonzero()[0, 0])
    wrong = int(sample["labels"][t]) + 1
    wrong = wrong if wrong < 128 else NUM_SPECIAL
    sample["input_ids"][t + 1] = wrong
    sample["labels"][t] = wrong
    c, total = check_sample(stream.task, sample)
    assert c == total - 1


def test_chaining_problem_structure():
    task = build_task("chaining", vocab_size=100, hops=[3], n_distractors=2, n_symbols=40)
    stream = build_synthetic_stream(
        "chaining", vocab_size=100, seq_len=SEQ, seed=1, meta=True, hops=[3], n_symbols=40
    )
    sample = _take(stream, 1)[0]
    docs = split_documents(sample)
    assert len(docs) == SEQ // task.max_len(SEQ)  # fixed length problems fill the row greedily
    toks, answers = docs[0]
    assert len(toks) == 4 * 3 * 3 + 4 and answers == [len(toks) - 2]
    assert (sample["answer_group"][sample["answer_mask"]] == 3).all()
    # the answer is exactly 3 hops away: remove one premise of the chain and it is not reachable
    edges = {toks[i]: toks[i + 2] for i in range(0, len(toks) - 4, 4)}
    node = toks[-4]
    for _ in range(3):
        node = edges[node]
    assert node == toks[-2] and node not in edges


def test_packing_never_splits_and_pads_with_ignore():
    stream = build_synthetic_stream("chaining", vocab_size=128, seq_len=100, seed=0, hops=[2, 5])
    for sample in _take(stream, 20):
        ids, labels, seq = sample["input_ids"], sample["labels"], sample["seq_idx"]
        pad = ids == PAD_ID
        n_real = int((~pad).sum())
        assert not pad[:n_real].any() and pad[n_real:].all()  # padding only at the tail
        assert (labels[pad] == IGNORE_INDEX).all()
        assert ids[n_real - 1] == EOS_ID  # the last problem is complete
        if n_real < 100:
            assert (seq[n_real:] == seq[n_real - 1] + 1).all()  # padding is its own document


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(DataConfigError, match="vocab_size=64 is too small"):
        build_synthetic_stream("chaining", vocab_size=64, seq_len=128, n_symbols=64)
    with pytest.raises(DataConfigError, match="n_symbols=8 is too small"):
        build_synthetic_stream("chaining", vocab_size=64, seq_len=128, n_symbols=8, hops=[3])
    with pytest.raises(DataConfigError, match="does not fit|more than seq_len"):
        build_synthetic_stream("chaining", vocab_size=128, seq_len=16, hops=[4])
    with pytest.raises(DataConfigError, match="unknown settings"):
        build_synthetic_stream("chaining", vocab_size=128, seq_len=128, hop=[4])
    with pytest.raises(DataConfigError, match="unknown synthetic task"):
        build_synthetic_stream("chainning", vocab_size=128, seq_len=128)


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_determinism_and_rank_disjointness():
    kw = {"vocab_size": 128, "seq_len": 64, "hops": [2]}
    a = _take(build_synthetic_stream("chaining", seed=7, **kw), 4)
    b = _take(build_synthetic_stream("chaining", seed=7, **kw), 4)
    c = _take(build_synthetic_stream("chaining", seed=8, **kw), 4)
    assert all(_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(_equal(x, y) for x, y in zip(a, c, strict=True))
    # 2 ranks interleave the single-rank stream: disjoint, and together the same rows
    r0 = _take(build_synthetic_stream("chaining", seed=7, rank=0, world_size=2, **kw), 2)
    r1 = _take(build_synthetic_stream("chaining", seed=7, rank=1, world_size=2, **kw), 2)
    assert all(_equal(x, y) for x, y in zip([r0[0], r1[0], r0[1], r1[1]], a, strict=True))


def test_resume_exact_and_on_another_world_size():
    kw = {"vocab_size": 128, "seq_len": 64, "seed": 2}
    full = _take(build_synthetic_stream("associative_recall", **kw), 10)
    stream = build_synthetic_stream("associative_recall", **kw)
    _take(stream, 4)
    state = stream.state_dict()
    resumed = build_synthetic_stream("associative_recall", **kw)
    resumed.load_state_dict(state)
    assert all(_equal(x, y) for x, y in zip(_take(resumed, 3), full[4:7], strict=True))
    # two ranks consume 2 rows each (global rows 0..3); resuming on one rank continues at row 4
    ranks = [
        build_synthetic_stream("associative_recall", rank=r, world_size=2, **kw) for r in (0, 1)
    ]
    for s in ranks:
        _take(s, 2)
    single = build_synthetic_stream("associative_recall", **kw)
    single.load_state_dict(ranks[1].state_dict())
    assert all(_equal(x, y) for x, y in zip(_take(single, 2), full[4:6], strict=True))
    with pytest.raises(DataConfigError):
        build_synthetic_stream("chaining", **kw).load_state_dict(state)


def test_dataloader_workers_keep_the_order():
    kw = {"vocab_size": 128, "seq_len": 64, "seed": 4}
    full = _take(build_synthetic_stream("fact_lookup", **kw), 4)
    loader = torch.utils.data.DataLoader(
        build_synthetic_stream("fact_lookup", **kw), batch_size=None, num_workers=2
    )
    got = []
    for sample in loader:
        got.append(sample)
        if len(got) == 4:
            break
    assert all(_equal(x, y) for x, y in zip(got, full, strict=True))


def test_distant_premise_distance():
    stream = build_synthetic_stream(
        "distant_premise", vocab_size=64, seq_len=1024, n_symbols=32, n_facts=2, distance=None
    )
    sample = _take(stream, 1)[0]
    docs = split_documents(sample)
    assert len(docs) == 1 and len(docs[0][0]) == 1024  # one problem fills the row
    c, t = check_sample(stream.task, sample)
    assert c == t == 1


def test_chaining_repeated_hops_weight_the_draw():
    """A proof length listed twice is drawn twice as often (a mixture with more short chains)."""
    import random

    task = build_task("chaining", vocab_size=128, hops=[1, 2, 2], n_distractors=1, n_symbols=16)
    rng = random.Random(0)
    groups = [task.sample(rng, 128).group for _ in range(3000)]
    assert set(groups) == {1, 2}
    assert 0.62 < groups.count(2) / len(groups) < 0.72  # 2/3 expected
    assert task.max_len(128) == 4 * 2 * 2 + 4  # the longest proof sets the length
