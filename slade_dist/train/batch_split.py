"""The config's P x K batch is the batch of one optimizer step, whatever the job's shape.

Owns `rank_share`: P (train.classes_per_batch, student.unlabeled_classes_per_batch) counts the
classes of an optimizer step over every rank and every micro-batch of train.grad_accum; each rank
draws P / (world x grad_accum) classes of K images per micro-batch (its own random classes: a class
drawn on two ranks has 2K images in the step). So a run on 1 GPU and on 64 trains on batches of
the same size, and `loss.cross_rank` then makes the ranking loss see the step's whole batch.
Tests: tests/unit/test_batch_split.py, tests/integration/test_global_batch.py.
"""

from __future__ import annotations

from .. import dist

__all__ = ["rank_share"]


def rank_share(total: int, key: str, grad_accum: int = 1, *, world: int | None = None, cross_rank: bool = False) -> int:
    """This rank's classes per micro-batch of `total` (the config's P, named `key` in errors).

    Without cross_rank the ranking loss only sees a rank's own micro-batch, which then needs two
    classes for a negative pair."""
    world = dist.world_size() if world is None else world
    parts = world * grad_accum
    where = f"{world} rank(s) x {grad_accum} micro-batch(es) (train.grad_accum)"
    if total % parts:
        lower, upper = total // parts * parts, (total // parts + 1) * parts
        fix = " or ".join(f"{key}={v}" for v in (lower, upper) if v > 0)
        raise ValueError(
            f"{key} = {total} classes per optimizer step are shared by {where}: it must be a multiple "
            f"of {parts}; set {fix} (or change the job's GPUs / train.grad_accum)"
        )
    share = total // parts
    if share < 2 and not cross_rank:
        raise ValueError(
            f"{key} = {total} over {where} leaves {share} class per micro-batch: the ranking loss of one "
            f"rank's micro-batch has no negative pair; set loss.cross_rank=true (the loss then sees the "
            f"whole step's batch) or {key}={2 * parts}"
        )
    return share
