"""2 real gloo processes (one spawn, shared by the tests below):
- basis.FeatureBasis.sd_loss on each rank's part of a batch: mu/var identical on both ranks and
  equal to one process seeing the union of both ranks' pairs; the DDP-averaged W_a gradient equals
  that process's gradient, for both basis.sd_grad modes.
- losses.cross_rank_loss with 10 + 6 samples: the loss value and the DDP-averaged parameter
  gradients equal one process with all 16 samples (MS and contrastive).
"""

from __future__ import annotations

import pytest
import torch

from slade_dist import dist
from slade_dist.losses import ContrastiveLoss, MultiSimilarityLoss
from tests.integration import _basis_workers as workers

STEPS = 3
BETA = 0.9  # must match _basis_workers._basis_part


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multirank")
    dist.run_local_processes(workers.multirank_worker, 2, args=(str(out), STEPS))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _basis_reference(w_a: torch.Tensor, sd_grad: str):
    """Independent single-process computation over the union of per-rank pairs.

    r = cosines to W_a's rows; full: the value of Eq. 6 with the batch statistics' gradient."""
    w_a = w_a.clone().requires_grad_(True)
    state = {}
    out = []
    for step in range(STEPS):
        feats, pl = workers.basis_data(step)
        vals = {"pos": [], "neg": []}
        lo = 0
        for n in workers.SPLIT:  # pairs exist only within one rank's batch
            f = torch.nn.functional.normalize(feats[lo : lo + n], dim=1)
            r = torch.nn.functional.normalize(f @ torch.nn.functional.normalize(w_a, dim=1).t(), dim=1)
            sim, p = r @ r.t(), pl[lo : lo + n]
            iu = torch.triu_indices(n, n, 1)
            same = p[iu[0]] == p[iu[1]]
            s = sim[iu[0], iu[1]]
            vals["pos"].append(s[same])
            vals["neg"].append(s[~same])
            lo += n
        g = {}
        for kind in ("pos", "neg"):
            s = torch.cat(vals[kind])
            mu_b, var_b = s.mean(), (s * s).mean() - s.mean() ** 2
            mu, var = mu_b, var_b
            if kind in state:
                mu = (1 - BETA) * mu_b + BETA * state[kind][0]
                var = (1 - BETA) * var_b + BETA * state[kind][1]
            if sd_grad == "full":
                g[kind] = (mu_b + (mu - mu_b).detach(), var_b + (var - var_b).detach())
            else:
                g[kind] = (mu, var)
            state[kind] = (mu.detach(), var.detach())
        loss = torch.relu(g["neg"][0] - g["pos"][0] + 0.5) + (g["pos"][1] + g["neg"][1])
        (grad,) = torch.autograd.grad(loss, w_a)
        out.append(
            {
                "mu_pos": state["pos"][0].item(),
                "var_pos": state["pos"][1].item(),
                "mu_neg": state["neg"][0].item(),
                "var_neg": state["neg"][1].item(),
                "loss": loss.item(),
                "grad": grad,
            }
        )
    return out


@pytest.mark.parametrize("sd_grad", ["full", "damped"])
def test_two_ranks_hold_identical_gaussians_and_exact_gradient(rank_results, sd_grad):
    r0, r1 = (res["basis"][sd_grad] for res in rank_results)
    from slade_dist.basis import FeatureBasis

    torch.manual_seed(0)  # the workers' W_a init
    ref = _basis_reference(FeatureBasis(num_classes=5, dim=8).W_a.detach(), sd_grad)
    for step in range(STEPS):
        a, b, want = r0[step], r1[step], ref[step]
        for key, buf in a["buffers"].items():
            assert torch.equal(buf, b["buffers"][key]), (step, key)  # bit-identical on both ranks
        assert bool(a["buffers"]["seeded_pos"]) and bool(a["buffers"]["seeded_neg"])
        for key in ("mu_pos", "var_pos", "mu_neg", "var_neg"):
            assert abs(a["stats"][key] - want[key]) < 1e-5, (step, key)
        assert a["stats"]["n_pos_pairs"] == b["stats"]["n_pos_pairs"] > 0
        assert abs(a["loss"] - want["loss"]) < 1e-5 and a["loss"] == b["loss"]
        assert torch.allclose(a["grad"], want["grad"], atol=1e-5), step
        assert want["grad"].abs().sum() > 0


def test_cross_rank_loss_equals_one_big_batch(rank_results):
    x, y, model = workers.cross_rank_data()
    for name, fn in (("ms", MultiSimilarityLoss()), ("contrastive", ContrastiveLoss())):
        model.zero_grad()
        loss = fn(model(x), y)
        loss.backward()
        assert loss.item() > 0
        for res in rank_results:
            got = res["cross_rank"][name]
            assert got["loss"] == pytest.approx(loss.item(), abs=1e-9)
            for g_dist, p in zip(got["grads"], model.parameters()):
                assert torch.allclose(g_dist, p.grad, atol=1e-5), name
