"""Functions run inside real spawned processes by tests/integration/test_dist_multiproc.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slade_dist import dist


def gather_worker(out_dir: str) -> None:
    env = dist.init_distributed()
    r = dist.rank()
    local = torch.full((r + 1, 2), float(r))  # uneven sizes: rank r contributes r+1 rows
    gathered = dist.all_gather_cat(local)
    summed = dist.all_reduce_sum(torch.tensor([float(r + 1)]))
    objs = dist.all_gather_object({"rank": r})
    token = dist.broadcast_object(f"from-{r}")
    dist.barrier()
    Path(out_dir, f"rank{r}.json").write_text(
        json.dumps(
            {
                "env": [env.rank, env.world_size, env.source],
                "gathered": gathered.tolist(),
                "sum": summed.item(),
                "objs": objs,
                "token": token,
                "is_main": dist.is_main(),
            }
        )
    )
    dist.shutdown()
