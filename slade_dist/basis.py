"""SLADE feature basis (student only): W_a, L_CE, basis similarity, L_SD with running Gaussians,
Eq. 7 pair mining.

Owns `FeatureBasis`. Method: docs/METHOD.md "Feature basis".
Tests: tests/unit/test_basis.py (planted clusters, Eq. 6 over several batches, mining, state dict)
and tests/integration/test_basis_multirank.py (2 gloo ranks hold identical mu/var).

Choices where the paper is silent (documented here, stable API):
- Pair statistics use each unordered pair i < j once (symmetric sim; ordered pairs would give the
  same mean/variance). Variance is the population variance E[s^2] - E[s]^2 of the batch.
- Statistics are computed in fp32 and summed over ranks: every rank contributes its local pairs'
  (sum s, sum s^2, count) for each kind; one all-reduce gives the global batch statistics, so
  every rank updates mu/var identically. Only the local part of the sums carries gradient, scaled
  by world_size so that after the DDP/DeepSpeed gradient AVERAGE over ranks each parameter's
  gradient equals a single process computing the same global statistics (same rule as
  losses.cross_rank_loss).
- Running update (Eq. 6): mu <- (1-beta) * mu_batch + beta * mu_prev (mu_prev a detached buffer),
  same for var; the first batch that has pairs of a kind seeds that Gaussian (mu = mu_batch); a
  batch without pairs of a kind leaves it untouched (and it then enters L_SD as a constant).
  While either Gaussian is unseeded L_SD is a zero connected to `sim`. `reset_gaussians` unseeds
  both (the student calls it when its basis warm-up ends).
- Gradient of L_SD (`sd_grad`): L_SD's VALUE always uses the running mu/var above. "damped"
  back-propagates through the update, so the batch statistics' gradient arrives scaled by
  1 - beta (0.01 at the paper's beta: |dL_SD/dW_a| ~1e-3 of L_CE's, L_SD then barely trains);
  "full" (default) gives it the batch statistics' own gradient, mu_used = mu_b + (mu - mu_b).detach(),
  i.e. the running Gaussians smooth the thresholds and the hinge, not the learning signal.
- r = normalize(W_a) normalize(f): the vector of cosines to the class bases that L_CE scores, so
  the basis similarity does not depend on how long W_a's rows have grown.
- L_SD = relu(mu_neg - mu_pos + margin) + lambda_sd * (var_pos + var_neg).
- Mining (Eq. 7) thresholds are the CURRENT buffers: call sd_loss first in a step and mining
  uses the Gaussians including this batch. Mined pairs come in both orderings (i, j) and (j, i);
  n_pos_mined / n_neg_mined count these ordered pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .losses import no_autocast

__all__ = ["FeatureBasis", "global_sum"]


def global_sum(local: torch.Tensor) -> torch.Tensor:
    """Sum of `local` over ranks. Value: the all-reduced sum. Gradient: world_size w.r.t. the
    local tensor (see module docstring), none through other ranks' parts. Identity in 1 process."""
    world = dist.world_size()
    if world == 1:
        return local
    total = dist.all_reduce_sum(local.detach().clone())
    return total + world * (local - local.detach())


