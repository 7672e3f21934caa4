"""Tests for slade_dist/losses.py: agreement with pytorch-metric-learning (an independent
implementation, test-only) on values and gradients, explicit pair lists, empty pair sets. The same
losses on 1, 2 and 4 real gloo ranks holding one global batch: tests/integration/test_world_invariance.py."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from slade_dist.config import LossConfig
from slade_dist.losses import ContrastiveLoss, MultiSimilarityLoss, build_loss


def _batch(seed: int, n: int = 48, d: int = 16, classes: int = 8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, classes, (n,), generator=g)
    return emb, labels


def _value_and_grad(loss: torch.Tensor, emb: torch.Tensor):
    (grad,) = torch.autograd.grad(loss, emb)
    return loss.item(), grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_similarity_matches_pml_with_miner(seed):
    emb, labels = _batch(seed)
    ref_loss = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
    v_ref, g_ref = _value_and_grad(ref_loss(emb, labels, miner(emb, labels)), emb)
    v, g = _value_and_grad(MultiSimilarityLoss()(emb, labels), emb)
    assert v > 0
    assert v == pytest.approx(v_ref, abs=1e-5)
    assert torch.allclose(g, g_ref, atol=1e-5)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_matches_pml(seed):
    emb, labels = _batch(seed)
    v_ref, g_ref = _value_and_grad(pml_losses.ContrastiveLoss(pos_margin=0, neg_margin=1)(emb, labels), emb)
    v, g = _value_and_grad(ContrastiveLoss()(emb, labels), emb)
    assert v == pytest.approx(v_ref, abs=1e-5)
    assert torch.allclose(g, g_ref, atol=1e-5)
    # non-default margins too
    v_ref, g_ref = _value_and_grad(pml_losses.ContrastiveLoss(pos_margin=0.3, neg_margin=0.8)(emb, labels), emb)
    v, g = _value_and_grad(ContrastiveLoss(0.3, 0.8)(emb, labels), emb)
    assert v == pytest.approx(v_ref, abs=1e-5) and torch.allclose(g, g_ref, atol=1e-5)


def _random_pairs(n: int, seed: int):
    """Disjoint random positive / negative (anchor, other) lists, no a == b."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n * n, generator=g)
    a, b = perm // n, perm % n
    keep = a != b
    a, b = a[keep], b[keep]
    pos = torch.stack([a[:40], b[:40]])
    neg = torch.stack([a[40:160], b[40:160]])
    return pos, neg


@pytest.mark.parametrize("name", ["ms", "contrastive"])
def test_explicit_pairs_match_pml_indices_tuple(name):
    emb, _ = _batch(3, n=24)
    pos, neg = _random_pairs(24, 3)
    if name == "ms":
        ref, ours = pml_losses.MultiSimilarityLoss(), MultiSimilarityLoss()  # explicit pairs: not re-mined
    else:
        ref, ours = pml_losses.ContrastiveLoss(), ContrastiveLoss()
    v_ref, g_ref = _value_and_grad(ref(emb, indices_tuple=(pos[0], pos[1], neg[0], neg[1])), emb)
    v, g = _value_and_grad(ours(emb, pos_pairs=pos, neg_pairs=neg), emb)
    assert v == pytest.approx(v_ref, abs=1e-5)
    assert torch.allclose(g, g_ref, atol=1e-5)


def test_explicit_all_pairs_equal_label_mode():
    emb, labels = _batch(4)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    pos, neg = (same & ~eye).nonzero().t(), (~same).nonzero().t()
    mined = MultiSimilarityLoss(mine_explicit=True)
    assert mined(emb, pos_pairs=pos, neg_pairs=neg).item() == pytest.approx(mined(emb, labels).item(), abs=1e-12)
    plain = MultiSimilarityLoss(mine=False)
    assert MultiSimilarityLoss()(emb, pos_pairs=pos, neg_pairs=neg).item() == pytest.approx(
        plain(emb, labels).item(), abs=1e-12
    )
    assert plain(emb, labels).item() != pytest.approx(mined(emb, labels).item(), abs=1e-6)  # mining matters


@pytest.mark.parametrize("loss_fn", [MultiSimilarityLoss(), ContrastiveLoss()])
def test_empty_pairs_give_connected_zero(loss_fn):
    emb = torch.randn(6, 4, requires_grad=True)
    loss = loss_fn(emb, torch.arange(6))  # all labels distinct: MS miner finds nothing
    empty = torch.zeros(2, 0, dtype=torch.long)
    loss2 = loss_fn(emb, pos_pairs=empty, neg_pairs=empty)
    for value in (loss2,) + ((loss,) if isinstance(loss_fn, MultiSimilarityLoss) else ()):
        assert value.item() == 0.0 and value.grad_fn is not None
        (g,) = torch.autograd.grad(value, emb)
        assert torch.all(g == 0)


def test_bad_inputs_raise_clear_errors():
    emb = torch.randn(4, 3)
    with pytest.raises(ValueError, match="either labels"):
        MultiSimilarityLoss()(emb)
    with pytest.raises(ValueError, match="out of range"):
        MultiSimilarityLoss()(emb, pos_pairs=torch.tensor([[0], [9]]))
    with pytest.raises(ValueError, match="both as positive and as negative"):
        ContrastiveLoss()(emb, pos_pairs=torch.tensor([[0], [1]]), neg_pairs=torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="labels for"):
        ContrastiveLoss()(emb, torch.arange(3))


def test_build_loss_from_config():
    ms = build_loss(LossConfig(name="ms", ms_alpha=3.0, ms_eps=0.2))
    assert isinstance(ms, MultiSimilarityLoss) and ms.alpha == 3.0 and ms.epsilon == 0.2
    c = build_loss(LossConfig(name="contrastive", neg_margin=0.7))
    assert isinstance(c, ContrastiveLoss) and c.neg_margin == 0.7


def test_fp32_under_bf16_autocast():
    emb, labels = _batch(6, dtype=torch.float32)
    ref = MultiSimilarityLoss()(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = MultiSimilarityLoss()(emb, labels)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), abs=1e-6)
