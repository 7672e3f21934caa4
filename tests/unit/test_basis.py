"""Tests for slade_dist/basis.py (one process): planted clusters, Eq. 6 running Gaussians over
several batches, Eq. 7 mining, L_CE, state dict round-trip. 1, 2 and 4 real ranks holding one
global batch: tests/integration/test_world_invariance.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slade_dist.basis import FeatureBasis


def _planted(n_per: int = 6, dim: int = 8, noise: float = 0.05, seed: int = 0):
    """Two tight clusters along orthogonal basis directions; pseudo labels = the cluster."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(2, dim) * 3.0
    labels = torch.arange(2).repeat_interleave(n_per)
    feats = centers[labels] + noise * torch.randn(2 * n_per, dim, generator=g)
    return feats, labels


def _identity_basis(dim: int = 8, **kw) -> FeatureBasis:
    basis = FeatureBasis(num_classes=dim, dim=dim, **kw)
    with torch.no_grad():
        basis.W_a.copy_(torch.eye(dim))  # r = f, so s_ij = cos(f_i, f_j)
    return basis


def _pair_stats(sim: torch.Tensor, pl: torch.Tensor):
    """Reference batch statistics, written independently: unordered pairs i < j."""
    n = len(pl)
    pos, neg = [], []
    for i in range(n):
        for j in range(i + 1, n):
            (pos if pl[i] == pl[j] else neg).append(sim[i, j].item())
    pos, neg = torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)
    return pos.mean(), pos.var(unbiased=False), neg.mean(), neg.var(unbiased=False)


def test_planted_clusters_give_mu_pos_above_mu_neg_and_mining_finds_them():
    feats, pl = _planted()
    basis = _identity_basis()
    block = basis.pair_block(feats, pl)
    sim = block.sim.detach()
    loss, stats = basis.sd_loss(block)
    assert stats["mu_pos"] > 0.9 and abs(stats["mu_neg"]) < 0.1
    assert stats["n_pos_pairs"] == 2 * 15 and stats["n_neg_pairs"] == 36
    # margin satisfied: loss = variance term only
    assert loss.item() == pytest.approx(stats["var_pos"] + stats["var_neg"], abs=1e-6)
    pos_pairs, neg_pairs = basis.mine_pairs(block)
    same = pl[:, None] == pl[None, :]
    got_pos = {tuple(p) for p in pos_pairs.t().tolist()}
    got_neg = {tuple(p) for p in neg_pairs.t().tolist()}
    # every mined positive is a planted same-cluster pair, every mined negative a cross pair
    assert got_pos and all(same[i, j] and i != j for i, j in got_pos)
    assert got_neg and all(not same[i, j] for i, j in got_neg)
    # both orderings present; thresholds are exactly mu+ / mu-
    assert all((j, i) in got_pos for i, j in got_pos)
    off = ~torch.eye(len(pl), dtype=torch.bool)
    assert len(got_pos) == int(((sim >= basis.mu_pos) & off).sum())
    assert len(got_neg) == int(((sim <= basis.mu_neg) & off).sum())
    assert basis.stats()["n_pos_mined"] == len(got_pos) and basis.stats()["n_neg_mined"] == len(got_neg)


def test_cluster_agreement_reading_filters_by_pseudo_label():
    feats, pl = _planted(noise=0.4, seed=3)
    basis = _identity_basis()
    basis.sd_loss(basis.pair_block(feats, pl))
    wrong = pl.clone()
    wrong[0] = 1 - wrong[0]  # one image with a wrong pseudo label
    block = basis.pair_block(feats, wrong)
    lit_pos, _ = basis.mine_pairs(block, require_cluster_agreement=False)
    agr_pos, agr_neg = basis.mine_pairs(block, require_cluster_agreement=True)
    same = wrong[:, None] == wrong[None, :]
    assert all(same[i, j] for i, j in agr_pos.t().tolist())
    assert all(not same[i, j] for i, j in agr_neg.t().tolist())
    assert agr_pos.shape[1] < lit_pos.shape[1]  # the literal reading ignores the cluster ids


def test_running_gaussians_follow_eq6_over_batches():
    beta = 0.8
    basis = FeatureBasis(num_classes=5, dim=8, beta=beta, margin=0.5, lambda_sd=0.7)
    mu_p = var_p = mu_n = var_n = None
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        feats = torch.randn(16, 8, generator=g)
        pl = torch.randint(0, 3, (16,), generator=g)
        block = basis.pair_block(feats, pl)
        loss, stats = basis.sd_loss(block)
        bp, bvp, bn, bvn = _pair_stats(block.sim.detach(), pl)
        if step == 0:  # seeded from the first batch
            mu_p, var_p, mu_n, var_n = bp, bvp, bn, bvn
        else:
            mu_p, var_p = (1 - beta) * bp + beta * mu_p, (1 - beta) * bvp + beta * var_p
            mu_n, var_n = (1 - beta) * bn + beta * mu_n, (1 - beta) * bvn + beta * var_n
        assert basis.mu_pos.item() == pytest.approx(mu_p.item(), abs=1e-5)
        assert basis.var_pos.item() == pytest.approx(var_p.item(), abs=1e-5)
        assert basis.mu_neg.item() == pytest.approx(mu_n.item(), abs=1e-5)
        assert basis.var_neg.item() == pytest.approx(var_n.item(), abs=1e-5)
        expect = max(mu_n - mu_p + 0.5, 0) + 0.7 * (var_p + var_n)
        assert loss.item() == pytest.approx(float(expect), abs=1e-5)


