"""The config's batch is the batch of one optimizer step, whatever the job's shape: `rank_share`,
this rank's part of a per-step count per micro-batch (the arithmetic and the fix named when it does
not divide: config.step_share, torch-free for the launcher's dry run; why: docs/METHOD.md "Any
world size"). Tests: tests/unit/test_batch_split.py, tests/integration/test_world_invariance.py.
"""

from __future__ import annotations

from .. import dist
from ..config import step_share

__all__ = ["rank_share"]


def rank_share(total: int, key: str, grad_accum: int = 1, *, world: int | None = None) -> int:
    """This rank's share per micro-batch of `total` (the config's per-step count named `key`)."""
    return step_share(total, key, dist.world_size() if world is None else world, grad_accum)
