"""P x K batcher (slade_dist/data/batcher.py): P distinct labels x K samples per batch, the buffer
bound, the documented fallback for labels with fewer than K samples, eviction, determinism."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from slade_dist.data.batcher import PKBatcher


def stream(n: int, n_labels: int, seed: int = 0, weights=None):
    rng = random.Random(seed)
    for i in range(n):
        label = rng.choices(range(n_labels), weights=weights)[0]
        yield {"id": i}, label


def check_batch(batch, P, K):
    counts = Counter(label for _, label in batch)
    assert len(batch) == P * K and len(counts) == P and set(counts.values()) == {K}
    # grouped: K consecutive entries per label
    assert all(batch[g][1] == batch[g + j][1] for g in range(0, P * K, K) for j in range(K))


@pytest.mark.parametrize("P,K,labels,max_buffered", [(8, 4, 50, 400), (3, 2, 5, 6), (4, 4, 1000, 64)])
def test_batches_are_p_distinct_labels_by_k_and_buffer_bounded(P, K, labels, max_buffered):
    b = PKBatcher(P, K, max_buffered, seed=1)
    seen_ids = Counter()
    n = 0
    for batch in b(stream(5000, labels)):
        check_batch(batch, P, K)
        assert b.n_buffered <= max_buffered
        n += 1
        if not b.replacement_batches:
            seen_ids.update(s["id"] for s, _ in batch)
    assert n > 0 and b.peak <= max_buffered
    if labels <= 50:  # plenty of samples per label: no fallback, each sample used at most once
        assert b.replacement_batches == 0 and max(seen_ids.values()) == 1


def test_rare_labels_use_replacement_once_buffer_is_full():
    # 200 labels, a buffer of 20: most labels never reach K=4 while buffered -> fallback batches
    b = PKBatcher(2, 4, 20, seed=0)
    batches = list(b(stream(3000, 200)))
    assert b.replacement_batches > 0 and b.peak <= 20
    for batch in batches:
        check_batch(batch, 2, 4)
        for label in {lab for _, lab in batch}:
            ids = [s["id"] for s, lab in batch if lab == label]
            assert len(set(ids)) >= 2  # >= min_distinct distinct samples, duplicates fill up to K


def test_singletons_are_evicted_not_hoarded():
    b = PKBatcher(2, 2, 10, seed=0)
    out = list(b(({"id": i}, i) for i in range(100)))  # every label seen once
    assert out == [] and b.evicted > 0 and b.n_buffered <= 10 and b.peak <= 10


def test_deterministic_given_seed_and_bad_arguments():
    a = [[s["id"] for s, _ in x] for x in PKBatcher(4, 2, 50, seed=3)(stream(500, 20))]
    c = [[s["id"] for s, _ in x] for x in PKBatcher(4, 2, 50, seed=3)(stream(500, 20))]
    assert a == c and len(a) > 10
    with pytest.raises(ValueError, match="max_buffered"):
        PKBatcher(8, 4, 31)
    with pytest.raises(ValueError):
        PKBatcher(0, 4, 100)
