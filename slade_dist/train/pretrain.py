"""Pretrain stage: SwAV (Caron et al., NeurIPS 2020) continued on labeled + unlabeled shards.

Owns `run(cfg, run_dir)` and the SwAV pieces:
- `SwAVNet`: the Embedder built from cfg.model (its backbone is what SwAV trains), a projection
  MLP (feature_dim -> feature_dim -> pretrain.proj_dim) and K = pretrain.prototypes prototype
  vectors; scores = <normalised projection, normalised prototype>. The prototypes are normalised
  in the forward (correct under every ZeRO stage, where the optimizer may hold its own fp32 copy)
  and, with ZeRO-0, also in place after each optimizer step as in the paper.
- `sinkhorn`: Sinkhorn-Knopp codes over the GLOBAL batch (row sums all-reduced across ranks),
  epsilon = pretrain.epsilon, pretrain.sinkhorn_iters iterations; columns sum to 1 (one unit of
  mass per image), rows to B/K (equal use of every prototype).
- `swav_loss`: swapped prediction, each view predicts the other's codes at temperature
  pretrain.temperature.
- The prototypes are frozen for the first pretrain.freeze_prototypes_steps optimizer steps (their
  lr group starts late), as in the paper.
- The image stream: every shard of data.train_shards + data.unlabeled_shards, resampled per
  rank, labels ignored, two independently augmented views per image; undecodable images are
  skipped and counted.
pretrain.steps == 0 exports the initial (model.pretrained_path) weights unchanged.
The export <run>/pretrain/final.pt is a plain Embedder file (backbone + head) the teacher loads.
Tests: tests/unit/test_pretrain.py.
"""

from __future__ import annotations

import dataclasses
import io
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from .. import dist
from ..config import Config, DataConfig, TrainConfig
from ..data.shards import shard_paths
from ..data.tars import TarSamples, image_bytes
from ..models import build_embedder, save_weights
from ..stages import RunLayout, stage_id
from .common import fit_summary, open_tb, stream_seed
from .engine import ParamGroup, Trainer
from .loop import MicroResult, fit, timed_next

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------ model
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, K) cosine scores against the prototypes."""
        z = F.normalize(self.projection(self.embedder.features(x)), dim=1)
        return z @ F.normalize(self.prototypes.weight, dim=1).t()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """SwAV codes for this rank's (B, K) scores, equipartitioned over the global batch.

    Returns (B, K) with rows summing to 1. Computed in fp32 whatever the input dtype.
    """
    s = scores.float() / epsilon
    # a per-image shift leaves the result unchanged (columns are renormalised) and avoids overflow
    Q = torch.exp(s - s.max(dim=1, keepdim=True).values).t()  # K x B
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
    return Q.t()


def swav_loss(
    scores1: torch.Tensor, scores2: torch.Tensor, temperature: float, epsilon: float, iters: int
) -> torch.Tensor:
    """Swapped prediction: view 1 predicts view 2's codes and vice versa (mean over images)."""
    q1 = sinkhorn(scores1.detach(), epsilon, iters)
    q2 = sinkhorn(scores2.detach(), epsilon, iters)
    logp1 = F.log_softmax(scores1.float() / temperature, dim=1)
    logp2 = F.log_softmax(scores2.float() / temperature, dim=1)
    return -0.5 * ((q2 * logp1).sum(dim=1).mean() + (q1 * logp2).sum(dim=1).mean())