@pytest.mark.parametrize("sd_grad,scale", [("damped", 0.1), ("full", 1.0)])
def test_only_the_batch_part_carries_gradient(sd_grad, scale):
    beta = 0.9
    basis = FeatureBasis(num_classes=4, dim=6, beta=beta, margin=2.0, lambda_sd=1.0, sd_grad=sd_grad)
    feats, pl = torch.randn(12, 6), torch.randint(0, 3, (12,))
    basis.sd_loss(basis.pair_block(feats, pl))  # seed
    feats2 = torch.randn(12, 6, requires_grad=True)
    block = basis.pair_block(feats2, pl)
    loss, _ = basis.sd_loss(block)
    (g_sim,) = torch.autograd.grad(loss, block.sim)
    # d L / d s_ij for a positive pair = scale * d(-mu_b+ + var_b+)/d s_ij (margin active), scale =
    # 1 - beta through the running update (damped), 1 with the batch statistics' own gradient
    # (full); the statistics run over ordered pairs, so s_ij and s_ji each carry half of it
    bp, _, _, _ = _pair_stats(block.sim.detach(), pl)
    i, j = next((i, j) for i in range(12) for j in range(i + 1, 12) if pl[i] == pl[j])
    n_pos = sum(int(pl[a] == pl[b]) for a in range(12) for b in range(a + 1, 12))
    expect = scale * (-1.0 / n_pos + 2.0 * (block.sim[i, j].item() - bp.item()) / n_pos) / 2
    assert g_sim[i, j].item() == pytest.approx(expect, rel=1e-4, abs=1e-7)
    assert g_sim[j, i].item() == pytest.approx(expect, rel=1e-4, abs=1e-7)
    assert torch.all(g_sim.diagonal() == 0)


def test_skip_kind_without_pairs_and_mining_off_until_separated():
    basis = FeatureBasis(num_classes=3, dim=4, beta=0.5)
    feats = torch.randn(6, 4)
    block = basis.pair_block(feats, torch.arange(6))
    loss, stats = basis.sd_loss(block)  # all distinct: negatives only
    assert bool(basis.seeded_neg) and not bool(basis.seeded_pos)
    assert loss.item() == 0.0 and loss.grad_fn is not None  # G+ unseeded: no L_SD yet
    mu_neg = basis.mu_neg.item()
    pos, neg = basis.mine_pairs(block)
    assert pos.shape == (2, 0) and neg.shape == (2, 0)
    block = basis.pair_block(feats, torch.zeros(6, dtype=torch.long))
    basis.sd_loss(block)  # positives only: G- untouched
    assert bool(basis.seeded_pos) and basis.mu_neg.item() == mu_neg
    # force mu+ <= mu-: mining must stay off
    with torch.no_grad():
        basis.mu_pos.fill_(0.1)
        basis.mu_neg.fill_(0.2)
    pos, neg = basis.mine_pairs(block)
    assert pos.numel() == 0 and neg.numel() == 0


def test_ce_loss_is_normalized_softmax():
    basis = FeatureBasis(num_classes=5, dim=8, scale=12.0)
    feats, labels = torch.randn(10, 8), torch.randint(0, 5, (10,))
    logits = 12.0 * F.normalize(feats, dim=1) @ F.normalize(basis.W_a, dim=1).t()
    assert basis.ce_loss(feats, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-6)
    basis.ce_loss(feats, labels).backward()
    assert basis.W_a.grad.abs().sum() > 0


def test_gaussians_are_saved_in_state_dict():
    feats, pl = _planted()
    a = _identity_basis()
    a.sd_loss(a.pair_block(feats, pl))
    sd = a.state_dict()
    assert {"mu_pos", "mu_neg", "var_pos", "var_neg", "seeded_pos", "seeded_neg", "W_a"} <= set(sd)
    b = FeatureBasis(num_classes=8, dim=8)
    b.load_state_dict(sd)
    assert b.stats()["mu_pos"] == a.stats()["mu_pos"] and bool(b.seeded_neg)
    assert torch.equal(b.mine_pairs(b.pair_block(feats, pl))[0], a.mine_pairs(a.pair_block(feats, pl))[0])


