"""P x K batcher: a stream of (sample, label) -> batches of P distinct labels x K samples each.

Owns: the bounded buffer that waits for K samples of a label, the choice of the P labels of a
batch, and the documented behaviour when the buffer is full. The same code serves class labels
(teacher/student labeled batches) and pseudo labels (student unlabeled batches); it holds raw
(encoded) samples, so decoding happens only for samples that make it into a batch.
Tests: tests/unit/test_batcher.py.

Behaviour, in order, after each incoming sample:
1. A label is *ready* once it holds >= K buffered samples. While >= P labels are ready, a batch is
   emitted from P ready labels chosen at random, K random samples each (the rest stay buffered).
2. If the buffer then holds more than `max_buffered` samples, or more than `max_bytes` bytes by
   `size_of` (data.buffer_mb: big images fill it sooner; it is full and fewer than P labels are
   ready), labels with fewer than K samples are used too: a batch is emitted from the P labels
   holding the most samples among those with >= `min_distinct` (default 2) distinct samples;
   each such label gives all its samples and is filled up to K by sampling its own samples with
   replacement (duplicates get independent augmentations downstream). Rare labels therefore
   still train once the buffer is full instead of blocking it.
3. If even that is impossible (fewer than P labels hold 2 samples, e.g. many singleton pseudo
   labels), the labels holding the fewest samples are evicted whole (dropped, counted in
   `evicted`) until the buffer is at most 90 % full, by count and by bytes (amortises the scan).
So the buffer never holds more than `max_buffered` samples nor `max_bytes` bytes once `add`
returns (a single sample larger than max_bytes is let through alone), and every batch holds
exactly P distinct labels x K entries.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

Batch = list[tuple[Any, Hashable]]  # P*K (sample, label), grouped by label (K consecutive entries)


class PKBatcher:
    def __init__(
        self,
        P: int,
        K: int,
        max_buffered: int,
        seed: int = 0,
        min_distinct: int = 2,
        max_bytes: int | None = None,
        size_of: Callable[[Any], int] | None = None,
    ) -> None:
        if P < 1 or K < 1:
            raise ValueError(f"P and K must be >= 1, got P={P} K={K}")
        if max_buffered < P * K:
            raise ValueError(
                f"max_buffered={max_buffered} must be >= P*K={P * K}: a full batch must fit (raise data.max_buffered)"
            )
        self.P, self.K, self.max_buffered = P, K, max_buffered
        self.min_distinct = max(1, min(min_distinct, K))
        self.rng = random.Random(seed)
        self.buffers: dict[Hashable, list[Any]] = {}
        self.ready: set[Hashable] = set()
        self.n_buffered = 0
        self.max_bytes, self.size_of = max_bytes, size_of or (lambda _: 0)
        self.label_bytes: dict[Hashable, int] = {}
        self.n_bytes = 0
        self.peak_bytes = 0  # most bytes ever held after an add
        self.peak = 0  # most samples ever held after an add (tests assert it stays <= max_buffered)
        self.batches = 0
        self.replacement_batches = 0
        self.evicted = 0

    def __call__(self, stream: Iterable[tuple[Any, Hashable]]) -> Iterator[Batch]:
        for sample, label in stream:
            yield from self.add(sample, label)

    def add(self, sample: Any, label: Hashable) -> list[Batch]:
        """Buffer one sample; return the batches (usually 0 or 1) it completes."""
        buf = self.buffers.setdefault(label, [])
        buf.append(sample)
        self.n_buffered += 1
        size = self.size_of(sample)
        self.label_bytes[label] = self.label_bytes.get(label, 0) + size
        self.n_bytes += size
        if len(buf) >= self.K:
            self.ready.add(label)
        out: list[Batch] = []
        while len(self.ready) >= self.P:
            out.append(self._take_ready())
        while self._over(1.0):
            batch = self._take_with_replacement()
            if batch is None:
                self._evict()
            else:
                out.append(batch)
        self.peak = max(self.peak, self.n_buffered)
        self.peak_bytes = max(self.peak_bytes, self.n_bytes)
        return out

    def _over(self, fill: float) -> bool:
        """More than `fill` of the count or the byte budget held (one sample alone is never over)."""
        if self.n_buffered <= 1:
            return False
        if self.n_buffered > self.max_buffered * fill:
            return True
        return self.max_bytes is not None and self.n_bytes > self.max_bytes * fill

    def _take_ready(self) -> Batch:
        labels = self.rng.sample(sorted(self.ready, key=repr), self.P)
        batch: Batch = []
        for label in labels:
            buf = self.buffers[label]
            picked = set(self.rng.sample(range(len(buf)), self.K))
            batch.extend((buf[i], label) for i in sorted(picked))
            rest = [s for i, s in enumerate(buf) if i not in picked]
            self._set(label, rest)
        self.batches += 1
        return batch

    def _take_with_replacement(self) -> Batch | None:
        eligible = [lab for lab, b in self.buffers.items() if len(b) >= self.min_distinct]
        if len(eligible) < self.P:
            return None
        eligible.sort(key=lambda lab: (-len(self.buffers[lab]), repr(lab)))
        batch: Batch = []
        for label in eligible[: self.P]:
            buf = self.buffers[label]
            chosen = self.rng.sample(buf, min(self.K, len(buf)))
            chosen += [self.rng.choice(buf) for _ in range(self.K - len(chosen))]
            batch.extend((s, label) for s in chosen)
            kept = [s for s in buf if not any(s is c for c in chosen)] if len(buf) > self.K else []
            self._set(label, kept)
        self.batches += 1
        self.replacement_batches += 1
        return batch

    def _evict(self) -> None:
        for label in sorted(self.buffers, key=lambda lab: (len(self.buffers[lab]), repr(lab))):
            if not self._over(0.9):
                break
            self.evicted += len(self.buffers[label])
            self._set(label, [])

    def _set(self, label: Hashable, samples: list[Any]) -> None:
        old = self.buffers.get(label, [])
        self.n_buffered += len(samples) - len(old)
        size = sum(map(self.size_of, samples))
        self.n_bytes += size - self.label_bytes.get(label, 0)
        if samples:
            self.buffers[label] = samples
            self.label_bytes[label] = size
        else:
            self.buffers.pop(label, None)
            self.label_bytes.pop(label, None)
        if len(samples) >= self.K:
            self.ready.add(label)
        else:
            self.ready.discard(label)
