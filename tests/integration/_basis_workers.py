"""Worker functions for the 2-process (gloo) tests of losses.cross_rank_loss and basis.FeatureBasis.

Module-level so dist.run_local_processes can spawn them. Each rank writes what it saw to
<out_dir>/rank<r>.pt; the tests compare those files with a single-process reference.
Used by: tests/integration/test_basis_multirank.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slade_dist import dist

# shared fixtures: the full batch, split unevenly over 2 ranks
SPLIT = (10, 6)


def cross_rank_data() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SPLIT), 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3] * 4)[torch.randperm(sum(SPLIT), generator=g)]
    torch.manual_seed(1)
    model = torch.nn.Linear(8, 6).double()
    return x, y, model


def basis_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One global batch of 2 ranks: features (SPLIT sum, 8) and pseudo labels."""
    g = torch.Generator().manual_seed(100 + step)
    feats = torch.randn(sum(SPLIT), 8, generator=g)
    pl = torch.randint(0, 4, (sum(SPLIT),), generator=g)
    return feats, pl


def _my_slice() -> slice:
    r = dist.rank()
    lo = sum(SPLIT[:r])
    return slice(lo, lo + SPLIT[r])


def _avg_grads(params) -> list[torch.Tensor]:
    """What DDP does: average parameter gradients over ranks."""
    out = []
    for p in params:
        g = p.grad.detach().clone()
        dist.all_reduce_sum(g)
        out.append(g / dist.world_size())
    return out


def _cross_rank_part() -> dict:
    from slade_dist.losses import ContrastiveLoss, MultiSimilarityLoss, cross_rank_loss

    x, y, model = cross_rank_data()
    sl = _my_slice()
    result = {}
    for name, fn in (("ms", MultiSimilarityLoss()), ("contrastive", ContrastiveLoss())):
        model.zero_grad()
        loss = cross_rank_loss(fn, model(x[sl]), y[sl])
        loss.backward()
        result[name] = {"loss": loss.item(), "grads": _avg_grads(model.parameters())}
    return result


def _basis_part(steps: int, sd_grad: str) -> list[dict]:
    from slade_dist.basis import FeatureBasis

    torch.manual_seed(0)  # identical W_a on both ranks, as after DDP's initial broadcast
    basis = FeatureBasis(num_classes=5, dim=8, beta=0.9, margin=0.5, lambda_sd=1.0, sd_grad=sd_grad)
    sl = _my_slice()
    history = []
    for step in range(steps):
        feats, pl = basis_data(step)
        basis.zero_grad()
        loss, stats = basis.sd_loss(basis.basis_similarity(feats[sl]), pl[sl])
        loss.backward()
        history.append(
            {
                "loss": loss.item(),
                "stats": stats,
                "buffers": {k: v.clone() for k, v in basis.state_dict().items() if k != "W_a"},
                "grad": _avg_grads([basis.W_a])[0],
            }
        )
    return history


def multirank_worker(out_dir: str, basis_steps: int) -> None:
    """One 2-process run checks both the cross-rank loss and the basis (one spawn: test time)."""
    dist.init_distributed(backend="gloo")
    result = {"cross_rank": _cross_rank_part(), "basis": {m: _basis_part(basis_steps, m) for m in ("full", "damped")}}
    torch.save(result, Path(out_dir) / f"rank{dist.rank()}.pt")
    dist.shutdown()
