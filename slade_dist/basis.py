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
  While either Gaussian is unseeded L_SD is a zero connected to `sim`.
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


class FeatureBasis(nn.Module):
    def __init__(
        self,
        num_classes: int,
        dim: int,
        scale: float = 16.0,
        beta: float = 0.99,
        margin: float = 0.5,
        lambda_sd: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 2 or dim < 1:
            raise ValueError(f"FeatureBasis needs num_classes >= 2 and dim >= 1, got {num_classes}, {dim}")
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
        """r = W_a f (B, C), in fp32 even under autocast."""
        with no_autocast(feat):
            return feat.float() @ self.W_a.float().t()

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
        return mu, var

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
        n = sim.shape[0]
        empty = torch.zeros(2, 0, dtype=torch.long, device=sim.device)
        mu_p, mu_n = float(self.mu_pos), float(self.mu_neg)
        if not (bool(self.seeded_pos) and bool(self.seeded_neg)) or mu_p <= mu_n:
            self._last_mined = (0, 0)
            return empty, empty.clone()
        off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
        pos = (sim >= mu_p) & off
        neg = (sim <= mu_n) & off
        if require_cluster_agreement:
            if pseudo_labels is None:
                raise ValueError("require_cluster_agreement needs pseudo_labels")
            pl = pseudo_labels.view(-1).to(sim.device)
            same = pl.view(-1, 1) == pl.view(1, -1)
            pos &= same
            neg &= ~same
        pos_pairs, neg_pairs = pos.nonzero().t().contiguous(), neg.nonzero().t().contiguous()
        self._last_mined = (pos_pairs.shape[1], neg_pairs.shape[1])
        return pos_pairs, neg_pairs

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
