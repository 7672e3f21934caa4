"""Worker for tests/integration/test_world_invariance.py: a few optimizer steps of the pretrain
(SwAV), teacher and student objectives on the REAL Trainer (DeepSpeed engine, gloo) and the real
step loop (train/loop.py: optimizer_step, the gradient cache when grad_accum > 1), fed fixed global
batches: rank r's micro-batch m of a step is its share of that step's global batch (rank-major,
then micro-batch), exactly as the P x K readers split a step (train/batch_split.py).

Module level so dist.run_local_processes can spawn it. Rank 0 writes, per objective and step, the
loss, the logged scalars and the parameters after the step; with SGD (no momentum, decay, clipping)
the first step's parameter change is the averaged gradient times the lr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

P, K = 4, 2  # the step's labeled P x K; the unlabeled one too (4 pseudo-classes: one per rank at 4 ranks)
STEPS = 4
SIZE = 16  # tiny_cnn's smallest input; SwAV's global crops are 2 x SIZE
SWAV_B, SWAV_LOCAL = 8, 2  # SwAV's global batch per step and local crops per image
LR = 0.05


def overrides(run_dir: Path, world: int, accum: int, freeze_bn: bool) -> list[str]:
    return [
        f"run.dir={run_dir}",
        "model.backbone=tiny_cnn",
        "model.embed_dim=8",
        f"model.freeze_bn={str(freeze_bn).lower()}",
        f"train.classes_per_batch={P}",
        f"train.samples_per_class={K}",
        f"student.unlabeled_classes_per_batch={P}",
        f"student.unlabeled_samples_per_class={K}",
        "student.basis_warmup_steps=1",
        "basis.beta=0.5",  # the Gaussians move visibly in a few steps
        "train.optimizer=sgd",
        "train.momentum=0.0",
        "train.weight_decay=0.0",
        "train.grad_clip=0.0",
        "train.warmup_steps=0",
        f"train.lr={LR}",
        "train.backbone_lr_mult=1.0",
        "train.precision=fp32",
        f"train.grad_accum={accum}",
        f"pretrain.batch_size={SWAV_B}",
        f"pretrain.local_crops={SWAV_LOCAL}",
        f"pretrain.local_crop_size={SIZE}",
        f"data.image_size={2 * SIZE}",
        "pretrain.prototypes=12",  # above the batch of 8: the auto queue (24 global rows) is used
        "pretrain.queue_start_step=0",
        "pretrain.freeze_prototypes_steps=0",
        f"pretrain.lr={LR}",
        "pretrain.backbone_lr_mult=1.0",
    ]


def _pk_images(step: int, salt: int, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's P x K images grouped by class (as the batcher gives them): a class colour + noise."""
    g = torch.Generator().manual_seed(1000 * salt + step)
    labels = torch.randperm(n_classes, generator=g)[:P].repeat_interleave(K)
    colour = torch.rand(n_classes, 3, 1, 1, generator=torch.Generator().manual_seed(salt))
    x = colour[labels] + 0.3 * torch.randn(P * K, 3, SIZE, SIZE, generator=g)
    return x, labels


def _share(t: torch.Tensor, part: int, parts: int) -> torch.Tensor:
    n = t.shape[0] // parts
    return t[part * n : (part + 1) * n]


def _part(world: int, accum: int, rank: int, micro: int) -> tuple[int, int]:
    return rank * accum + micro, world * accum


def _labeled_stream(world: int, accum: int, rank: int, salt: int, n_classes: int):
    step = 0
    while True:
        x, y = _pk_images(step, salt, n_classes)
        for m in range(accum):
            part, parts = _part(world, accum, rank, m)
            yield {"images": _share(x, part, parts), "labels": _share(y, part, parts), "skipped": 0}
        step += 1