def _same_label(pseudo_labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    pl = pseudo_labels.view(-1).to(device)
    return pl.view(-1, 1) == pl.view(1, -1)


class FeatureBasis(nn.Module):
    def __init__(
        self,
        num_classes: int,
        dim: int,
        scale: float = 16.0,
        beta: float = 0.99,
        margin: float = 0.5,
        lambda_sd: float = 1.0,
        sd_grad: str = "full",
    ) -> None:
        super().__init__()
        if num_classes < 2 or dim < 1:
            raise ValueError(f"FeatureBasis needs num_classes >= 2 and dim >= 1, got {num_classes}, {dim}")
        if not 0.0 <= beta < 1.0:  # beta = 1: the Gaussians would never leave their first batch
            raise ValueError(f"FeatureBasis needs 0 <= beta < 1, got {beta}")
        if sd_grad not in ("full", "damped"):
            raise ValueError(f"sd_grad must be 'full' or 'damped', got {sd_grad!r}")
        self.sd_grad = sd_grad
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.scale, self.beta, self.margin, self.lambda_sd = float(scale), float(beta), float(margin), float(lambda_sd)
        self.W_a = nn.Parameter(torch.randn(num_classes, dim) / dim**0.5)
        # running Gaussians G+ / G-: buffers so they live in state_dict / checkpoints
        for name in ("mu_pos", "mu_neg", "var_pos", "var_neg"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float32))
        self.register_buffer("seeded_pos", torch.zeros((), dtype=torch.bool))
        self.register_buffer("seeded_neg", torch.zeros((), dtype=torch.bool))
        self._last_mined = (0, 0)
        self._last_counts = (0, 0)

    # --------------------------------------------------------------------------- L_CE, similarity
    def ce_loss(self, feat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Normalized-softmax cross-entropy: logits = s * cos(W_a[c], f)."""
        with no_autocast(feat):  # fp32 even under bf16 autocast: small matmul, sharp softmax
            logits = self.scale * F.normalize(feat.float(), dim=1) @ F.normalize(self.W_a.float(), dim=1).t()
            return F.cross_entropy(logits, labels.long().view(-1).to(feat.device))

    def project(self, feat: torch.Tensor) -> torch.Tensor:
        """r (B, C): cosines of f to each row of W_a (the vector L_CE scales by s), fp32 under autocast."""
        with no_autocast(feat):
            return F.normalize(feat.float(), dim=1) @ F.normalize(self.W_a.float(), dim=1).t()

    def basis_similarity(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, B) cos(W_a f_i, W_a f_j)."""
        r = F.normalize(self.project(feat), dim=1)
        with no_autocast(feat):
            return r @ r.t()

    # ----------------------------------------------------------------------------------- L_SD
    @staticmethod
    def _pair_masks(n: int, pseudo_labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pl = pseudo_labels.view(-1).to(device)
        if pl.numel() != n:
            raise ValueError(f"{pl.numel()} pseudo labels for a {n}x{n} similarity matrix")
        upper = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
        same = pl.view(-1, 1) == pl.view(1, -1)
        return same & upper, ~same & upper

    def _update(
        self, kind: str, s: torch.Tensor, s2: torch.Tensor, n: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6 for one Gaussian; returns (mu, var) carrying the batch gradient."""
        mu_buf, var_buf = getattr(self, f"mu_{kind}"), getattr(self, f"var_{kind}")
        seeded = getattr(self, f"seeded_{kind}")
        if float(n) <= 0:  # no pair of this kind in the (global) batch: skip the update
            return mu_buf.clone(), var_buf.clone()
        mu_b = s / n
        var_b = (s2 / n - mu_b * mu_b).clamp_min(0.0)
        if bool(seeded):
            mu = (1.0 - self.beta) * mu_b + self.beta * mu_buf
            var = (1.0 - self.beta) * var_b + self.beta * var_buf
        else:
            mu, var = mu_b, var_b
        with torch.no_grad():
            mu_buf.copy_(mu.detach())
            var_buf.copy_(var.detach())
            seeded.fill_(True)
        if self.sd_grad == "full":  # value: the running statistic; gradient: the batch statistic's own
            return mu_b + (mu - mu_b).detach(), var_b + (var - var_b).detach()
        return mu, var

    @torch.no_grad()
    def reset_gaussians(self) -> None:
        """Forget G+ / G-: the next batch with pairs of a kind seeds it again."""
        for name in ("mu_pos", "mu_neg", "var_pos", "var_neg"):
            getattr(self, name).zero_()
        self.seeded_pos.fill_(False)
        self.seeded_neg.fill_(False)

    def sd_loss(self, sim: torch.Tensor, pseudo_labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Update G+/G- from this batch's pseudo-positive/negative pairs and return L_SD and stats.

        Collective when distributed (one all-reduce): every rank must call it each step."""
        sim = sim.float()
        pos, neg = self._pair_masks(sim.shape[0], pseudo_labels, sim.device)
        sp, sn = sim[pos], sim[neg]
        local = torch.stack([sp.sum(), (sp * sp).sum(), sn.sum(), (sn * sn).sum()])
        counts = torch.tensor([float(sp.numel()), float(sn.numel())], device=sim.device)
        tot = global_sum(local)
        counts = dist.all_reduce_sum(counts)
        self._last_counts = (int(counts[0]), int(counts[1]))
        mu_p, var_p = self._update("pos", tot[0], tot[1], counts[0])
        mu_n, var_n = self._update("neg", tot[2], tot[3], counts[1])
        if bool(self.seeded_pos) and bool(self.seeded_neg):
            loss = F.relu(mu_n - mu_p + self.margin) + self.lambda_sd * (var_p + var_n)
            loss = loss + 0.0 * sim.sum()  # keep the graph connected even when both are constants
        else:
            loss = (sim * 0.0).sum()
        return loss, self.stats()

    # ---------------------------------------------------------------------------------- mining
    @torch.no_grad()
    def mine_pairs(
        self, sim: torch.Tensor, pseudo_labels: torch.Tensor | None = None, require_cluster_agreement: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7: positives s_ij >= mu+, negatives s_ij <= mu-, i != j, both orderings, as (2, n)
        long tensors of (anchor, other) indices into the batch. Empty while a Gaussian is
        unseeded or mu+ <= mu-. require_cluster_agreement also demands same / different
        pseudo label (the non-literal reading)."""
        empty = torch.zeros(2, 0, dtype=torch.long, device=sim.device)
        mu_p, mu_n = float(self.mu_pos), float(self.mu_neg)
        if not (bool(self.seeded_pos) and bool(self.seeded_neg)) or mu_p <= mu_n:
            self._last_mined = (0, 0)
            return empty, empty.clone()
        pos, neg = self._literal_masks(sim)
        if require_cluster_agreement:
            if pseudo_labels is None:
                raise ValueError("require_cluster_agreement needs pseudo_labels")
            same = _same_label(pseudo_labels, sim.device)
            pos &= same
            neg &= ~same
        pos_pairs, neg_pairs = pos.nonzero().t().contiguous(), neg.nonzero().t().contiguous()
        self._last_mined = (pos_pairs.shape[1], neg_pairs.shape[1])
        return pos_pairs, neg_pairs

    def _literal_masks(self, sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7 read literally: (s_ij >= mu+, s_ij <= mu-), i != j."""
        off = ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        return (sim >= self.mu_pos) & off, (sim <= self.mu_neg) & off

    @torch.no_grad()
    def mining_shares(self, sim: torch.Tensor, pseudo_labels: torch.Tensor) -> dict[str, float]:
        """How the two Eq. 7 readings differ on this `sim`, whichever one trains (for logging).

        literal_*_pairs: ordered pairs passing the thresholds alone; agreement_*_pairs: those whose
        cluster ids also agree (same for positives, different for negatives), i.e. what
        require_cluster_agreement keeps; literal_pos_same_cluster / literal_neg_diff_cluster: the
        share of the literal reading's pairs the cluster ids agree with (1 by construction for the
        agreement reading). Computed with the current thresholds also while mining is off (mu+ <=
        mu-); {} while a Gaussian is unseeded; a share is left out when its set is empty."""
        if not (bool(self.seeded_pos) and bool(self.seeded_neg)):
            return {}
        pos, neg = self._literal_masks(sim)
        same = _same_label(pseudo_labels, sim.device)
        counts = {
            "literal_pos_pairs": int(pos.sum()),
            "literal_neg_pairs": int(neg.sum()),
            "agreement_pos_pairs": int((pos & same).sum()),
            "agreement_neg_pairs": int((neg & ~same).sum()),
        }
        out = {k: float(v) for k, v in counts.items()}
        if counts["literal_pos_pairs"]:
            out["literal_pos_same_cluster"] = counts["agreement_pos_pairs"] / counts["literal_pos_pairs"]
        if counts["literal_neg_pairs"]:
            out["literal_neg_diff_cluster"] = counts["agreement_neg_pairs"] / counts["literal_neg_pairs"]
        return out

    def stats(self) -> dict[str, float]:
        """Running Gaussians and the last call's counts, for logging."""
        return {
            "mu_pos": float(self.mu_pos),
            "mu_neg": float(self.mu_neg),
            "var_pos": float(self.var_pos),
            "var_neg": float(self.var_neg),
            "n_pos_pairs": self._last_counts[0],
            "n_neg_pairs": self._last_counts[1],
            "n_pos_mined": self._last_mined[0],
            "n_neg_mined": self._last_mined[1],
        }
