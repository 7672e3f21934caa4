"""Pair-based ranking losses: multi-similarity (with its pair miner) and contrastive, plus the
cross-rank variant.

Owns: `MultiSimilarityLoss`, `ContrastiveLoss`, `build_loss(loss_cfg)`, and the cross-rank pieces
`gather_live` (the global batch, local rows live), `cross_rank_loss` (labels), `global_pair_loss`
(explicit pairs indexing the global batch).
Tests: tests/unit/test_losses.py (values and gradients against pytorch-metric-learning, explicit
pair lists, empty pair sets, the one-process cross-rank helpers); 2-rank gloo equality with one
big batch: tests/integration/test_basis_multirank.py (labels), test_global_batch.py (mined pairs).

Call convention (both losses):
    loss(emb, labels)                                   pairs derived from labels, a == b excluded
    loss(emb, pos_pairs=P, neg_pairs=N)                 explicit pairs, each a (2, n) long tensor
                                                        of (anchor index, other index)
    ... ref_emb=R, ref_labels=RL                        extra candidates (detached): indices >= B
                                                        in explicit pairs address R; with labels,
                                                        every (anchor, R row) pair is used.
Anchors are always the rows of `emb`. Embeddings are L2-normalised inside. A call with no pair at
all returns a zero loss connected to `emb` (backward works, gradients are 0).

Definitions (identical to pytorch-metric-learning 2.x defaults):
- MS: s = cosine similarity; per anchor i,
      l_i = 1/alpha * log(1 + sum_{p in P_i} exp(-alpha (s_ip - lam)))
          + 1/beta  * log(1 + sum_{n in N_i} exp( beta  (s_in - lam)))
  loss = mean over ALL anchors (anchors without pairs count as 0). With labels, the MS miner (on
  by default) first keeps only positives with s_ip - eps < max_n s_in and negatives with
  s_in + eps > min_p s_ip, per anchor (PML: loss(emb, labels, MultiSimilarityMiner()(emb, labels))).
  Explicit pair lists are used as given (they come from SLADE's own Eq. 7 mining, and an anchor
  holding only mined positives would otherwise lose them all); `mine_explicit=True` mines them too.
- Contrastive: d = L2 distance of normalised embeddings, pos terms relu(d - m_pos), neg terms
  relu(m_neg - d); loss = mean of the non-zero pos terms + mean of the non-zero neg terms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .config import LossConfig

__all__ = [
    "PairLoss",
    "MultiSimilarityLoss",
    "ContrastiveLoss",
    "build_loss",
    "cross_rank_loss",
    "gather_live",
    "global_pair_loss",
    "pair_masks",
]


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast) -> fp32; fp32/fp64 kept (fp64 for exact reference tests)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def no_autocast(t: torch.Tensor) -> torch.autocast:
    """Losses run in fp32 even inside bf16 autocast (exp(beta * s) with beta = 50 needs it)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _zero_loss(emb: torch.Tensor) -> torch.Tensor:
    """0 with a grad_fn reaching `emb` (so backward() and DDP's hooks still run)."""
    return (emb * 0.0).sum()