def _swav_stream(world: int, accum: int, rank: int):
    step = 0
    while True:
        g = torch.Generator().manual_seed(5000 + step)
        v1 = torch.randn(SWAV_B, 3, 2 * SIZE, 2 * SIZE, generator=g)
        v2 = v1 + 0.1 * torch.randn(v1.shape, generator=g)
        local = v1[:, :, :SIZE, :SIZE].unsqueeze(0).repeat(SWAV_LOCAL, 1, 1, 1, 1)
        local = local + 0.1 * torch.randn(local.shape, generator=g)
        for m in range(accum):
            part, parts = _part(world, accum, rank, m)
            yield {
                "view1": _share(v1, part, parts),
                "view2": _share(v2, part, parts),
                "local": local[:, part * SWAV_B // parts : (part + 1) * SWAV_B // parts],
                "skipped": 0,
            }
        step += 1


def _run_steps(trainer: Any, objective: Any, after: Any = None) -> list[dict[str, Any]]:
    from slade_dist.train.loop import optimizer_step

    out = []
    for step in range(STEPS):
        micros = [objective.draw(step) for _ in range(trainer.tcfg.grad_accum)]
        loss, scalars = optimizer_step(trainer, objective, step, micros)
        if after is not None:
            after()
        params = torch.cat([p.detach().reshape(-1).cpu() for p in trainer.module.parameters()])
        out.append({"loss": loss, "scalars": dict(scalars), "params": params.clone()})
    return out


def world_worker(out_dir: str, accum: int, freeze_bn: bool) -> None:
    from slade_dist import dist
    from slade_dist.basis import FeatureBasis
    from slade_dist.config import load_config
    from slade_dist.losses import build_loss
    from slade_dist.models import build_embedder
    from slade_dist.tb import TBWriter
    from slade_dist.train.common import embedder_groups
    from slade_dist.train.engine import Trainer
    from slade_dist.train.pretrain import SwAVObjective, build_swav_net, swav_groups
    from slade_dist.train.student import StudentNet, StudentObjective, param_groups
    from slade_dist.train.teacher import TeacherObjective

    torch.set_num_threads(1)
    dist.init_distributed(backend="gloo")
    world, r = dist.world_size(), dist.rank()
    tag = f"w{world}-a{accum}-{'frozen' if freeze_bn else 'bn'}"
    cfg = load_config(None, overrides(Path(out_dir) / tag, world, accum, freeze_bn), check_paths=False)
    results: dict[str, Any] = {}

    def trainer(module, groups, tcfg, name):
        params = {"sync_bn": cfg.model.sync_bn, "micro_batch": P * K // (world * accum)}
        stage = Path(out_dir) / tag / f"{name}-r{r}"
        return Trainer(module, groups, tcfg, stage_dir=stage, total_steps=STEPS, **params)

    # SwAV: backbone per micro-batch, head + queue + Sinkhorn once per step
    torch.manual_seed(0)
    net, _ = build_swav_net(cfg)
    tr = trainer(net, swav_groups(net, cfg.pretrain), cfg.train, "pretrain")
    obj = SwAVObjective(cfg.pretrain, tr, _swav_stream(world, accum, r), TBWriter(None))
    results["pretrain"] = _run_steps(tr, obj, after=tr.module.normalize_prototypes_)

    # teacher: the ranking loss of the step's labeled batch
    torch.manual_seed(0)
    emb = build_embedder(cfg.model)
    tr = trainer(emb, embedder_groups(emb, cfg.train), cfg.train, "teacher")
    obj = TeacherObjective(tr, _labeled_stream(world, accum, r, 1, 6), build_loss(cfg.loss), TBWriter(None), K)
    results["teacher"] = _run_steps(tr, obj)

    # student: labeled + pseudo-labeled, W_a, L_CE, L_SD, Eq. 7 mining (warm-up 1 step)
    torch.manual_seed(0)
    emb = build_embedder(cfg.model)
    b = cfg.basis
    net = StudentNet(emb, FeatureBasis(6, emb.embed_dim, b.scale, b.beta, b.margin, b.lambda_sd, b.sd_grad))
    tr = trainer(net, param_groups(net, cfg), cfg.train, "student")
    lab, unl = _labeled_stream(world, accum, r, 1, 6), _labeled_stream(world, accum, r, 2, 6)
    obj = StudentObjective(cfg, tr, build_loss(cfg.loss), lab, unl)
    results["student"] = _run_steps(tr, obj)

    if r == 0:
        torch.save(results, Path(out_dir) / f"{tag}.pt")
    dist.barrier()
    dist.shutdown()
