"""Tests for slade_dist/models (backbones.py, embedder.py): shapes, pooling, freeze_bn,
save/load round-trip, checked state-dict loading (exact key lists), local pretrained weights
(torchvision, SwAV-style, timm and safetensors files), timm ViTs (token pooling, any crop size),
hub weights from a cache the test builds (offline), clear errors."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
import torchvision

from slade_dist.config import ConfigError, ModelConfig
from slade_dist.eval.metrics import retrieval_metrics
from slade_dist.models import (
    StateDictMismatchError,
    build_embedder,
    embed_batches,
    load_embedder,
    load_state_dict_checked,
    output_dim,
    save_weights,
)
from slade_dist.models.backbones import (
    CheckpointError,
    HubWeightsMissing,
    ResNetTrunk,
    UnsafeCheckpointError,
    read_checkpoint,
)
from slade_dist.models.retrieval import knn_map_at_r, map_at_r


def _cfg(**kw) -> ModelConfig:
    base = dict(backbone="tiny_cnn", embed_dim=16, freeze_bn=False, pooling="avg")
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("backbone,feature_dim", [("tiny_cnn", 192), ("resnet18", 512), ("resnet50", 2048)])
def test_shapes(backbone, feature_dim):
    emb = build_embedder(_cfg(backbone=backbone))
    assert emb.feature_dim == feature_dim and emb.embed_dim == 16
    assert emb.head.in_features == feature_dim and emb.head.out_features == 16
    out = emb.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 16)
    assert not torch.allclose(out.norm(dim=1), torch.ones(2))  # raw, not normalised
    groups = emb.param_groups()
    assert set(groups) == {"backbone", "head"} and len(groups["head"]) == 2 and groups["backbone"]


@pytest.mark.parametrize("pooling", ["avg", "max", "avgmax"])
def test_pooling(pooling):
    emb = build_embedder(_cfg(pooling=pooling)).eval()
    x = torch.randn(3, 3, 32, 32)
    fmap = emb.backbone(x)
    expect = {"avg": fmap.mean((2, 3)), "max": fmap.amax((2, 3)), "avgmax": fmap.mean((2, 3)) + fmap.amax((2, 3))}
    assert torch.allclose(emb.features(x), expect[pooling])


def test_bad_names_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model.backbone 'resnet9'"):
        build_embedder(_cfg(backbone="resnet9"))
    with pytest.raises(ValueError, match="pooling"):
        from slade_dist.models import Embedder
        from slade_dist.models.backbones import TinyCNN

        Embedder(TinyCNN(), 8, pooling="median")


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_timm_backbone_without_timm_says_so():
    with pytest.raises(ImportError, match="optional package timm"):
        build_embedder(_cfg(backbone="timm:vit_small_patch16_224"))


def test_freeze_bn_keeps_statistics_and_params_fixed():
    emb = build_embedder(_cfg(freeze_bn=True)).train()
    bns = [m for m in emb.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert emb.training and emb.head.training
    before = [m.running_mean.clone() for m in bns]
    emb(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    assert all(p.grad is None and not p.requires_grad for m in bns for p in m.parameters())
    bn_ids = {id(p) for m in bns for p in m.parameters()}
    assert not bn_ids & {id(p) for p in emb.param_groups()["backbone"]}
    # without freezing, train() updates running stats
    free = build_embedder(_cfg(freeze_bn=False)).train()
    bn0 = next(m for m in free.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    rm = bn0.running_mean.clone()
    free(torch.randn(4, 3, 32, 32))
    assert not torch.equal(rm, bn0.running_mean)


def test_save_load_round_trip(tmp_path):
    cfg = _cfg(pooling="avgmax", freeze_bn=False)
    emb = build_embedder(cfg)
    emb.train()(torch.randn(4, 3, 32, 32))  # BN running stats move away from their init
    with torch.no_grad():
        emb.head.bias.add_(0.5)
    path = save_weights(tmp_path / "sub" / "final.pt", emb, cfg, extra={"step": 7})
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["final.pt"]  # no tmp left
    raw = torch.load(path, weights_only=True)
    assert raw["extra"] == {"step": 7} and raw["model"]["pooling"] == "avgmax"
    back = load_embedder(path)
    assert back.pooling == "avgmax" and not back.freeze_bn
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(emb.eval()(x), back.eval()(x))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_embedder(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(RuntimeError, match="corrupt"):
        load_embedder(bad)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(RuntimeError, match="not an embedder weights file"):
        load_embedder(tmp_path / "other.pt")


class _Payload:
    """Pickles to a call of os.system: what a planted checkpoint would run on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "PWNED"
    emb = build_embedder(_cfg())
    evil = tmp_path / "final.pt"
    torch.save({"state_dict": emb.state_dict(), "model": {}, "extra": {"x": _Payload(marker)}}, evil)
    with pytest.raises(UnsafeCheckpointError, match="refused.*would import code.*system"):
        load_embedder(evil)
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(evil)
    assert not marker.exists()


