"""Pair-based ranking losses of the step's GLOBAL batch: multi-similarity (with its pair miner) and
contrastive (`MultiSimilarityLoss`, `ContrastiveLoss`, `build_loss`, `pair_masks`).

    loss(emb, labels)                        pairs from labels, a == b excluded
    loss(emb, pos_pairs=P, neg_pairs=N)      explicit (2, n) long tensors of (anchor, candidate)
A rank's rows are its anchors (local index), every rank's rows in rank order the candidates
(global index; each rank holds its equal P x K share): the value is the single-process loss of the
concatenated batch on every rank (docs/METHOD.md "Any world size"). Collective when distributed.
Embeddings are L2-normalised inside; no pair at all gives a zero connected to `emb`.
Definitions equal pytorch-metric-learning 2.x defaults (MS: loss(emb, labels,
MultiSimilarityMiner()(emb, labels)); contrastive: mean of the non-zero pos terms + of the non-zero
neg terms). Explicit pair lists (SLADE's Eq. 7 mining) are not MS-mined unless `mine_explicit`: an
anchor holding only mined positives would lose them all.
Tests: tests/unit/test_losses.py (against pytorch-metric-learning), tests/integration/
test_world_invariance.py (1, 2 and 4 real gloo ranks against one process).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .config import LossConfig

__all__ = ["PairLoss", "MultiSimilarityLoss", "ContrastiveLoss", "build_loss", "pair_masks", "no_autocast"]


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast) -> fp32; fp32/fp64 kept (fp64 for exact reference tests)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def no_autocast(t: torch.Tensor) -> torch.autocast:
    """Losses run in fp32 even inside bf16 autocast (exp(beta * s) with beta = 50 needs it)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def pair_masks(
    n_anchor: int,
    n_cand: int,
    labels: torch.Tensor | None,
    cand_labels: torch.Tensor | None,
    pos_pairs: torch.Tensor | None,
    neg_pairs: torch.Tensor | None,
    device: torch.device,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_anchor, n_cand) boolean masks of positive / negative pairs. Anchor i is candidate
    offset + i (its own row in the global batch), so that a == b pair is always excluded."""
    eye = torch.zeros(n_anchor, n_cand, dtype=torch.bool, device=device)
    eye[:, offset : offset + n_anchor].fill_diagonal_(True)
    if pos_pairs is not None or neg_pairs is not None:
        masks = []
        for pairs in (pos_pairs, neg_pairs):
            m = torch.zeros(n_anchor, n_cand, dtype=torch.bool, device=device)
            if pairs is not None and pairs.numel():
                pairs = torch.as_tensor(pairs, device=device).long()
                if pairs.dim() != 2 or pairs.shape[0] != 2:
                    raise ValueError(f"pair lists must have shape (2, n) = (anchors, others), got {tuple(pairs.shape)}")
                if pairs[0].max() >= n_anchor or pairs[1].max() >= n_cand or pairs.min() < 0:
                    raise ValueError(f"pair index out of range: anchors < {n_anchor}, others < {n_cand}")
                m[pairs[0], pairs[1]] = True
            masks.append(m & ~eye)
        if (masks[0] & masks[1]).any():
            raise ValueError("a pair is listed both as positive and as negative")
        return masks[0], masks[1]
    if labels is None:
        raise ValueError("give either labels or explicit pos_pairs/neg_pairs")
    same = labels.view(-1, 1).to(device) == cand_labels.view(1, -1).to(device)
    return same & ~eye, ~same & ~eye


class PairLoss(nn.Module):
    """Shared plumbing: normalise, gather the candidates, build the pair masks, ask the loss for
    its per-rank partial sums and their normalisers, and add both over ranks."""

    def forward(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        pos_pairs: torch.Tensor | None = None,
        neg_pairs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if emb.dim() != 2:
            raise ValueError(f"embeddings must be (B, D), got {tuple(emb.shape)}")
        if labels is not None and labels.numel() != emb.shape[0]:
            raise ValueError(f"{labels.numel()} labels for {emb.shape[0]} embeddings")
        emb_n = F.normalize(_as_float(emb), dim=1)
        cand = dist.gather_rows(emb_n)
        cand_labels = None if labels is None else dist.all_gather_cat(labels.view(-1).to(emb.device))
        n = emb.shape[0]
        pos, neg = pair_masks(
            n, cand.shape[0], labels, cand_labels, pos_pairs, neg_pairs, emb.device, offset=dist.row_offset(n)
        )
        explicit = pos_pairs is not None or neg_pairs is not None
        with no_autocast(emb):
            sums, counts = self._partial(emb_n @ cand.t(), pos, neg, explicit)
            counts = dist.all_reduce_sum(counts.detach().clone())  # the global normalisers
            used = counts > 0
            if not bool(used.any()):  # the same decision on every rank: counts are global
                return (emb * 0.0).sum()  # a 0 reaching emb: backward() and DDP's hooks still run
            return dist.sum_over_ranks((sums[used] / counts[used]).sum())

    def _partial(
        self, sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, explicit: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, counts) of this rank's anchors: the loss is sum_t (sum_t over ranks) / (count_t
        over ranks), terms with a zero global count left out."""
        raise NotImplementedError


