"""SwAV's objective (Caron et al., NeurIPS 2020), as the pretrain stage (train/pretrain.py) uses it.

Owns `SwAVNet` (the Embedder, a projection MLP feature_dim -> feature_dim -> proj_dim and K
prototypes; multi-crop: each crop size through the backbone on its own, the projection over all),
`sinkhorn` (codes over the GLOBAL batch), `FeatureQueue`, `queue_length` and `swav_loss`
(swapped prediction over multi-crop views). Method and choices: docs/METHOD.md, stage 1.
Tests: tests/unit/test_swav.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist

# exp(x) of float64 is 0 below about -745: a shift below this floor would give an image no mass
# at all (a 0/0 in its column); entries this far below the global best are codes of ~1e-304 anyway
EXP_FLOOR = -700.0


class SwAVOut(NamedTuple):
    z: torch.Tensor  # (N, proj_dim) normalised projections of every crop, in input order
    scores: torch.Tensor  # (N, K) cosine scores against the prototypes
    queue_scores: torch.Tensor | None  # (views, L, K) scores of the queue's rows (no gradient), or None


class SwAVNet(nn.Module):
    def __init__(self, embedder: nn.Module, proj_dim: int, prototypes: int):
        super().__init__()
        self.embedder = embedder
        d = int(embedder.feature_dim)
        self.projection = nn.Sequential(
            nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim)
        )
        self.prototypes = nn.Linear(proj_dim, prototypes, bias=False)
        self.normalize_prototypes_()

    @torch.no_grad()
    def normalize_prototypes_(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def features(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pooled backbone features of every crop batch (one per crop size), concatenated in order."""
        return torch.cat([self.embedder.features(x) for x in crops])

    def head(self, feats: torch.Tensor, queue: torch.Tensor | None = None) -> SwAVOut:
        """Projection + prototype scores of `feats` (all crops of the step: the projection's
        BatchNorm sees them together, as SwAV's head does); `queue` (views, L, proj_dim) is scored
        too (inside the forward, so the prototypes are whole under ZeRO-3)."""
        z = F.normalize(self.projection(feats), dim=1)
        # normalised in the forward: correct under every ZeRO stage (the optimizer may hold its own
        # fp32 copy); only under ZeRO-0 does normalize_prototypes_ also fix them in place
        protos = F.normalize(self.prototypes.weight, dim=1)
        queue_scores = None
        if queue is not None:
            with torch.no_grad():
                queue_scores = queue.to(protos.dtype) @ protos.detach().t()
        return SwAVOut(z, z @ protos.t(), queue_scores)

    def forward(
        self, x: torch.Tensor | Sequence[torch.Tensor], queue: torch.Tensor | None = None, *, part: str = "all"
    ) -> torch.Tensor | SwAVOut:
        """part "all": one (B, 3, H, W) batch -> its (B, K) scores, or a list of crop batches ->
        SwAVOut over all of them in order. part "features": a list of crop batches -> features;
        part "head": features -> SwAVOut (the pretrain stage calls the two through the engine, so
        a step's head runs once on every micro-batch's features)."""
        if part == "features":
            return self.features(x)
        if part == "head":
            return self.head(x, queue)
        if torch.is_tensor(x):
            return self.head(self.embedder.features(x)).scores
        return self.head(self.features(x), queue)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """SwAV codes for this rank's (B, K) scores, equipartitioned over the global batch: (B, K)
    float32 with rows summing to 1 (computed in float64: B x K is small)."""
    s = scores.double() / epsilon
    # ONE shift for every image of every rank: it cancels in the first normalisation, so the codes
    # are SwAV's unshifted ones at any iteration count (a per-image shift is exact only at
    # convergence: docs/METHOD.md, stage 1)
    top = dist.all_gather_cat(s.max().reshape(1)).max()
    Q = torch.exp((s - top).clamp_min(EXP_FLOOR)).t()  # K x B
    K, B_local = Q.shape
    B = torch.tensor([float(B_local)], device=Q.device)
    dist.all_reduce_sum(B)
    total = Q.sum().reshape(1)
    dist.all_reduce_sum(total)
    Q /= total
    for _ in range(iters):
        rows = Q.sum(dim=1, keepdim=True)
        dist.all_reduce_sum(rows)
        Q /= rows
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B  # columns sum to 1: each image's code is a distribution over prototypes
    return Q.t().float()


class FeatureQueue:
    """This rank's last `length` projections of each of the `views` global crops (newest first).
    Not checkpointed: after a resume it refills, and until full the codes come from the batch."""

    def __init__(self, views: int, length: int, dim: int, device: torch.device | str = "cpu") -> None:
        if length < 1:
            raise ValueError(f"a feature queue needs length >= 1, got {length}")
        self.z = torch.zeros(views, length, dim, device=device)
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled >= self.z.shape[1]

    @torch.no_grad()
    def push(self, views: Sequence[torch.Tensor]) -> None:
        """Add this step's (B, dim) projections of each global crop; the oldest rows drop out."""
        new = torch.stack([v.detach().to(self.z) for v in views])[:, : self.z.shape[1]]
        self.z = torch.cat([new, self.z[:, : self.z.shape[1] - new.shape[1]]], dim=1)
        self.filled = min(self.z.shape[1], self.filled + new.shape[1])


def queue_length(configured: int, global_batch: int, world: int, prototypes: int) -> int:
    """Rows per rank of the feature queue: pretrain.queue_length's GLOBAL rows split over the ranks
    (each rank queues its own rows, so together they are the last global rows at any world size).
    Auto (-1): the smallest multiple of the global batch holding 2 x prototypes rows (SwAV: queue
    3,840 + batch 256 for 3,000 prototypes), none when the batch alone has as many rows as K."""
    if configured == 0 or (configured < 0 and global_batch >= prototypes):
        return 0
    rows = configured if configured > 0 else -(-2 * prototypes // global_batch) * global_batch
    return max(1, -(-rows // world))


def swav_loss(
    scores: Sequence[torch.Tensor],
    temperature: float,
    epsilon: float,
    iters: int,
    *,
    assign: int = 2,
    queue_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Swapped prediction over crops. `scores`: one (B, K) tensor per crop (this rank's rows of the
    step), the first `assign` are the global crops whose Sinkhorn codes are the targets; every crop
    predicts each of those codes but its own; the mean over the (crop, target) pairs and over the
    images of the GLOBAL batch (collective when distributed). queue_scores (assign, L, K): rows
    put in front of each global crop's Sinkhorn input (their codes are dropped)."""
    logp = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    total, pairs = scores[0].new_zeros((), dtype=torch.float32), 0
    for i in range(assign):
        s = scores[i].detach()
        if queue_scores is not None:
            s = torch.cat([queue_scores[i].to(s.dtype), s])
        q = sinkhorn(s, epsilon, iters)[-scores[i].shape[0] :]
        for v, lp in enumerate(logp):
            if v != i:
                total = total - (q * lp).sum()
                pairs += 1
    images = dist.all_reduce_sum(torch.tensor([float(scores[0].shape[0])], device=total.device))[0]
    return dist.sum_over_ranks(total / (pairs * images))