# ------------------------------------------------------------------------------ data stream
def two_view_transform(data_cfg: DataConfig) -> Any:
    """One SwAV view: random resized crop, flip, colour jitter, grayscale, normalise."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(data_cfg.image_size, scale=(data_cfg.crop_scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def _two_view_batches(
    samples: Iterable[dict[str, Any]], *, data_cfg: DataConfig, batch_size: int, seed: int
) -> Iterator[dict[str, Any]]:
    """Decode, shuffle (buffer), make two views, batch. Undecodable samples are counted, not fatal."""
    rng = random.Random(seed)
    torch.manual_seed(seed)  # this process' augmentation randomness (worker-local under a loader)
    tf = two_view_transform(data_cfg)
    buf: list[Any] = []
    v1: list[torch.Tensor] = []
    v2: list[torch.Tensor] = []
    skipped = 0
    cap = max(data_cfg.shuffle_buffer, 1)
    for sample in samples:
        try:
            img = Image.open(io.BytesIO(image_bytes(sample))).convert("RGB")
        except Exception:  # no image member, corrupt, truncated, unknown format: skip and count
            skipped += 1
            continue
        buf.append(img)
        if len(buf) < cap:
            continue
        img = buf.pop(rng.randrange(len(buf)))
        v1.append(tf(img))
        v2.append(tf(img))
        if len(v1) == batch_size:
            yield {"view1": torch.stack(v1), "view2": torch.stack(v2), "skipped": skipped}
            v1, v2, skipped = [], [], 0


class _ResampledTars(torch.utils.data.IterableDataset):
    """Samples of shards drawn at random (with replacement) forever, read with data.tars.

    Paths are opened as local files by our own tar reader, never handed to webdataset's URL
    opener: a directory named like `pipe:cmd` is a directory, not a shell command.
    """

    def __init__(self, paths: list[Path], seed: int) -> None:
        self.paths, self.seed = paths, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}/{info.id if info else 0}")
        while True:
            yield from TarSamples(self.paths[rng.randrange(len(self.paths))])


class _TwoViewStream(torch.utils.data.IterableDataset):
    def __init__(self, paths: list[Path], data_cfg: DataConfig, batch_size: int, seed: int) -> None:
        self.tars, self.data_cfg, self.batch_size, self.seed = _ResampledTars(paths, seed), data_cfg, batch_size, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        seed = self.seed * 31 + (info.id if info else 0)
        return _two_view_batches(iter(self.tars), data_cfg=self.data_cfg, batch_size=self.batch_size, seed=seed)


def swav_batches(
    shard_dirs: list[str], data_cfg: DataConfig, batch_size: int, *, seed: int, rank: int, world: int
) -> Iterator[dict[str, Any]]:
    """Infinite stream of {"view1", "view2", "skipped"} over the shards of every dir (labels ignored)."""
    paths = [p for d in shard_dirs if d for p in shard_paths(d)]
    if not paths:
        raise FileNotFoundError(f"no shards for SwAV pretraining in {shard_dirs}")
    # resampled per rank: no per-rank split, so no uneven shard counts (a split with fewer shards than
    # ranks x workers raises or leaves ranks uneven, and an uneven rank hangs a collective)
    stream = _TwoViewStream(paths, data_cfg, batch_size, seed * 1009 + rank)
    if data_cfg.num_workers > 0:
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=data_cfg.num_workers,
            persistent_workers=True,
            prefetch_factor=2,
            pin_memory=torch.cuda.is_available(),
        )
        return iter(loader)
    return iter(stream)


# ------------------------------------------------------------------------------------ stage
def export_initial(cfg: Config, stage_dir: Path) -> dict[str, Any]:
    emb = build_embedder(cfg.model)
    if dist.is_main():
        save_weights(
            stage_dir / "final.pt",
            emb,
            cfg.model,
            extra={"stage": "pretrain", "step": 0, "init": cfg.model.pretrained_path},
        )
    dist.barrier()
    return {"steps": 0, "final_loss": None, "init": cfg.model.pretrained_path, "exported_initial": True}


def run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    stage_dir = RunLayout(run_dir).stage_dir("pretrain")
    stage_dir.mkdir(parents=True, exist_ok=True)
    pc = cfg.pretrain
    if pc.steps == 0:
        return export_initial(cfg, stage_dir)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    net = SwAVNet(build_embedder(cfg.model), pc.proj_dim, pc.prototypes)
    tcfg = _pretrain_train_cfg(cfg)
    groups = [
        ParamGroup("backbone", net.embedder.param_groups()["backbone"], pc.lr),
        ParamGroup("projection", list(net.projection.parameters()), pc.lr),
        ParamGroup(
            "prototypes", list(net.prototypes.parameters()), pc.lr, start=pc.freeze_prototypes_steps, weight_decay=0.0
        ),
    ]
    trainer = Trainer(
        net,
        groups,
        tcfg,
        stage_dir=stage_dir,
        total_steps=pc.steps,
        micro_batch=pc.batch_size,
        stage_id=stage_id(cfg, "pretrain"),
    )
    seed = stream_seed(cfg.run.seed, trainer.step, salt=7)
    stream = swav_batches(
        [cfg.data.train_shards, cfg.data.unlabeled_shards],
        cfg.data,
        pc.batch_size,
        seed=seed,
        rank=dist.rank(),
        world=dist.world_size(),
    )
    tb = open_tb(cfg, run_dir, "pretrain", None, trainer.step)
    dev = trainer.device

    def micro(step: int) -> MicroResult:
        batch, wait = timed_next(stream)
        x = torch.cat([batch["view1"], batch["view2"]]).to(dev, non_blocking=True)
        scores = trainer.forward(x)
        s1, s2 = scores.float().chunk(2)
        loss = swav_loss(s1, s2, pc.temperature, pc.epsilon, pc.sinkhorn_iters)
        return MicroResult(
            loss=loss,
            scalars={"loss/swav": float(loss.detach())},
            images=int(x.shape[0]) // 2,
            skipped=int(batch["skipped"]),
            wait_s=wait,
        )

    def after_step(step: int) -> dict[str, float]:
        if tcfg.zero_stage == 0:  # ZeRO-0: the parameter is the optimizer's master copy
            trainer.module.normalize_prototypes_()
        return {}

    resumed = dict(trainer.resume_info)
    result = fit(
        trainer,
        micro,
        tb=tb,
        state_fn=lambda: {"stream_seeds": {"swav_stream_seed": seed}},
        after_step=after_step,
        desc="pretrain (SwAV)",
    )
    tb.close()
    if dist.is_main():
        save_weights(
            stage_dir / "final.pt",
            trainer.module.embedder,
            cfg.model,
            extra={"stage": "pretrain", "step": trainer.step, "init": cfg.model.pretrained_path},
        )
    dist.barrier()
    return {**fit_summary(result, resumed), "init": cfg.model.pretrained_path}


def _pretrain_train_cfg(cfg: Config) -> TrainConfig:
    """train.* optimisation knobs with SwAV's own lr (pretrain.lr) and steps."""
    return dataclasses.replace(cfg.train, lr=cfg.pretrain.lr, backbone_lr_mult=1.0)
