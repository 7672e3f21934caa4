"""slade_dist/train/batch_split.py: each rank's share of the config's per-step count, and the
errors that name the fix."""

from __future__ import annotations

import pytest

from slade_dist.train.batch_split import rank_share


def test_the_step_batch_is_shared_by_ranks_and_micro_batches():
    assert rank_share(8, "train.classes_per_batch", world=1) == 8
    assert rank_share(8, "train.classes_per_batch", world=2) == 4
    assert rank_share(16, "train.classes_per_batch", 2, world=4) == 2
    # one class (or pseudo-class) per rank is a valid shape: the losses see the whole step
    assert rank_share(8, "train.classes_per_batch", world=8) == 1


def test_a_share_that_does_not_divide_names_the_fix():
    with pytest.raises(ValueError, match=r"multiple of 6; set train.classes_per_batch=6 or train.classes_per_batch=12"):
        rank_share(8, "train.classes_per_batch", world=6)
    with pytest.raises(ValueError, match=r"set student.unlabeled_classes_per_batch=16"):
        rank_share(8, "student.unlabeled_classes_per_batch", world=16)
    with pytest.raises(ValueError, match=r"2 rank\(s\) x 2 micro-batch\(es\).*pretrain.batch_size=64"):
        rank_share(66, "pretrain.batch_size", 2, world=2)
