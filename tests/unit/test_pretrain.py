"""Tests of slade_dist/train/pretrain.py (SwAV): Sinkhorn codes, the swapped loss, the stage.

The stage runs on a real one-process DeepSpeed engine over tiny real shards (labeled + unlabeled,
with undecodable images among them), and its export initialises the teacher's embedder.
"""

from __future__ import annotations

import math

import pytest
import torch

from slade_dist.models import load_embedder
from slade_dist.stages import RunLayout
from slade_dist.train import common as C
from slade_dist.train.common import pretrain_init_path
from slade_dist.train.pretrain import SwAVNet, run, sinkhorn, swav_loss

from ..integration import _train_workers as W

pytestmark = pytest.mark.usefixtures("one_thread_no_leftover_group")


def test_sinkhorn_codes_are_doubly_stochastic():
    torch.manual_seed(0)
    B, K = 64, 16
    scores = (
        torch.nn.functional.normalize(torch.randn(B, 8), dim=1)
        @ torch.nn.functional.normalize(torch.randn(K, 8), dim=1).t()
    )
    q = sinkhorn(scores, epsilon=0.05, iters=3)
    assert q.shape == (B, K) and (q >= 0).all()
    assert torch.allclose(q.sum(1), torch.ones(B), atol=1e-5)  # one unit of mass per image
    usage = q.sum(0)  # every prototype used ~B/K times
    assert (usage - B / K).abs().max() < 0.35 * B / K
    plain = torch.softmax(scores / 0.05, dim=1).sum(0)  # without equipartition: very unequal
    assert (usage - B / K).abs().max() < (plain - B / K).abs().max()
    q_conv = sinkhorn(scores, epsilon=0.05, iters=200)
    assert torch.allclose(q_conv.sum(0), torch.full((K,), B / K), rtol=1e-3)


def test_swav_loss_is_low_when_views_agree_and_has_gradients():
    torch.manual_seed(0)
    net = SwAVNet(W_embedder(), proj_dim=8, prototypes=6)
    x = torch.randn(12, 3, 32, 32)
    s1 = net(x)
    same = swav_loss(s1, s1.detach().clone().requires_grad_(), 0.1, 0.05, 3)
    other = swav_loss(s1, net(torch.randn(12, 3, 32, 32)), 0.1, 0.05, 3)
    assert math.isfinite(same.item()) and same.item() < other.item()
    other.backward()
    assert net.prototypes.weight.grad is not None and net.projection[0].weight.grad.abs().sum() > 0


def W_embedder():
    from slade_dist.config import ModelConfig
    from slade_dist.models import build_embedder

    return build_embedder(ModelConfig(backbone="tiny_cnn", embed_dim=16, freeze_bn=False))


def test_pretrain_stage_loss_falls_and_export_initialises_teacher(tmp_path):
    data = W.make_data(tmp_path / "data", n_classes=4, per_class=6, unl_per_class=6, corrupt=3)
    run_dir = tmp_path / "run"
    cfg = W.load_cfg(
        W.overrides(data, run_dir, "pretrain.steps=16", "train.log_every=4", "pretrain.freeze_prototypes_steps=5")
    )
    res = run(cfg, run_dir)
    assert res["steps"] == 16
    losses = [v for _, v in res["loss_history"]]
    assert losses[-1] < losses[0], losses
    tb = W.tb_scalars(RunLayout(run_dir).tb_dir("pretrain"))
    lr_proto = dict(tb["lr/prototypes"])
    assert lr_proto[4] == 0.0 and lr_proto[8] > 0.0  # prototypes frozen for the first steps
    assert sum(v for _, v in tb["data/skipped_samples"]) > 0  # corrupt jpgs skipped, counted

    path = pretrain_init_path(run_dir)
    assert path is not None and path == RunLayout(run_dir).stage_dir("pretrain") / "final.pt"
    exported = load_embedder(path)
    teacher_init = C.init_embedder(cfg.model, path)
    for (k, a), (_, b) in zip(exported.state_dict().items(), teacher_init.state_dict().items()):
        assert torch.equal(a, b), k
    fresh = C.init_embedder(cfg.model, None)
    assert not torch.equal(fresh.backbone.features[0].weight, teacher_init.backbone.features[0].weight)


def test_pretrain_zero_steps_exports_initial_weights(tmp_path):
    data = W.make_data(tmp_path / "data", n_classes=2, per_class=2, unl_per_class=1)
    cfg = W.load_cfg(W.overrides(data, tmp_path / "run", "pretrain.steps=0"))
    res = run(cfg, tmp_path / "run")
    assert res["steps"] == 0 and res["exported_initial"]
    emb = load_embedder(RunLayout(tmp_path / "run").stage_dir("pretrain") / "final.pt")
    assert emb.embed_dim == 32
