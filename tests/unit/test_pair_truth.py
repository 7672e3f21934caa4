"""Truth for pseudo labels: the label parsing, the pair helpers the student logs with, and the
`true_labels` the pseudo-labeled stream carries (real demo shards, a real cluster index)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slade_dist.data.pair_truth import UNKNOWN, pair_agreement, pair_precision, same_label_pairs, true_label_id
from slade_dist.data.pseudo_index import build_index
from slade_dist.data.pseudo_labels import pseudo_label_path, write_meta, write_pseudo_labels
from slade_dist.data.readers import pseudo_labeled_batches
from slade_dist.data.shards import shard_paths
from slade_dist.data.tars import TarSamples
from tests.integration import _pseudo_workers as W


def test_true_label_id():
    assert true_label_id({"label": 7}) == 7
    text = true_label_id({"label": "Cardinal"})
    assert text == true_label_id({"label": "Cardinal"}) != true_label_id({"label": "Jay"}) and text >= 0
    for meta in ({}, {"label": None}, {"label": True}, {"label": -3}, None, "not json"):
        assert true_label_id(meta) == UNKNOWN


def test_pairs_and_their_precision():
    pairs = same_label_pairs(torch.tensor([4, 4, 9, 9, 9]))
    assert pairs.shape == (2, 2 + 6) and set(map(tuple, pairs.t().tolist())) == {
        (0, 1), (1, 0), (2, 3), (2, 4), (3, 2), (3, 4), (4, 2), (4, 3)
    }  # fmt: skip
    truth = torch.tensor([1, 1, 5, 6, UNKNOWN])
    # (0,1) right, (2,3) wrong, (2,4)/(3,4) unknown: 2 of 4 known ordered pairs right
    assert pair_agreement(pairs, truth) == (2, 4) and pair_precision(pairs, truth) == 0.5
    negatives = torch.tensor([[0, 2, 0], [2, 3, 1]])  # truths differ for (0,2) and (2,3), not (0,1)
    assert pair_precision(negatives, truth, same=False) == pytest.approx(2 / 3)
    assert pair_precision(torch.zeros(2, 0, dtype=torch.long), truth) is None
    assert pair_precision(torch.tensor([[4], [2]]), truth) is None  # no pair with both truths known


def test_the_pseudo_stream_carries_each_members_hidden_class(tmp_path):
    unl = W.make_demo(tmp_path)
    truth = {}
    pl_dir = tmp_path / "pl"
    rng = np.random.default_rng(0)
    for shard in shard_paths(unl):
        samples = list(TarSamples(shard))
        keys = [s["__key__"] for s in samples]
        truth.update({s["__key__"]: json.loads(s["json"])["label"] for s in samples})
        noisy = np.array([truth[k] if rng.random() < 0.7 else rng.integers(8) for k in keys])
        write_pseudo_labels(pseudo_label_path(pl_dir, shard), keys, noisy, rng.random(len(keys)))
    write_meta(pl_dir, round=1, teacher_step=0, k=8)
    build_index(unl, pl_dir)
    cfg = W.make_cfg(tmp_path / "run", unl)
    stream = pseudo_labeled_batches(unl, pl_dir, cfg.data, 4, 3, seed=0, rank=0, world=1)
    agree = known = 0
    for _ in range(6):
        b = next(stream)
        assert b["true_labels"].dtype == torch.long and b["true_labels"].tolist() == [truth[k] for k in b["keys"]]
        a, n = pair_agreement(same_label_pairs(b["labels"]), b["true_labels"])
        agree, known = agree + a, known + n
    assert known == 6 * 4 * 3 * 2 and 0.2 < agree / known < 1.0  # 70 % clean labels: most pairs right
