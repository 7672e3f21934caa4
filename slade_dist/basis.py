"""SLADE feature basis (student only): W_a, L_CE, basis similarity, L_SD with running Gaussians
and Eq. 7 pair mining, over the optimizer step's GLOBAL batch (`FeatureBasis`, `PairBlock`).

The method and our choices where the paper is silent (sd_grad, r's normalisation, L_SD's margin,
seeding) are docs/METHOD.md "Feature basis" and "Any world size". Every method that takes or makes
a PairBlock, and ce_loss, is collective when distributed: every rank calls it at the same step.
Tests: tests/unit/test_basis.py, tests/integration/test_world_invariance.py (1, 2 and 4 gloo ranks
on one global batch, one pseudo-class per rank included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .losses import no_autocast

__all__ = ["FeatureBasis", "PairBlock"]


@dataclass
class PairBlock:
    """This rank's unlabeled rows (anchors) against the global batch (candidates), in basis space."""

    sim: torch.Tensor  # (B_rank, B_global) s_ij = cos(W_a f_i, W_a f_j), fp32
    same: torch.Tensor  # (B_rank, B_global) same pseudo label
    valid: torch.Tensor  # (B_rank, B_global) j is not i itself


def global_counts(*masks: torch.Tensor) -> list[int]:
    """The number of True entries of each mask, summed over ranks (collective)."""
    local = torch.stack([m.sum() for m in masks]).to(torch.float64)
    return [int(v) for v in dist.all_reduce_sum(local).round().tolist()]


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
        """Normalized-softmax cross-entropy, logits = s * cos(W_a[c], f), averaged over the global
        labeled batch."""
        with no_autocast(feat):  # fp32 even under bf16 autocast: small matmul, sharp softmax
            logits = self.scale * F.normalize(feat.float(), dim=1) @ F.normalize(self.W_a.float(), dim=1).t()
            total = F.cross_entropy(logits, labels.long().view(-1).to(feat.device), reduction="sum")
            n = dist.all_reduce_sum(torch.tensor([float(feat.shape[0])], device=feat.device))
            return dist.sum_over_ranks(total / n[0])

    def project(self, feat: torch.Tensor) -> torch.Tensor:
        """r (B, C): cosines of f to each row of W_a (the vector L_CE scales by s), fp32 under autocast."""
        with no_autocast(feat):
            return F.normalize(feat.float(), dim=1) @ F.normalize(self.W_a.float(), dim=1).t()

    def pair_block(self, feat: torch.Tensor, pseudo_labels: torch.Tensor) -> PairBlock:
        """s_ij = cos(W_a f_i, W_a f_j) of this rank's rows i against every rank's rows j, with
        which pairs share a pseudo label and which pair is a row with itself."""
        if pseudo_labels.numel() != feat.shape[0]:
            raise ValueError(f"{pseudo_labels.numel()} pseudo labels for {feat.shape[0]} unlabeled rows")
        r = F.normalize(self.project(feat), dim=1)
        with no_autocast(feat):
            sim = r @ dist.gather_rows(r).t()
        pl = pseudo_labels.view(-1).to(feat.device)
        same = pl.view(-1, 1) == dist.all_gather_cat(pl).view(1, -1)
        valid = torch.ones_like(same)
        offset = dist.row_offset(feat.shape[0])
        valid[:, offset : offset + feat.shape[0]].fill_diagonal_(False)
        return PairBlock(sim, same, valid)

    # ----------------------------------------------------------------------------------- L_SD
    def _update(self, kind: str, s: torch.Tensor, s2: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6 for one Gaussian; returns (mu, var) carrying the batch gradient."""
        mu_buf, var_buf = getattr(self, f"mu_{kind}"), getattr(self, f"var_{kind}")
        seeded = getattr(self, f"seeded_{kind}")
        if n <= 0:  # no pair of this kind in the global batch: unchanged, a constant in L_SD
            return mu_buf.clone(), var_buf.clone()
        mu_b = s / n
        var_b = (s2 / n - mu_b * mu_b).clamp_min(0.0)  # the batch's population variance
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

    def sd_loss(self, block: PairBlock) -> tuple[torch.Tensor, dict[str, float]]:
        """Update G+/G- (Eq. 6) from the global batch's pseudo-positive/negative pairs and return
        L_SD and stats. Once per optimizer step."""
        pos, neg = block.same & block.valid, ~block.same & block.valid
        sp, sn = block.sim[pos], block.sim[neg]
        # fp32 sums added over ranks (differentiable): every rank updates mu/var identically
        tot = dist.sum_over_ranks(torch.stack([sp.sum(), (sp * sp).sum(), sn.sum(), (sn * sn).sum()]))
        # ordered pairs: each unordered one twice with the same s_ij, so the same mean and variance
        n_pos, n_neg = global_counts(pos, neg)
        self._last_counts = (n_pos // 2, n_neg // 2)  # reported as unordered pairs
        mu_p, var_p = self._update("pos", tot[0], tot[1], n_pos)
        mu_n, var_n = self._update("neg", tot[2], tot[3], n_neg)
        connected = 0.0 * tot.sum()  # the same graph on every rank, also when L_SD is a constant or 0
        if bool(self.seeded_pos) and bool(self.seeded_neg):
            loss = F.relu(mu_n - mu_p + self.margin) + self.lambda_sd * (var_p + var_n)
            return loss + connected, self.stats()
        return connected, self.stats()

    # ---------------------------------------------------------------------------------- mining
    def mining_on(self) -> bool:
        """Eq. 7 mines only once both Gaussians exist and mu+ > mu- (else the sets would overlap)."""
        return bool(self.seeded_pos) and bool(self.seeded_neg) and float(self.mu_pos) > float(self.mu_neg)

    @torch.no_grad()
    def mine_pairs(
        self, block: PairBlock, require_cluster_agreement: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7: positives s_ij >= mu+, negatives s_ij <= mu-, i != j, as (2, n) long tensors of
        (this rank's anchor index, global candidate index). The thresholds are the current buffers:
        called after this step's sd_loss, they include this batch. Empty while a Gaussian is
        unseeded or mu+ <= mu-. require_cluster_agreement also demands same / different pseudo
        label (the non-literal reading)."""
        pos, neg = self.literal_masks(block)
        if not self.mining_on():
            pos, neg = torch.zeros_like(pos), torch.zeros_like(neg)
        if require_cluster_agreement:
            pos &= block.same
            neg &= ~block.same
        n_pos, n_neg = global_counts(pos, neg)
        self._last_mined = (n_pos, n_neg)
        return pos.nonzero().t().contiguous(), neg.nonzero().t().contiguous()

    def literal_masks(self, block: PairBlock) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7 read literally: (s_ij >= mu+, s_ij <= mu-), i != j."""
        sim = block.sim.detach()
        return (sim >= self.mu_pos) & block.valid, (sim <= self.mu_neg) & block.valid

    @torch.no_grad()
    def mining_shares(self, block: PairBlock) -> dict[str, float]:
        """How the two Eq. 7 readings differ on this global batch, whichever one trains (the mining/*
        scalars of docs/METHOD.md "Feature basis"). Computed with the current thresholds also while
        mining is off (mu+ <= mu-); {} while a Gaussian is unseeded; a share is left out when its
        set is empty."""
        if not (bool(self.seeded_pos) and bool(self.seeded_neg)):
            return {}
        pos, neg = self.literal_masks(block)
        n_pos, n_neg, agree_pos, agree_neg = global_counts(pos, neg, pos & block.same, neg & ~block.same)
        out = {
            "literal_pos_pairs": float(n_pos),
            "literal_neg_pairs": float(n_neg),
            "agreement_pos_pairs": float(agree_pos),
            "agreement_neg_pairs": float(agree_neg),
        }
        if n_pos:
            out["literal_pos_same_cluster"] = agree_pos / n_pos
        if n_neg:
            out["literal_neg_diff_cluster"] = agree_neg / n_neg
        return out

    def stats(self) -> dict[str, float]:
        """Running Gaussians and the last call's global counts, for logging."""
        return {
            "mu_pos": float(self.mu_pos),
            "mu_neg": float(self.mu_neg),
            "var_pos": float(self.var_pos),
            "var_neg": float(self.var_neg),
            "n_pos_pairs": self._last_counts[0],
            "n_neg_pairs": self._last_counts[1],
            "n_pos_mined": self._last_mined[0],  # ordered pairs over all ranks: (i, j) and (j, i)
            "n_neg_mined": self._last_mined[1],
        }
