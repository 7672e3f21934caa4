"""Readers across 2 real gloo processes x 2 DataLoader workers (slade_dist/data/readers.py):
labeled streams give every rank exactly N batches; finite passes cover every sample exactly once
(3 shards for 4 readers, and 5 shards); a planted pseudo-label key mismatch is refused."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slade_dist import dist
from slade_dist.data import writers
from slade_dist.data.pseudo_index import build_index
from slade_dist.data.pseudo_labels import PseudoLabelMismatch, pseudo_label_path, write_pseudo_labels
from slade_dist.data.readers import iter_shard
from slade_dist.data.shards import shard_paths

from ._reader_workers import reader_worker


def build(root: Path) -> tuple[Path, Path, Path, Path]:
    for c in range(6):
        for j in range(4):
            p = root / "src" / f"c{c}" / f"{j}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(c * 10 + j).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                buf, format="JPEG"
            )
            p.write_bytes(buf.getvalue())
    writers.convert("imagefolder", root / "src", root / "three", shard_size=8, progress=False)
    writers.convert("imagefolder", root / "src", root / "five", shard_size=5, progress=False)
    good, bad = root / "pl_good", root / "pl_bad"
    for i, p in enumerate(shard_paths(root / "three")):
        keys, cls = zip(*[(k, c) for k, _, c, _ in iter_shard(p)])
        write_pseudo_labels(pseudo_label_path(good, p), keys, cls, [0.0] * len(keys))
        if i == 1:  # planted: two keys swapped in the second shard's label file
            keys = (keys[1], keys[0], *keys[2:])
        write_pseudo_labels(pseudo_label_path(bad, p), keys, cls, [0.0] * len(keys))
    build_index(root / "three", good)  # what the cluster stage writes beside its label files
    return root / "three", root / "five", good, bad


def test_readers_two_ranks_two_workers(tmp_path):
    three, five, good, bad = build(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    n = 7
    dist.run_local_processes(reader_worker, 2, args=(str(three), str(five), str(good), str(bad), str(out), n))
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["steps"] == n and len(r["labels"]) == n and r["pseudo_steps"] == n
        assert all(sorted(Counter(b).values()) == [2, 2, 2] for b in r["labels"])
        assert r["mismatch"] and "run the cluster stage" in r["mismatch"]  # no index for the bad labels
    # the planted swap is refused where the index is built, naming both files
    with pytest.raises(PseudoLabelMismatch, match=r"three/train-000001\.tar.*pl-000001\.npz"):
        build_index(three, bad)
    assert res[0]["labels"] != res[1]["labels"] or res[0]["first_images_sum"] != res[1]["first_images_sum"]
    for name, d in (("finite3", three), ("finite5", five)):
        got = res[0][name] + res[1][name]
        expected = [[p.name, k] for p in shard_paths(d) for k, *_ in iter_shard(p)]
        assert sorted(map(tuple, got)) == sorted(map(tuple, expected)) and len(got) == 24  # each exactly once
        assert not {s for s, _ in res[0][name]} & {s for s, _ in res[1][name]}  # disjoint shard ownership
        assert res[0][name + "_skipped"] == res[1][name + "_skipped"] == 0
