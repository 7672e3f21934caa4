"""BatchNorm over the step's global batch when several ranks train (model.sync_bn).

Owns `sync_batchnorm(module)`: every BatchNorm layer that trains (frozen BatchNorm,
model.freeze_bn, is left alone) becomes one that normalises with every rank's rows:
torch.nn.SyncBatchNorm on CUDA, `GlobalBatchNorm` on CPU (where torch's refuses to run); per-rank
BatchNorm would normalise (P x K) / world images. The layers keep their state-dict names, so
checkpoints load either way. Also `bn_trains`, for the refusal under train.grad_accum > 1.
Tests: tests/unit/test_sync_bn.py (one process equals nn.BatchNorm), tests/integration/
test_world_invariance.py (1, 2, 4 ranks give one process's outputs, running stats and gradients).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import dist

__all__ = ["GlobalBatchNorm", "sync_batchnorm", "bn_trains"]


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose batch statistics are those of all ranks' rows (two differentiable
    all-reduces: the mean, then the centred second moment, which is more precise than E[x^2] -
    E[x]^2 in fp32). In eval mode, or in one process, it is plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = dist.all_reduce_sum(torch.tensor([float(xf.numel() // xf.shape[1])], device=x.device))[0]
        mean = dist.sum_over_ranks(xf.sum(dims)) / count
        centred = xf - mean.view(shape)
        var = dist.sum_over_ranks((centred * centred).sum(dims)) / count
        self._update_running(mean.detach(), var.detach(), float(count))
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / max(count - 1.0, 1.0)  # as nn.BatchNorm: running_var is unbiased
        self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))


def bn_trains(module: nn.Module) -> bool:
    """Whether `module` (in train mode) has a BatchNorm layer that uses batch statistics."""
    return any(isinstance(m, _BatchNorm) and m.training for m in module.modules())


def _replacement(bn: _BatchNorm, use_cuda: bool) -> _BatchNorm:
    cls: Any = nn.SyncBatchNorm if use_cuda else GlobalBatchNorm
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:  # the same Parameter objects: optimizer groups built before the swap stay valid
        new.weight, new.bias = bn.weight, bn.bias
    for name, buf in bn.named_buffers(recurse=False):
        setattr(new, name, buf)
    return new.train(bn.training)


def sync_batchnorm(module: nn.Module, use_cuda: bool | None = None) -> int:
    """Replace, in place, every BatchNorm layer of `module` that trains by a global-batch one
    (SyncBatchNorm on CUDA, GlobalBatchNorm on CPU). Call it with the module in train mode.
    Returns how many layers were replaced."""
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    replaced = 0
    for name, child in list(module.named_children()):
        done = isinstance(child, (GlobalBatchNorm, nn.SyncBatchNorm))
        if isinstance(child, _BatchNorm) and child.training and not done:
            setattr(module, name, _replacement(child, use_cuda))
            replaced += 1
        else:
            replaced += sync_batchnorm(child, use_cuda)
    return replaced