def pair_masks(
    n_anchor: int,
    n_cand: int,
    labels: torch.Tensor | None,
    cand_labels: torch.Tensor | None,
    pos_pairs: torch.Tensor | None,
    neg_pairs: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_anchor, n_cand) boolean masks of positive / negative pairs. Candidates 0..n_anchor-1
    are the anchors themselves (so the diagonal is the a == b pair, always excluded)."""
    eye = torch.zeros(n_anchor, n_cand, dtype=torch.bool, device=device)
    eye[:, :n_anchor].fill_diagonal_(True)
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
    """Shared plumbing: normalise, build the candidate set and the pair masks, call `_loss`."""

    def forward(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        pos_pairs: torch.Tensor | None = None,
        neg_pairs: torch.Tensor | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if emb.dim() != 2:
            raise ValueError(f"embeddings must be (B, D), got {tuple(emb.shape)}")
        emb_n = F.normalize(_as_float(emb), dim=1)
        cand = emb_n
        cand_labels = labels
        if ref_emb is not None:
            cand = torch.cat([emb_n, F.normalize(ref_emb.detach().to(emb_n.dtype), dim=1)])
            if labels is not None and pos_pairs is None and neg_pairs is None:
                if ref_labels is None:
                    raise ValueError("ref_emb with labels needs ref_labels")
                cand_labels = torch.cat([labels.view(-1), ref_labels.view(-1).to(labels.device)])
        if labels is not None and labels.numel() != emb.shape[0]:
            raise ValueError(f"{labels.numel()} labels for {emb.shape[0]} embeddings")
        pos, neg = pair_masks(emb.shape[0], cand.shape[0], labels, cand_labels, pos_pairs, neg_pairs, emb.device)
        if not (pos.any() or neg.any()):
            return _zero_loss(emb)
        explicit = pos_pairs is not None or neg_pairs is not None
        with no_autocast(emb):
            sim = emb_n @ cand.t()
            return self._loss(emb, sim, pos, neg, explicit)

    def _loss(
        self, emb: torch.Tensor, sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, explicit: bool
    ) -> torch.Tensor:
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

    def _loss(self, emb, sim, pos, neg, explicit):
        if self.mine and (self.mine_explicit or not explicit):
            pos, neg = self.mine_pairs(sim, pos, neg)
            if not (pos.any() or neg.any()):
                return _zero_loss(emb)
        pos_term = _masked_logsumexp1(-self.alpha * (sim - self.base), pos) / self.alpha
        neg_term = _masked_logsumexp1(self.beta * (sim - self.base), neg) / self.beta
        return (pos_term + neg_term).mean()


class ContrastiveLoss(PairLoss):
    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0) -> None:
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    @staticmethod
    def _nonzero_mean(terms: torch.Tensor) -> torch.Tensor | None:
        nz = terms[terms > 0]
        return nz.mean() if nz.numel() else None

    def _loss(self, emb, sim, pos, neg, explicit):
        # ||a - b||^2 = 2 - 2 cos for unit vectors; the sqrt is made safe at 0 (gradient 0 there,
        # the pair then contributes a zero term and is not counted by the non-zero average)
        sq = (2.0 - 2.0 * sim).clamp_min(0.0)
        positive = sq > 0
        d = torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))
        parts = [
            self._nonzero_mean(F.relu(d[pos] - self.pos_margin)),
            self._nonzero_mean(F.relu(self.neg_margin - d[neg])),
        ]
        parts = [p for p in parts if p is not None]
        if not parts:
            return _zero_loss(emb)
        return sum(parts[1:], parts[0])


def build_loss(loss_cfg: LossConfig) -> PairLoss:
    if loss_cfg.name == "ms":
        return MultiSimilarityLoss(loss_cfg.ms_alpha, loss_cfg.ms_beta, loss_cfg.ms_lambda, loss_cfg.ms_eps)
    if loss_cfg.name == "contrastive":
        return ContrastiveLoss(loss_cfg.pos_margin, loss_cfg.neg_margin)
    raise ValueError(f"unknown loss.name {loss_cfg.name!r}; choose ms or contrastive")


def gather_live(emb: torch.Tensor) -> torch.Tensor:
    """The global batch: every rank's `emb` concatenated in rank order (dist.all_gather_cat: no
    gradient through the remote rows), with this rank's own live `emb` put back at its slice, so
    the local rows keep their graph. Ranks may hold different numbers of rows. Collective: every
    rank must call it at the same step. One process: `emb` itself."""
    if dist.world_size() == 1:
        return emb
    sizes = [int(n) for n in dist.all_gather_cat(torch.tensor([emb.shape[0]], device=emb.device))]
    all_emb = dist.all_gather_cat(emb)
    start = sum(sizes[: dist.rank()])
    return torch.cat([all_emb[:start], emb, all_emb[start + emb.shape[0] :]])


def _grad_world_scaled(loss: torch.Tensor) -> torch.Tensor:
    """Value `loss`, gradient world_size * d loss (see cross_rank_loss); identity in one process."""
    world = dist.world_size()
    return loss if world == 1 else loss + (world - 1) * (loss - loss.detach())


def cross_rank_loss(loss_fn: PairLoss, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of the GLOBAL batch (all ranks' embeddings, rank order), computed on every rank.

    Every rank all-gathers embeddings and labels and puts its own live `emb` back at its slice
    (gather_live), so its local anchors see the whole global batch as candidates and the remote
    rows act as (detached) anchors too. The returned value is exactly the single-process loss of
    the concatenated batch, the same on all ranks. Gradient scaling (precise): the gradient w.r.t.
    the local `emb` is world_size * dL_global/d emb_local, so after DDP / DeepSpeed AVERAGE the
    parameter gradients over ranks, each parameter's gradient equals that of one process holding
    the full batch. (sum over ranks of dL/d emb_r * d emb_r/d theta = dL/d theta; averaging
    divides by W.) Cost: the (W*B) x (W*B) similarity matrix on every rank (fine for W*B up to
    ~10^4). Collective: every rank must call it at the same step. One process: plain
    loss_fn(emb, labels). Explicit pairs: global_pair_loss.
    """
    if dist.world_size() == 1:
        return loss_fn(emb, labels)
    glob = gather_live(emb)
    all_labels = dist.all_gather_cat(labels.view(-1).to(emb.device))
    return _grad_world_scaled(loss_fn(glob, all_labels))


def global_pair_loss(
    loss_fn: Callable[..., torch.Tensor], glob: torch.Tensor, pos_pairs: torch.Tensor, neg_pairs: torch.Tensor
) -> torch.Tensor:
    """cross_rank_loss with explicit pairs: loss_fn(glob, pos_pairs=..., neg_pairs=...) on the
    global batch `glob` = gather_live(emb), the pairs indexing ITS rows (e.g. mined on the global
    batch, identically on every rank). Same value on every rank (the single-process loss of the
    concatenated batch with these pairs) and the same world_size gradient scaling as
    cross_rank_loss, so averaged parameter gradients equal one process's. `glob` must come from
    gather_live (a rank-local batch would get its gradient scaled by world_size wrongly). With no
    pair the loss is a zero connected to the local rows. Not itself collective; one process:
    plain loss_fn(emb, pos_pairs=..., neg_pairs=...).
    """
    return _grad_world_scaled(loss_fn(glob, pos_pairs=pos_pairs, neg_pairs=neg_pairs))
