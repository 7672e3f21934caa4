"""The config's P x K is the batch of an optimizer step whatever the number of ranks
(slade_dist/train/batch_split.py): 2 real gloo processes, each with half of the same 64 images
(8 of the 16 classes), take one step of the teacher objective (DeepSpeed engine, the MS loss of
the global batch) whose parameter change equals 1 rank's on all 64 images, and plain autograd's
(an independent reference: torch autograd on the whole batch in one process). Every objective at
1, 2, 4 ranks and under grad_accum: tests/integration/test_world_invariance.py."""

from __future__ import annotations

import pytest
import torch

from slade_dist import dist
from slade_dist.config import load_config
from slade_dist.losses import build_loss
from slade_dist.models import build_embedder
from tests.integration import _global_batch_workers as W


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("global_batch")
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for world in (1, 2):
        dist.run_local_processes(W.step_worker, world, args=(str(out),), extra_env=env)
    return {w: torch.load(out / f"world{w}.pt") for w in (1, 2)}, out


def _autograd_reference(out) -> dict[str, torch.Tensor]:
    cfg = load_config(None, W.overrides(out / "ref"), check_paths=False)
    torch.manual_seed(0)
    emb = build_embedder(cfg.model).train()
    x, y = W.batch()
    build_loss(cfg.loss)(emb(x), y).backward()
    return {n: p.grad for n, p in emb.named_parameters() if p.grad is not None}


def test_two_ranks_step_like_one_on_the_same_64_images(steps):
    results, out = steps
    one, two = results[1], results[2]
    assert one["share"] == W.P and two["share"] == W.P // 2  # each rank drew half of the classes
    ref = _autograd_reference(out)
    assert set(ref) == {n for n, d in one["delta"].items() if d.abs().sum() > 0}
    for name, grad in ref.items():
        scale = grad.abs().max().item()
        assert scale > 0
        assert torch.allclose(one["delta"][name], grad, atol=1e-4 * scale), name
        assert torch.allclose(two["delta"][name], one["delta"][name], atol=1e-4 * scale), name
