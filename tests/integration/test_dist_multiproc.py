"""slade_dist.dist with 2 real processes over gloo (collectives, the staged ones and the row exchange included)."""

from __future__ import annotations

import json

from slade_dist import dist

from ._dist_workers import gather_worker


def test_two_process_gather_reduce_broadcast(tmp_path):
    dist.run_local_processes(gather_worker, 2, args=(str(tmp_path),))
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, out in enumerate(res):
        assert out["env"] == [r, 2, "torchrun"]
        assert out["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # rank 0: 1 row, rank 1: 2 rows
        assert out["sum"] == 3.0
        assert out["objs"] == [{"rank": 0}, {"rank": 1}]
        assert out["token"] == "from-0"
        assert out["staged"] == [1.0, 2.0] and out["bcast"] == [5.0, 5.0]
        assert out["rows"] == ([0, 10, 11] if r == 0 else [1, 2, 3, 12, 13])  # by source rank
        assert out["is_main"] == (r == 0)
