"""Spawned-process entry point of tests/integration/test_curate_multirank.py: the curate stage on
every rank of a real gloo process group."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slade_dist import dist
from tests.integration import _pseudo_workers as W


def curate_worker(root: str, overrides: list[str], out_file: str) -> None:
    """curate.run on the demo under root/demo into root/run; rank 0 saves the result."""
    from slade_dist.pseudo import curate

    dist.init_distributed()
    try:
        torch.set_num_threads(1)
        demo = Path(root) / "demo"
        cfg = W.make_cfg(Path(root) / "run", demo / "unlabeled", [f"data.test_shards={demo / 'test'}", *overrides])
        result = curate.run(cfg, Path(root) / "run")
        if dist.is_main():
            Path(out_file).write_text(json.dumps(result))
    finally:
        dist.shutdown()


def cluster_worker(root: str, overrides: list[str], out_file: str) -> None:
    """embed + cluster (round 1) on the curated demo under root on every rank; rank 0 saves the result."""
    from slade_dist.pseudo import cluster
    from slade_dist.pseudo import embed as embed_files

    dist.init_distributed()
    try:
        torch.set_num_threads(1)
        demo = Path(root) / "demo"
        cfg = W.make_cfg(Path(root) / "run", demo / "unlabeled", [f"data.test_shards={demo / 'test'}", *overrides])
        embed_files.run(cfg, Path(root) / "run")
        result = cluster.run(cfg, Path(root) / "run")
        if dist.is_main():
            Path(out_file).write_text(json.dumps(result))
    finally:
        dist.shutdown()