def test_mismatched_keys_are_named_exactly():
    emb = build_embedder(_cfg())
    sd = emb.state_dict()
    sd["backbone.extra.weight"] = torch.zeros(1)
    del sd["head.bias"]
    sd["head.weight"] = torch.zeros(3, 3)
    before = emb.head.weight.clone()
    with pytest.raises(StateDictMismatchError) as err:
        load_state_dict_checked(emb, sd, what="test file")
    assert torch.equal(before, emb.head.weight)  # nothing loaded
    msg = str(err.value)
    assert "test file" in msg
    assert "missing keys (1): head.bias" in msg
    assert "unexpected keys (1): backbone.extra.weight" in msg
    assert "head.weight: checkpoint shape (3, 3) vs model shape (16, 192)" in msg


def test_pretrained_torchvision_and_swav_files_load_into_backbone(tmp_path):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18(weights=None)
    tv_path = tmp_path / "resnet18_tv.pth"
    torch.save(tv.state_dict(), tv_path)  # includes fc.* (dropped as a known head)
    emb = build_embedder(_cfg(backbone="resnet18", pretrained_path=str(tv_path)))
    assert torch.equal(emb.backbone.conv1.weight, tv.conv1.weight)
    assert torch.equal(emb.backbone.layer4[1].bn2.running_var, tv.layer4[1].bn2.running_var)
    # SwAV-style: {"state_dict": {"module.<trunk>", "module.projection_head.*", "module.prototypes.*"}}
    swav = {f"module.{k}": v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    swav["module.projection_head.0.weight"] = torch.zeros(4, 512)
    swav["module.prototypes.weight"] = torch.zeros(10, 4)
    swav_path = tmp_path / "swav.pth.tar"
    torch.save({"epoch": 3, "state_dict": swav}, swav_path)
    emb2 = build_embedder(_cfg(backbone="resnet18", pretrained_path=str(swav_path)))
    assert torch.equal(emb2.backbone.layer2[0].conv1.weight, tv.layer2[0].conv1.weight)
    # a truncated trunk names what is missing
    partial = {k: v for k, v in tv.state_dict().items() if not k.startswith("layer4.1.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(StateDictMismatchError, match=r"missing keys \(\d+\): layer4\.1\.bn1\.bias"):
        build_embedder(_cfg(backbone="resnet18", pretrained_path=str(tmp_path / "partial.pth")))


def test_our_weights_file_works_as_pretrained_backbone(tmp_path):
    cfg = _cfg()
    emb = build_embedder(cfg)
    path = save_weights(tmp_path / "teacher.pt", emb, cfg)
    other = build_embedder(_cfg(embed_dim=32, pretrained_path=str(path)))  # different head: dropped
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(emb.eval().features(x), other.eval().features(x))


def test_resnet_trunk_has_torchvision_key_names():
    trunk_keys = set(ResNetTrunk(18).state_dict())
    tv_keys = {k for k in torchvision.models.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert trunk_keys == tv_keys


def test_embed_batches_normalises_and_restores_the_mode():
    torch.manual_seed(0)
    emb = build_embedder(_cfg())
    emb.train()
    batches = [{"images": torch.randn(3, 3, 32, 32), "tag": i} for i in range(2)]
    out = list(embed_batches(emb, batches, torch.device("cpu")))
    assert [b["tag"] for _, b in out] == [0, 1]
    e = out[0][0]
    assert e.shape == (3, output_dim(emb)) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        emb.eval()
        ref = torch.nn.functional.normalize(emb(batches[0]["images"]), dim=1).numpy()
        emb.train()
    assert np.allclose(e, ref, atol=1e-6)  # eval-mode forward (BatchNorm running stats), no dropout
    assert emb.training  # the caller's mode is back


def test_embed_batches_runs_the_head_in_fp32_under_autocast():
    torch.manual_seed(0)
    emb = build_embedder(_cfg()).eval()
    x = torch.randn(4, 3, 32, 32)
    ((e, _),) = embed_batches(emb, [{"images": x}], torch.device("cpu"), autocast=True)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f = emb.features(x)
            all_bf16 = emb.head(f)
        fp32_head = emb.head(f.float())
    assert all_bf16.dtype == torch.bfloat16 and f.dtype == torch.bfloat16  # autocast did act on the backbone
    ref = torch.nn.functional.normalize(fp32_head, dim=1).numpy()
    assert np.allclose(e, ref, atol=1e-6)
    bf16 = torch.nn.functional.normalize(all_bf16.float(), dim=1).numpy()
    assert np.abs(e - bf16).max() > 1e-4  # the head's own bf16 rounding is gone


def test_knn_map_at_r_agrees_with_the_eval_metrics():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 300)
    centers = rng.normal(size=(12, 16))
    emb = centers[labels] + rng.normal(scale=1.2, size=(300, 16))
    labels[:3] = 99  # one class of three, and ...
    labels[3] = 100  # ... a lone query, left out by both
    ref = retrieval_metrics(emb.astype(np.float32), labels, recall_k=[1])["map_at_r"]
    got = knn_map_at_r(torch.from_numpy(emb), torch.from_numpy(labels), chunk=64)
    assert 0.05 < ref < 0.95 and got == pytest.approx(ref, abs=1e-5)
    assert np.isnan(knn_map_at_r(torch.randn(3, 4), torch.arange(3)))  # every query lone
    # the one formula both use: R = 2 with hits at ranks 1 and 2 -> 1; at 2 only -> (1/2) / 2
    hits = np.array([[True, True, False], [False, True, False], [False, False, False]])
    np.testing.assert_allclose(map_at_r(hits, np.array([2, 2, 0])), [1.0, 0.25, 0.0])


# ----------------------------------------------------------- timm transformers, the hub, safetensors
@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache this test owns (the hub client reads these at call time)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _tokens(emb, x):
    return emb.backbone.net.forward_features(x)


def test_vit_pools_its_tokens_as_the_family_or_the_config_says():
    x = torch.randn(2, 3, 32, 32)
    auto = build_embedder(_cfg(backbone="timm:test_vit", token_pool="auto")).eval()
    assert auto.feature_dim == 64
    with torch.no_grad():
        tokens = _tokens(auto, x)  # (B, 1 + patches, C), final norm applied
        assert torch.equal(auto.features(x), tokens[:, 0])  # ViT's own pooling: the class token
        mean = build_embedder(_cfg(backbone="timm:test_vit", token_pool="mean")).eval()
        mean.load_state_dict(auto.state_dict())
        assert torch.allclose(mean.features(x), tokens[:, 1:].mean(1), atol=1e-6)
        cls = build_embedder(_cfg(backbone="timm:test_vit", token_pool="cls")).eval()
        cls.load_state_dict(auto.state_dict())
        assert torch.equal(cls.features(x), tokens[:, 0])
    # a model without a class token: auto is its own mean pooling, cls is refused
    assert build_embedder(_cfg(backbone="timm:test_vit2")).eval()(x).shape == (2, 16)
    with pytest.raises(ConfigError, match="model.token_pool=cls, but timm model 'test_vit2' has no class token"):
        build_embedder(_cfg(backbone="timm:test_vit2", token_pool="cls"))


def test_vit_takes_every_crop_size_and_round_trips(tmp_path):
    """SwAV's crops: any side (position embedding interpolated, a side that is no multiple of the patch padded)."""
    cfg = _cfg(backbone="timm:test_vit", token_pool="mean")
    emb = build_embedder(cfg).eval()
    for side in (16, 32, 40, 64):
        assert emb(torch.randn(2, 3, side, side)).shape == (2, 16)
    back = load_embedder(save_weights(tmp_path / "vit.pt", emb, cfg))
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(emb(x), back.eval()(x))


def test_hub_weights_come_from_the_cache_offline(hub_cache):
    from tests._hub_cache import cache_timm_weights

    published = cache_timm_weights(hub_cache, "test_vit")
    emb = build_embedder(_cfg(backbone="timm:test_vit", pretrained="hub"))
    own = emb.backbone.net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in published.items() if k in own)
    assert not torch.equal(build_embedder(_cfg(backbone="timm:test_vit")).backbone.net.pos_embed, own["pos_embed"])


def test_hub_weights_missing_offline_is_one_clear_error(hub_cache):
    with pytest.raises(HubWeightsMissing) as err:
        build_embedder(_cfg(backbone="timm:test_vit", pretrained="hub"))
    msg = str(err.value)
    assert "'test_vit'" in msg and "timm/test_vit.r160_in1k" in msg and str(hub_cache) in msg
    assert "HF_HUB_OFFLINE=1" in msg and "timm.create_model('test_vit', pretrained=True)" in msg
    assert "\n" not in msg


def test_safetensors_and_timm_files_as_pretrained_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    net = timm.create_model("test_vit", pretrained=False)  # with its classifier: dropped as a head
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    emb = build_embedder(_cfg(backbone="timm:test_vit", pretrained=str(path)))
    assert torch.equal(emb.backbone.net.blocks[1].mlp.fc1.weight, net.blocks[1].mlp.fc1.weight)
    pth = tmp_path / "model.pth"
    torch.save({"state_dict": net.state_dict()}, pth)
    emb2 = build_embedder(_cfg(backbone="timm:test_vit", pretrained_path=str(pth)))
    assert torch.equal(emb2.backbone.net.cls_token, net.cls_token)
    # our own export, saved as safetensors, loads into a fresh backbone too
    ours = tmp_path / "ours.safetensors"
    save_file({k: v.contiguous() for k, v in emb.state_dict().items()}, str(ours))
    emb3 = build_embedder(_cfg(backbone="timm:test_vit", pretrained=str(ours), embed_dim=8))
    assert torch.equal(emb3.backbone.net.pos_embed, net.pos_embed)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        read_checkpoint(broken)


def test_pretrained_choices_that_conflict_are_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({}, path)
    with pytest.raises(ConfigError, match="both set"):
        build_embedder(_cfg(pretrained=str(path), pretrained_path=str(path)))
    with pytest.raises(ConfigError, match="model.backbone=timm:<name>"):
        build_embedder(_cfg(pretrained="hub"))
    with pytest.raises(ConfigError, match="timm does not know the model 'no_such_net'"):
        build_embedder(_cfg(backbone="timm:no_such_net"))
