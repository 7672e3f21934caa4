"""Tests of slade_dist/train/student.py: the loss terms of each ablation and the basis warm-up.

One real (CPU, one process) DeepSpeed engine per case, fed in-memory P x K batches (the stage
itself on real shards and 2 ranks is tests/integration/test_train_multirank.py).
"""

from __future__ import annotations

import pytest
import torch

from slade_dist.losses import build_loss
from slade_dist.train import engine as E
from slade_dist.train.loop import optimizer_step
from slade_dist.train.student import StudentNet, StudentObjective, param_groups

from ..integration import _train_workers as W

pytestmark = pytest.mark.usefixtures("one_thread_no_leftover_group")


def _batches(n_classes: int, seed: int, truth: bool = False):
    """Endless P x K = 4 x 4 batches of 32x32 images whose label sets the mean colour; with
    `truth`, the hidden classes too: the labels themselves, one of them unknown (-1)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        labels = torch.randperm(n_classes, generator=g)[:4].repeat_interleave(4)
        x = torch.randn(16, 3, 32, 32, generator=g) * 0.3 + labels.view(-1, 1, 1, 1).float() / n_classes
        batch = {"images": x, "labels": labels, "skipped": 0}
        if truth:
            batch["true_labels"] = torch.cat([labels[:-1], torch.tensor([-1])])
        yield batch


def _run(tmp_path, ablation: str, steps: int = 4, warmup: int = 2, before_step=None, truth: bool = False):
    """(scalars of each step, the module, the trainer, the parameters before training);
    before_step(step, net, step_fn) runs before each step."""
    from slade_dist.basis import FeatureBasis
    from slade_dist.models import build_embedder

    cfg = W.load_cfg(
        W.overrides(
            {"train": "", "test": "", "unlabeled": ""},
            tmp_path / "run",
            f"student.ablation={ablation}",
            f"student.basis_warmup_steps={warmup}",
        )
    )
    torch.manual_seed(0)
    emb = build_embedder(cfg.model)
    basis = (
        None
        if ablation == "no_basis"
        else FeatureBasis(
            6, emb.embed_dim, cfg.basis.scale, cfg.basis.beta, cfg.basis.margin, cfg.basis.lambda_sd, cfg.basis.sd_grad
        )
    )
    net = StudentNet(emb, basis)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    tr = E.Trainer(
        net, param_groups(net, cfg), cfg.train, stage_dir=tmp_path / ablation, total_steps=steps, micro_batch=32
    )
    step_fn = StudentObjective(cfg, tr, build_loss(cfg.loss), _batches(6, 1), _batches(6, 2, truth))
    seen = []
    for s in range(steps):
        if before_step is not None:
            before_step(s, net, step_fn)
        _, scalars = optimizer_step(tr, step_fn, s, [step_fn.draw(s)])
        seen.append(scalars)
    return seen, net, tr, before


def test_full_objective_warms_up_the_basis_first(tmp_path):
    seen, net, tr, _ = _run(tmp_path, "full")
    warm, later = seen[0], seen[-1]
    assert {"loss/ce", "loss/sd"} <= set(warm) and "loss/rank_labeled" not in warm
    assert "loss/rank_mined" not in warm  # no mining while only W_a trains
    assert {"loss/rank_labeled", "loss/ce", "loss/sd", "loss/rank_mined", "mining/pos_pairs", "basis/mu_pos"} <= set(
        later
    )
    assert set(tr.group_names) == {"backbone", "head", "basis"}


def test_warmup_trains_only_the_basis(tmp_path):
    seen, net, tr, before = _run(tmp_path, "full", steps=2, warmup=2)
    for name, p in net.named_parameters():
        changed = not torch.equal(before[name], p.detach().cpu())
        assert changed == name.startswith("basis."), f"{name}: changed={changed} during the warm-up"


@pytest.mark.parametrize(
    "ablation,present,absent",
    [
        ("no_mining", {"loss/rank_labeled", "loss/ce", "loss/sd"}, {"loss/rank_mined", "loss/rank_unlabeled"}),
        ("no_basis", {"loss/rank_labeled", "loss/rank_unlabeled"}, {"loss/ce", "loss/sd", "loss/rank_mined"}),
        ("raw_pairs", {"loss/rank_labeled", "loss/rank_unlabeled", "loss/ce", "loss/sd"}, {"loss/rank_mined"}),
    ],
)
def test_ablations_select_their_terms(tmp_path, ablation, present, absent):
    seen, net, tr, _ = _run(tmp_path, ablation, steps=3, warmup=1)
    last = set(seen[-1])
    assert present <= last and not (absent & last), sorted(last)
    assert (net.basis is None) == (ablation == "no_basis")
    assert ("basis" in tr.group_names) == (ablation != "no_basis")


def _plant_impossible_gaussians(net) -> None:
    """mu+ = 5 / mu- = -5: no cosine batch can give these, so a value near them means "not reset"."""
    with torch.no_grad():
        net.basis.mu_pos.fill_(5.0)
        net.basis.mu_neg.fill_(-5.0)


def test_gaussians_are_reseeded_once_when_the_warmup_ends(tmp_path):
    mus = []

    def before(step, net, step_fn):
        if step >= 2:
            mus.append(float(net.basis.mu_pos))  # after the previous step
        if step >= 1:
            _plant_impossible_gaussians(net)
        if step == 3:  # optimizer step 2 seen again (as by a process that resumed there): no second reset
            optimizer_step(step_fn.trainer, step_fn, 2, [step_fn.draw(2)])
            mus.append(float(net.basis.mu_pos))

    _run(tmp_path, "full", steps=4, warmup=2, before_step=before)
    assert mus[0] > 4.0  # warm-up step 1 kept the running mean (beta 0.99)
    assert -1.0 <= mus[1] <= 1.0  # step 2 == warm-up: re-seeded from the moving embedder's batch
    assert mus[2] > 4.0  # step 2 again did not reset


@pytest.mark.parametrize("ablation", ["full", "no_mining"])
def test_both_eq7_readings_are_logged_after_the_warmup(tmp_path, ablation):
    seen, _, _, _ = _run(tmp_path, ablation, steps=3, warmup=1)
    keys = {
        "mining/literal_pos_pairs",
        "mining/literal_neg_pairs",
        "mining/agreement_pos_pairs",
        "mining/agreement_neg_pairs",
    }
    assert not (keys & set(seen[0]))  # warm-up: no mining statistics
    assert keys <= set(seen[-1])
    last = seen[-1]
    assert last["mining/agreement_pos_pairs"] <= last["mining/literal_pos_pairs"]
    if last["mining/literal_pos_pairs"]:
        share = last["mining/agreement_pos_pairs"] / last["mining/literal_pos_pairs"]
        assert last["mining/literal_pos_same_cluster"] == pytest.approx(share)


def test_pair_precision_against_the_hidden_classes_is_logged_and_summed(tmp_path):
    """Pseudo labels equal to the hidden classes: every pseudo-positive pair is right; the pairs
    with the unknown (-1) image are left out; the run's totals add the steps up."""
    objective = []
    seen, _, _, _ = _run(
        tmp_path, "full", steps=3, warmup=1, truth=True, before_step=lambda s, net, fn: objective.append(fn)
    )
    assert not any(k.startswith("truth/") for k in seen[0])  # warm-up: nothing measured
    for scalars in seen[1:]:
        assert scalars["truth/pseudo_pos_precision"] == 1.0
        for name in ("literal_pos", "literal_neg", "agreement_pos", "agreement_neg"):
            if f"truth/{name}_precision" in scalars:
                assert 0.0 <= scalars[f"truth/{name}_precision"] <= 1.0
    # 4 clusters x 4 images: 48 ordered same-cluster pairs, 6 of them with the unknown image
    summary = objective[0].truth.summary()
    assert summary["pseudo_pos"] == {"precision": 1.0, "pairs": 2 * 42}
    assert summary["literal_pos"]["pairs"] > 0