def _masked_logsumexp1(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_{mask} exp(x)) per row, 0 for rows with an empty mask (stable)."""
    x = x.masked_fill(~mask, float("-inf"))
    x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)  # the "+1" term
    return torch.logsumexp(x, dim=1)


class MultiSimilarityLoss(PairLoss):
    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        mine: bool = True,
        mine_explicit: bool = False,
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon
        self.mine, self.mine_explicit = mine, mine_explicit

    @torch.no_grad()
    def mine_pairs(self, sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MS pair mining: hard positives s_ip - eps < hardest negative, hard negatives
        s_in + eps > hardest positive, per anchor. Anchors lacking either kind keep nothing."""
        max_neg = sim.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
        min_pos = sim.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
        return pos & (sim - self.epsilon < max_neg), neg & (sim + self.epsilon > min_pos)

    def _partial(self, sim, pos, neg, explicit):
        if self.mine and (self.mine_explicit or not explicit):
            pos, neg = self.mine_pairs(sim, pos, neg)
        pos_term = _masked_logsumexp1(-self.alpha * (sim - self.base), pos) / self.alpha
        neg_term = _masked_logsumexp1(self.beta * (sim - self.base), neg) / self.beta
        # the mean over every anchor of the global batch (anchors without pairs count as 0)
        return (pos_term + neg_term).sum().reshape(1), sim.new_tensor([float(sim.shape[0])])


class ContrastiveLoss(PairLoss):
    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0) -> None:
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def _partial(self, sim, pos, neg, explicit):
        # ||a - b||^2 = 2 - 2 cos for unit vectors; the sqrt is made safe at 0 (gradient 0 there,
        # the pair then contributes a zero term and is not counted by the non-zero average)
        sq = (2.0 - 2.0 * sim).clamp_min(0.0)
        positive = sq > 0
        d = torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))
        terms = (F.relu(d[pos] - self.pos_margin), F.relu(self.neg_margin - d[neg]))
        sums = torch.stack([t.sum() for t in terms])
        counts = torch.stack([(t > 0).sum() for t in terms]).to(sim.dtype)
        return sums, counts


def build_loss(loss_cfg: LossConfig) -> PairLoss:
    if loss_cfg.name == "ms":
        return MultiSimilarityLoss(loss_cfg.ms_alpha, loss_cfg.ms_beta, loss_cfg.ms_lambda, loss_cfg.ms_eps)
    if loss_cfg.name == "contrastive":
        return ContrastiveLoss(loss_cfg.pos_margin, loss_cfg.neg_margin)
    raise ValueError(f"unknown loss.name {loss_cfg.name!r}; choose ms or contrastive")
