"""Tests of slade_dist/train/pretrain.py (SwAV's stage): the multi-crop stream, heads, groups, the stage.

The stage runs on a real one-process DeepSpeed engine over tiny real shards (labeled + unlabeled,
with undecodable images among them), and its export initialises the teacher's embedder.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from slade_dist.data.multicrop import local_view_transform, swav_batches, two_view_transform
from slade_dist.models import load_embedder
from slade_dist.stages import RunLayout
from slade_dist.train import common as C
from slade_dist.train.common import pretrain_init_path
from slade_dist.train.pretrain import _better_of, build_swav_net, run, swav_groups
from slade_dist.train.swav import SwAVNet

from ..integration import _train_workers as W

pytestmark = pytest.mark.usefixtures("one_thread_no_leftover_group")


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
    # random weights, pretrain.backbone_lr_mult auto: the backbone trains at the full lr (x 1.0)
    assert cfg.pretrain.backbone_lr_mult is None and tb["lr/backbone"] == tb["lr/projection"]
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
    out, info = _better_of(cfg, broken, copy.deepcopy(good), torch.device("cpu"), seconds=42.0)
    assert (
        info["knn_map_at_r"]["handed_on"] == "input" and info["knn_map_at_r"]["input"] > info["knn_map_at_r"]["output"]
    )
    knn = info["knn_map_at_r"]  # handing on the input: a warning with both figures and the time spent
    assert f"input {knn['input']:.4f}, SwAV output {knn['output']:.4f}" in info["warning"]
    assert "42 s of SwAV were spent for nothing" in info["warning"]
    assert torch.equal(out.backbone.features[0].weight, good.backbone.features[0].weight)
    out, info = _better_of(cfg, good, copy.deepcopy(broken), torch.device("cpu"))
    assert info["knn_map_at_r"]["handed_on"] == "output" and out is good and "warning" not in info


def test_multicrop_stream_gives_two_global_and_v_local_views(tmp_path):
    data = W.make_data(tmp_path / "data", n_classes=2, per_class=4, unl_per_class=2, corrupt=1)
    cfg = W.load_cfg(W.overrides(data, tmp_path / "run", "pretrain.local_crops=3", "pretrain.local_crop_size=12"))
    stream = swav_batches(
        [cfg.data.train_shards, cfg.data.unlabeled_shards],
        cfg.data,
        4,
        seed=0,
        rank=0,
        world=1,
        augment=cfg.pretrain.augment,
        pretrain_cfg=cfg.pretrain,
    )
    batch = next(stream)
    assert batch["view1"].shape == batch["view2"].shape == (4, 3, 32, 32)
    assert batch["local"].shape == (3, 4, 3, 12, 12)
    crop = local_view_transform(cfg.pretrain, cfg.data, cfg.pretrain.augment).transforms[0].transforms[1]
    assert crop.scale == (0.05, 0.14)  # SwAV's local scale range, not the global crops'
    assert W.load_cfg(["data.image_size=224"]).pretrain.local_crop_size is None
    none = W.load_cfg(W.overrides(data, tmp_path / "run", "pretrain.local_crops=0"))
    assert "local" not in next(
        swav_batches([cfg.data.train_shards], none.data, 4, seed=0, rank=0, world=1, pretrain_cfg=none.pretrain)
    )


def test_local_crops_larger_than_the_global_ones_fail_at_load():
    from slade_dist.config import ConfigError

    with pytest.raises(ConfigError, match="local_crop_size"):
        W.load_cfg(["data.image_size=32", "pretrain.local_crop_size=48"])
    with pytest.raises(ConfigError, match="local_crop_scale_min"):
        W.load_cfg(["pretrain.local_crop_scale_min=0.5"])


def test_pretrain_stage_uses_the_queue_when_the_batch_is_below_the_prototypes(tmp_path):
    data = W.make_data(tmp_path / "data", n_classes=4, per_class=6, unl_per_class=6)
    run_dir = tmp_path / "run"
    extra = ("pretrain.steps=10", "pretrain.prototypes=20", "pretrain.local_crops=2", "train.log_every=1")
    res = run(W.load_cfg(W.overrides(data, run_dir, *extra)), run_dir)  # batch 16 < 20: queue of 48 rows
    assert res["steps"] == 10
    used = dict(W.tb_scalars(RunLayout(run_dir).tb_dir("pretrain"))["swav/queue_used"])
    # filled after 3 steps of 16 rows, used from freeze_prototypes_steps (3) on
    assert [used[s] for s in sorted(used)] == [0.0] * 3 + [1.0] * 7, used
