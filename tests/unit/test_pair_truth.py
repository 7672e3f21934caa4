"""Truth for pseudo labels: the label parsing and the `true_labels` the pseudo-labeled stream
carries (real demo shards, a real cluster index); the student's precision of its pairs against
them: tests/unit/test_student.py."""

from __future__ import annotations

import json

import numpy as np
import torch

from slade_dist.data.pair_truth import UNKNOWN, true_label_id
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
        same = b["labels"][:, None] == b["labels"][None, :]
        pairs = same.fill_diagonal_(False).nonzero()  # the batch's pseudo-positive pairs
        hidden = b["true_labels"]
        agree, known = agree + int((hidden[pairs[:, 0]] == hidden[pairs[:, 1]]).sum()), known + len(pairs)
    assert known == 6 * 4 * 3 * 2 and 0.2 < agree / known < 1.0  # 70 % clean labels: most pairs right
