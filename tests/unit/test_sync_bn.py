"""slade_dist/train/sync_bn.py in one process: GlobalBatchNorm equals nn.BatchNorm (outputs, running
statistics, gradients), the swap keeps the Parameter objects (optimizer groups stay valid) and
leaves frozen BatchNorm alone; and the trainers refuse per-micro-batch BatchNorm under
train.grad_accum > 1. Several ranks: tests/integration/test_world_invariance.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slade_dist.config import ConfigError, load_config
from slade_dist.models import build_embedder
from slade_dist.train.common import check_trunk_bn
from slade_dist.train.sync_bn import GlobalBatchNorm, bn_trains, sync_batchnorm


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 5, 5)])
def test_global_batchnorm_in_one_process_is_batchnorm(shape):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4) if len(shape) == 4 else nn.BatchNorm1d(4)
    ours = GlobalBatchNorm(4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    (ref(x) ** 2).sum().backward()
    (ours(x2) ** 2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    for a, b in zip(ref.state_dict().values(), ours.state_dict().values()):
        assert torch.allclose(a.float(), b.float())
    assert torch.allclose(ref.eval()(x), ours.eval()(x2), atol=1e-6)


def test_the_swap_keeps_parameters_and_skips_frozen_batchnorm():
    torch.manual_seed(0)
    trains = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm1d(4)))
    weight = trains[1].weight
    trains[1].running_mean.fill_(0.5)
    assert sync_batchnorm(trains.train(), use_cuda=False) == 2
    assert isinstance(trains[1], GlobalBatchNorm) and isinstance(trains[2][0], GlobalBatchNorm)
    assert trains[1].weight is weight and float(trains[1].running_mean[0]) == 0.5
    assert sync_batchnorm(trains, use_cuda=False) == 0  # already swapped
    frozen = nn.Sequential(nn.BatchNorm1d(4)).eval()
    assert sync_batchnorm(frozen, use_cuda=False) == 0 and not bn_trains(frozen)


def test_grad_accum_with_batchnorm_that_trains_is_refused():
    cfg = load_config(
        None, ["model.backbone=tiny_cnn", "model.freeze_bn=false", "train.grad_accum=2"], check_paths=False
    )
    with pytest.raises(ConfigError, match=r"train.grad_accum = 2 .*set model.freeze_bn=true, or train.grad_accum=1"):
        check_trunk_bn(build_embedder(cfg.model), cfg)
    frozen = load_config(
        None, ["model.backbone=tiny_cnn", "model.freeze_bn=true", "train.grad_accum=2"], check_paths=False
    )
    check_trunk_bn(build_embedder(frozen.model), frozen)  # frozen BatchNorm: the step is exact
