"""The config's batch is the batch of one optimizer step, whatever the job's shape.

Owns `rank_share`: a per-step count (train.classes_per_batch, student.unlabeled_classes_per_batch,
pretrain.batch_size) covers every rank and every micro-batch of train.grad_accum; each rank draws
count / (world x grad_accum) of it per micro-batch (its own random classes: a class drawn on two
ranks has 2K images in the step). So a run on 1 GPU and on 64 trains on batches of the same size,
and the losses (losses.py, basis.py, train/swav.py) see the step's whole batch: one class per rank
is a valid shape. The arithmetic is config.step_share (torch-free: the launcher's dry run checks
every trainer job's shape with it).
Tests: tests/unit/test_batch_split.py, tests/integration/test_world_invariance.py.
"""

from __future__ import annotations

from .. import dist
from ..config import step_share

__all__ = ["rank_share"]


def rank_share(total: int, key: str, grad_accum: int = 1, *, world: int | None = None) -> int:
    """This rank's share per micro-batch of `total` (the config's per-step count named `key`)."""
    return step_share(total, key, dist.world_size() if world is None else world, grad_accum)
