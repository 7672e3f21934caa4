"""slade_dist/train/batch_split.py: each rank's share of the config's per-step P, and the errors
that name the fix."""

from __future__ import annotations

import pytest

from slade_dist.train.batch_split import rank_share


def test_the_step_batch_is_shared_by_ranks_and_micro_batches():
    assert rank_share(8, "train.classes_per_batch", world=1) == 8
    assert rank_share(8, "train.classes_per_batch", world=2) == 4
    assert rank_share(16, "train.classes_per_batch", 2, world=4) == 2
    assert rank_share(8, "train.classes_per_batch", world=8, cross_rank=True) == 1


def test_a_share_that_does_not_divide_names_the_fix():
    with pytest.raises(ValueError, match=r"multiple of 6; set train.classes_per_batch=6 or train.classes_per_batch=12"):
        rank_share(8, "train.classes_per_batch", world=6)
    with pytest.raises(ValueError, match=r"set student.unlabeled_classes_per_batch=16"):
        rank_share(8, "student.unlabeled_classes_per_batch", world=16, cross_rank=True)


def test_one_class_per_rank_needs_the_cross_rank_loss():
    with pytest.raises(ValueError, match=r"loss.cross_rank=true .* or train.classes_per_batch=16"):
        rank_share(8, "train.classes_per_batch", world=8)
