"""Run inside real spawned processes by tests/integration/test_readers_multirank.py (2 ranks, gloo,
2 DataLoader workers per rank). Results go to <out_dir>/rank<r>.json for the test to check."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from slade_dist import dist
from slade_dist.config import DataConfig
from slade_dist.data.pseudo_labels import PseudoLabelMismatch
from slade_dist.data.readers import finite_batches, labeled_batches, pseudo_labeled_batches


def reader_worker(shard_dir: str, five_dir: str, good_pl: str, bad_pl: str, out_dir: str, n_steps: int) -> None:
    dist.init_distributed()
    r = dist.rank()
    cfg = dataclasses.replace(
        DataConfig(), image_size=16, resize_size=16, num_workers=2, shuffle_buffer=8, max_buffered=64
    )
    res: dict = {"rank": r}
    # infinite labeled stream: every rank takes exactly n_steps batches, with a collective per step
    steps = torch.zeros(1)
    labels = []
    stream = labeled_batches(shard_dir, cfg, 3, 2, seed=0)
    for _ in range(n_steps):
        b = next(stream)
        labels.append(b["labels"].tolist())
        steps += 1
        dist.all_reduce_sum(torch.ones(1))  # a rank that ran dry would hang or fail here
    res["steps"] = int(steps.item())
    res["labels"] = labels
    res["first_images_sum"] = float(next(stream)["images"].sum())
    # finite passes: 3 shards for 2 ranks x 2 workers, and 5 shards
    for name, d in (("finite3", shard_dir), ("finite5", five_dir)):
        fs = finite_batches(d, cfg, 5)
        res[name] = [[s, k] for b in fs for s, k in zip(b["shards"], b["keys"])]
        res[name + "_skipped"] = fs.skipped
    # pseudo-labeled stream: correct labels stream; a planted key mismatch is refused
    ps = pseudo_labeled_batches(shard_dir, good_pl, cfg, 2, 2, seed=0)
    res["pseudo_steps"] = sum(1 for _ in zip(range(n_steps), ps))
    try:
        bad = pseudo_labeled_batches(shard_dir, bad_pl, cfg, 2, 2, seed=r)
        for _ in range(200):
            next(bad)
        res["mismatch"] = None
    except (PseudoLabelMismatch, FileNotFoundError) as e:  # labels without an index: refused
        res["mismatch"] = str(e)
    dist.barrier()
    Path(out_dir, f"rank{r}.json").write_text(json.dumps(res))
    dist.shutdown()
