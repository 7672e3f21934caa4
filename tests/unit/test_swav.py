"""Tests of slade_dist/train/swav.py: Sinkhorn codes, the feature queue, the multi-crop swapped loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slade_dist.train.swav import FeatureQueue, SwAVNet, queue_length, sinkhorn, swav_loss

pytestmark = pytest.mark.usefixtures("one_thread_no_leftover_group")


def _embedder():
    from slade_dist.config import ModelConfig
    from slade_dist.models import build_embedder

    return build_embedder(ModelConfig(backbone="tiny_cnn", embed_dim=16, freeze_bn=False))


def _cosines(B: int, K: int, dim: int = 8) -> torch.Tensor:
    return F.normalize(torch.randn(B, dim), dim=1) @ F.normalize(torch.randn(K, dim), dim=1).t()


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


# ---------------------------------------------------------------------------------- sinkhorn
def test_sinkhorn_codes_are_doubly_stochastic():
    torch.manual_seed(0)
    B, K = 64, 16
    scores = _cosines(B, K)
    q = sinkhorn(scores, epsilon=0.05, iters=3)
    assert q.shape == (B, K) and (q >= 0).all()
    assert torch.allclose(q.sum(1), torch.ones(B), atol=1e-5)  # one unit of mass per image
    usage = q.sum(0)  # moving towards B/K uses of every prototype (exact only at convergence, below)
    plain = torch.softmax(scores / 0.05, dim=1).sum(0)  # without equipartition: very unequal
    assert (usage - B / K).abs().max() < (plain - B / K).abs().max()
    q_conv = sinkhorn(scores, epsilon=0.05, iters=200)
    assert torch.allclose(q_conv.sum(0), torch.full((K,), B / K), rtol=1e-3)


def test_sinkhorn_codes_are_swavs_unshifted_codes():
    torch.manual_seed(0)
    scores = _cosines(32, 20)
    for iters in (1, 3):  # the global shift cancels exactly at every iteration count
        assert torch.allclose(sinkhorn(scores, 0.05, iters).double(), _swav_reference(scores, 0.05, iters), atol=1e-6)


def test_sinkhorn_on_peaked_scores_is_close_to_converged_codes():
    scores = _peaked()
    converged = _swav_reference(scores, 0.05, 5000)
    q = sinkhorn(scores, 0.05, 3).double()
    assert (q - converged).abs().sum(1).mean() < 0.01  # a per-image shift gave ~1.0 here
    assert torch.isfinite(sinkhorn(scores, 1e-4, 3)).all()  # exp range far beyond float64: no nan


# ------------------------------------------------------------------------------------ queue
def test_queue_length_auto_only_when_the_global_batch_is_below_the_prototypes():
    # pretrain.batch_size is the step's global batch, whatever the world size
    assert queue_length(-1, 64, 1, 100) == 256  # smallest multiple of 64 holding 2 x 100 rows
    assert queue_length(-1, 64, 4, 100) == 64  # the same 256 global rows, 64 per rank
    assert queue_length(-1, 256, 4, 100) == 0  # global batch 256 >= 100 prototypes: no queue
    assert queue_length(-1, 64, 2, 300) == 320  # 640 global rows (10 x 64), 320 per rank
    assert queue_length(0, 8, 1, 300) == 0
    assert queue_length(3840, 256, 4, 3000) == 960  # configured: global rows split over the ranks


def test_feature_queue_keeps_the_newest_rows_first_and_knows_when_full():
    q = FeatureQueue(views=2, length=5, dim=3)
    assert not q.full
    for step in range(3):  # 2 rows per view and step: 6 > 5, the oldest row drops out
        q.push([torch.full((2, 3), float(10 * v + step)) for v in range(2)])
        assert q.full == (step == 2)
    assert q.z[0, :, 0].tolist() == [2, 2, 1, 1, 0] and q.z[1, :, 0].tolist() == [12, 12, 11, 11, 10]
    q.push([torch.full((9, 3), 7.0)] * 2)  # a batch longer than the queue keeps its first rows
    assert (q.z == 7).all() and q.z.shape == (2, 5, 3)


def test_the_queue_frees_a_small_batch_from_equipartition():
    """B = 16 images over K = 64 prototypes: equipartition on the batch alone spreads each image's
    code over ~4 prototypes whatever its scores say; with 240 queued rows of the same kind the codes
    follow the scores (each image's own peak), as SwAV's queue intends."""
    K, B = 64, 16
    peaks = _peaked(B + 240, K, seed=3) + 1.0
    batch, queued = peaks[240:], peaks[:240]
    own = batch.argmax(1)
    alone = sinkhorn(batch, 0.05, 3)
    with_queue = sinkhorn(torch.cat([queued, batch]), 0.05, 3)[-B:]
    mass_alone = alone[torch.arange(B), own].mean()
    mass_queue = with_queue[torch.arange(B), own].mean()
    assert mass_queue > mass_alone + 0.2, (mass_alone, mass_queue)
    loss_q = swav_loss([batch, batch], 0.1, 0.05, 3, queue_scores=torch.stack([queued, queued]))
    loss_a = swav_loss([batch, batch], 0.1, 0.05, 3)
    assert loss_q < loss_a  # the targets agree with the predictions once the queue carries the mass


# ------------------------------------------------------------------------------------- loss
def test_swav_loss_of_two_views_is_the_swapped_prediction():
    torch.manual_seed(0)
    s1, s2 = _cosines(12, 6), _cosines(12, 6)
    q1, q2 = sinkhorn(s1, 0.05, 3), sinkhorn(s2, 0.05, 3)
    ref = -0.5 * ((q2 * F.log_softmax(s1 / 0.1, 1)).sum(1).mean() + (q1 * F.log_softmax(s2 / 0.1, 1)).sum(1).mean())
    assert torch.allclose(swav_loss([s1, s2], 0.1, 0.05, 3), ref, atol=1e-6)


def test_multicrop_loss_averages_every_crop_against_both_global_codes():
    torch.manual_seed(1)
    crops = [_cosines(8, 5).requires_grad_() for _ in range(4)]  # 2 global + 2 local
    q = [sinkhorn(c.detach(), 0.05, 3) for c in crops[:2]]
    pairs = [(i, v) for i in range(2) for v in range(4) if v != i]
    ref = sum(-(q[i] * F.log_softmax(crops[v] / 0.1, 1)).sum(1).mean() for i, v in pairs) / len(pairs)
    loss = swav_loss(crops, 0.1, 0.05, 3)
    assert torch.allclose(loss, ref, atol=1e-6) and len(pairs) == 6
    loss.backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in crops)  # local crops learn too


def test_swav_loss_is_low_when_views_agree_and_has_gradients():
    torch.manual_seed(0)
    net = SwAVNet(_embedder(), proj_dim=8, prototypes=6)
    x = torch.randn(12, 3, 32, 32)
    s1 = net(x)
    same = swav_loss([s1, s1.detach().clone().requires_grad_()], 0.1, 0.05, 3)
    other = swav_loss([s1, net(torch.randn(12, 3, 32, 32))], 0.1, 0.05, 3)
    assert math.isfinite(same.item()) and same.item() < other.item()
    other.backward()
    assert net.prototypes.weight.grad is not None and net.projection[0].weight.grad.abs().sum() > 0


def test_swav_net_takes_crops_of_two_sizes_and_scores_the_queue():
    torch.manual_seed(0)
    net = SwAVNet(_embedder(), proj_dim=8, prototypes=6).eval()  # eval: BatchNorm per row, comparable
    big, small = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)
    queue = F.normalize(torch.randn(2, 5, 8), dim=2)
    out = net([big, small], queue)
    assert out.z.shape == (10, 8) and out.scores.shape == (10, 6) and out.queue_scores.shape == (2, 5, 6)
    assert torch.allclose(out.scores[:4], net(big), atol=1e-5) and torch.allclose(out.scores[4:], net(small), atol=1e-5)
    protos = F.normalize(net.prototypes.weight, dim=1)
    assert torch.allclose(out.queue_scores, queue @ protos.t(), atol=1e-6) and not out.queue_scores.requires_grad
    assert net([big]).queue_scores is None