def test_fp32_under_bf16_autocast():
    basis = FeatureBasis(num_classes=4, dim=8)
    feats, pl = torch.randn(10, 8), torch.randint(0, 3, (10,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = basis.pair_block(feats.bfloat16(), pl).sim
        ce = basis.ce_loss(feats.bfloat16(), pl)
    assert sim.dtype == torch.float32 and ce.dtype == torch.float32


def _sd_and_ce_grads(sd_grad: str, beta: float = 0.99, seed: int = 0) -> tuple[float, float, float]:
    """(|d lambda2 L_SD / d W_a|, |d lambda2 L_CE / d W_a|, L_SD) on a seeded basis, a
    student-sized batch (32 unlabeled of 8 pseudo classes, 32 labeled of 8 classes, d = 64)."""
    torch.manual_seed(seed)
    basis = FeatureBasis(num_classes=40, dim=64, beta=beta, sd_grad=sd_grad)
    pl = torch.arange(8).repeat_interleave(4)
    basis.sd_loss(basis.pair_block(torch.randn(32, 64), pl))  # seed G+ / G-
    loss, _ = basis.sd_loss(basis.pair_block(torch.randn(32, 64), pl))
    (g_sd,) = torch.autograd.grad(0.25 * loss, basis.W_a)
    (g_ce,) = torch.autograd.grad(0.25 * basis.ce_loss(torch.randn(32, 64), pl), basis.W_a)
    return float(g_sd.norm()), float(g_ce.norm()), float(loss.detach())


def test_full_sd_grad_is_the_damped_one_undamped_with_the_same_value():
    full_sd, full_ce, full_loss = _sd_and_ce_grads("full")
    damped_sd, damped_ce, damped_loss = _sd_and_ce_grads("damped")
    assert full_loss == pytest.approx(damped_loss, rel=1e-6)  # same L_SD value: the running Gaussians
    assert full_sd / damped_sd == pytest.approx(1 / (1 - 0.99), rel=1e-3)
    # damped, L_SD's pull on W_a is a small fraction of L_CE's; full brings it to the same order
    assert damped_sd / damped_ce < 0.05 < full_sd / full_ce
    assert full_ce == damped_ce


def test_reset_gaussians_reseeds_from_the_next_batch():
    feats, pl = _planted()
    basis = _identity_basis(beta=0.9)
    basis.sd_loss(basis.pair_block(torch.randn(12, 8), pl))
    basis.reset_gaussians()
    assert not bool(basis.seeded_pos) and not bool(basis.seeded_neg)
    assert basis.mine_pairs(basis.pair_block(feats, pl))[0].numel() == 0  # off while unseeded
    block = basis.pair_block(feats, pl)
    _, stats = basis.sd_loss(block)
    bp, bvp, bn, bvn = _pair_stats(block.sim.detach(), pl)
    assert stats["mu_pos"] == pytest.approx(bp.item(), abs=1e-5)  # the new batch alone, no old mean
    assert stats["var_neg"] == pytest.approx(bvn.item(), abs=1e-5)


def test_project_gives_the_cosines_ce_scores():
    basis = FeatureBasis(num_classes=5, dim=8)
    with torch.no_grad():
        basis.W_a.mul_(torch.arange(1, 6).view(-1, 1).float())  # rows of very different length
    feats = torch.randn(6, 8) * 7.0
    r = basis.project(feats)
    assert torch.allclose(r, F.normalize(feats, dim=1) @ F.normalize(basis.W_a, dim=1).t(), atol=1e-6)
    assert r.abs().max() <= 1.0 + 1e-6


def test_mining_shares_count_both_readings_from_one_sim():
    feats, pl = _planted(noise=0.4, seed=3)
    basis = _identity_basis()
    assert basis.mining_shares(basis.pair_block(feats, pl)) == {}  # unseeded: nothing to say
    basis.sd_loss(basis.pair_block(feats, pl))
    wrong = pl.clone()
    wrong[0] = 1 - wrong[0]
    block = basis.pair_block(feats, wrong)
    shares = basis.mining_shares(block)
    lit_pos, lit_neg = basis.mine_pairs(block, require_cluster_agreement=False)
    agr_pos, agr_neg = basis.mine_pairs(block, require_cluster_agreement=True)
    assert shares["literal_pos_pairs"] == lit_pos.shape[1] and shares["agreement_pos_pairs"] == agr_pos.shape[1]
    assert shares["literal_neg_pairs"] == lit_neg.shape[1] and shares["agreement_neg_pairs"] == agr_neg.shape[1]
    assert shares["literal_pos_same_cluster"] == pytest.approx(agr_pos.shape[1] / lit_pos.shape[1])
    assert shares["literal_neg_diff_cluster"] == pytest.approx(agr_neg.shape[1] / lit_neg.shape[1])
    assert 0 < shares["literal_pos_same_cluster"] < 1  # the wrong label makes some disagree


def test_beta_must_be_below_one():
    with pytest.raises(ValueError, match="beta < 1"):
        FeatureBasis(num_classes=3, dim=4, beta=1.0)
