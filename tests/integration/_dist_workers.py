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
    staged = dist.staged_all_reduce_sum(torch.tensor([float(r), 1.0], dtype=torch.float64))
    bcast = dist.staged_broadcast(torch.full((2,), float(r + 5)))
    send = [1, 3] if r == 0 else [2, 2]  # rank 0 keeps 1 row and sends 3; rank 1 sends 2 and keeps 2
    recv = [s[r] for s in dist.all_gather_object(send)]
    rows = dist.all_to_all_rows(torch.arange(4, dtype=torch.int64).view(4, 1) + 10 * r, send, recv)
    dist.barrier()
    Path(out_dir, f"rank{r}.json").write_text(
        json.dumps(
            {
                "env": [env.rank, env.world_size, env.source],
                "gathered": gathered.tolist(),
                "sum": summed.item(),
                "objs": objs,
                "token": token,
                "staged": staged.tolist(),
                "bcast": bcast.tolist(),
                "rows": rows.view(-1).tolist(),
                "is_main": dist.is_main(),
            }
        )
    )
    dist.shutdown()
