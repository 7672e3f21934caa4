"""Tests of slade_dist/train/pretrain.py (SwAV): Sinkhorn codes, the swapped loss, the stage.

The stage runs on a real one-process DeepSpeed engine over tiny real shards (labeled + unlabeled,
with undecodable images among them), and its export initialises the teacher's embedder.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from slade_dist.models import load_embedder
from slade_dist.stages import RunLayout
from slade_dist.train import common as C
from slade_dist.train.common import pretrain_init_path
from slade_dist.train.pretrain import (
    SwAVNet,
    _better_of,
    build_swav_net,
    run,
    sinkhorn,
    swav_groups,
    swav_loss,
    two_view_transform,
)

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
    usage = q.sum(0)  # moving towards B/K uses of every prototype (exact only at convergence, below)
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
    knn = res["knn_map_at_r"]  # the hand-on choice, measured on the labeled train classes
    assert knn["handed_on"] in ("input", "output") and 0 < knn["input"] <= 1 and 0 < knn["output"] <= 1
    assert knn["handed_on"] == ("input" if knn["input"] > knn["output"] else "output")
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


def _swav_reference(scores: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """Official SwAV's distributed_sinkhorn on one process, written independently: exp(s / eps), no shift."""
    Q = torch.exp(scores.double() / epsilon).t()
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def _peaked(B: int = 64, K: int = 300, seed: int = 0) -> torch.Tensor:
    """One peak per image, of a height that varies across images, over flat scores."""
    g = torch.Generator().manual_seed(seed)
    s = torch.full((B, K), -0.5)
    s[torch.arange(B), torch.randint(0, K, (B,), generator=g)] = torch.rand(B, generator=g) * 1.5 - 0.5
    return s


def test_sinkhorn_codes_are_swavs_unshifted_codes():
    torch.manual_seed(0)
    scores = (
        torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
        @ torch.nn.functional.normalize(torch.randn(20, 8), dim=1).t()
    )
    for iters in (1, 3):  # the global shift cancels exactly at every iteration count
        assert torch.allclose(sinkhorn(scores, 0.05, iters).double(), _swav_reference(scores, 0.05, iters), atol=1e-6)


def test_sinkhorn_on_peaked_scores_is_close_to_converged_codes():
    scores = _peaked()
    converged = _swav_reference(scores, 0.05, 5000)
    q = sinkhorn(scores, 0.05, 3).double()
    assert (q - converged).abs().sum(1).mean() < 0.01  # a per-image shift gave ~1.0 here
    assert torch.isfinite(sinkhorn(scores, 1e-4, 3)).all()  # exp range far beyond float64: no nan


def test_swav_views_use_pretrain_augment():
    from torchvision.transforms import v2

    cfg = W.load_cfg([])
    steps = two_view_transform(cfg.data, cfg.pretrain.augment).transforms[0].transforms
    jitter = next(t.transforms[0] for t in steps if isinstance(t, v2.RandomApply))
    assert jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)
    assert next(t for t in steps if isinstance(t, v2.RandomGrayscale)).p == 0.2
    no_flip = dataclasses.replace(cfg.pretrain.augment, flip=False)
    assert not any(
        isinstance(t, v2.RandomHorizontalFlip) for t in two_view_transform(cfg.data, no_flip).transforms[0].transforms
    )


def test_swav_heads_and_prototype_count_come_from_the_checkpoint(tmp_path):
    torch.manual_seed(1)
    src = SwAVNet(W_embedder(), proj_dim=12, prototypes=7)
    official = {f"module.{k}": v for k, v in src.embedder.backbone.state_dict().items()}
    official.update({f"module.projection_head.{k}": v for k, v in src.projection.state_dict().items()})
    official["module.prototypes.weight"] = src.prototypes.weight.detach().clone()
    path = tmp_path / "swav_official.pth.tar"
    torch.save(official, path)
    cfg = W.load_cfg(
        ["model.backbone=tiny_cnn", "model.embed_dim=16", "model.freeze_bn=false", f"model.pretrained_path={path}"]
    )
    net, loaded = build_swav_net(cfg)
    assert loaded and net.prototypes.weight.shape == (7, 12)  # not pretrain.prototypes / proj_dim
    for k, v in src.projection.state_dict().items():
        assert torch.equal(net.projection.state_dict()[k], v), k
    assert torch.allclose(net.prototypes.weight, src.prototypes.weight)
    torch.save({"state_dict": src.embedder.state_dict()}, tmp_path / "ours.pt")  # no heads: config's K
    net2, loaded2 = build_swav_net(
        W.load_cfg(["model.backbone=tiny_cnn", f"model.pretrained_path={tmp_path / 'ours.pt'}"])
    )
    assert not loaded2 and net2.prototypes.weight.shape[0] == cfg.pretrain.prototypes


def test_swav_groups_backbone_lr_mult_and_freeze():
    cfg = W.load_cfg(["pretrain.lr=0.01", "pretrain.backbone_lr_mult=0.1", "pretrain.freeze_backbone_steps=7"])
    net = SwAVNet(W_embedder(), proj_dim=8, prototypes=6)
    groups = {g.name: g for g in swav_groups(net, cfg.pretrain)}
    assert groups["backbone"].lr == pytest.approx(0.001) and groups["backbone"].start == 7
    assert groups["projection"].lr == 0.01 and groups["projection"].start == 0
    assert groups["prototypes"].start == cfg.pretrain.freeze_prototypes_steps


def test_the_better_of_input_and_output_is_handed_on(tmp_path):
    data = W.make_data(tmp_path / "data", n_classes=4, per_class=6, unl_per_class=1)
    cfg = W.load_cfg(W.overrides(data, tmp_path / "run"))
    torch.manual_seed(0)
    good = C.init_embedder(cfg.model, None)
    broken = copy.deepcopy(good)
    with torch.no_grad():
        for p in broken.backbone.parameters():
            p.zero_()  # constant features: every neighbour ties, chance-level MAP@R
    state = lambda m: {k: v.clone() for k, v in m.state_dict().items()}  # noqa: E731
    out, info = _better_of(cfg, broken, state(good), torch.device("cpu"))
    assert (
        info["knn_map_at_r"]["handed_on"] == "input" and info["knn_map_at_r"]["input"] > info["knn_map_at_r"]["output"]
    )
    assert torch.equal(out.backbone.features[0].weight, good.backbone.features[0].weight)
    out, info = _better_of(cfg, good, state(broken), torch.device("cpu"))
    assert info["knn_map_at_r"]["handed_on"] == "output" and out is good
