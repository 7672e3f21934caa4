"""Worker for tests/integration/test_global_batch.py: one optimizer step of the teacher objective
(Trainer + losses.build_loss: the loss of the step's global batch) on this rank's share of a fixed
64-image batch.

Module level so dist.run_local_processes can spawn it; rank 0 writes the parameter change.
"""

from __future__ import annotations

from pathlib import Path

import torch

P, K, IMAGE = 16, 4, 32  # the config's global batch: 16 classes x 4 images


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The 64 images (grouped by class, as the P x K batcher gives them) and their labels."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(P).repeat_interleave(K)
    x = torch.randn(P * K, 3, IMAGE, IMAGE, generator=g) * 0.5 + (y.view(-1, 1, 1, 1).float() / P)
    return x, y


def overrides(stage_dir: Path) -> list[str]:
    """SGD at lr 1 without momentum, decay, clipping or warm-up: the step's change IS the gradient.
    Frozen BatchNorm: batch statistics would differ between a half batch and the whole one."""
    return [
        f"run.dir={stage_dir}",
        "model.backbone=tiny_cnn",
        "model.embed_dim=16",
        "model.freeze_bn=true",
        f"train.classes_per_batch={P}",
        f"train.samples_per_class={K}",
        "train.optimizer=sgd",
        "train.momentum=0.0",
        "train.weight_decay=0.0",
        "train.grad_clip=0.0",
        "train.warmup_steps=0",
        "train.lr=1.0",
        "train.backbone_lr_mult=1.0",
        "train.precision=fp32",
    ]


def step_worker(out_dir: str) -> None:
    from slade_dist import dist
    from slade_dist.config import load_config
    from slade_dist.losses import build_loss
    from slade_dist.models import build_embedder
    from slade_dist.train.batch_split import rank_share
    from slade_dist.train.common import embedder_groups
    from slade_dist.train.engine import Trainer

    torch.set_num_threads(1)
    dist.init_distributed(backend="gloo")
    world, r = dist.world_size(), dist.rank()
    cfg = load_config(None, overrides(Path(out_dir) / f"w{world}"), check_paths=False)
    share = rank_share(cfg.train.classes_per_batch, "train.classes_per_batch")
    x, y = batch()
    mine = slice(r * share * K, (r + 1) * share * K)  # this rank's classes of the step
    torch.manual_seed(0)
    emb = build_embedder(cfg.model)
    before = {n: p.detach().clone() for n, p in emb.named_parameters()}
    tr = Trainer(
        emb,
        embedder_groups(emb, cfg.train),
        cfg.train,
        stage_dir=Path(out_dir) / f"w{world}-r{r}",
        total_steps=1,
        micro_batch=share * K,
    )
    loss = build_loss(cfg.loss)(tr.forward(x[mine]).float(), y[mine])
    tr.backward(loss)
    tr.step_optimizer()
    if r == 0:
        delta = {n: before[n] - p.detach().cpu() for n, p in tr.module.named_parameters()}
        torch.save({"share": share, "loss": float(loss.detach()), "delta": delta}, Path(out_dir) / f"world{world}.pt")
    dist.barrier()
    dist.shutdown()
