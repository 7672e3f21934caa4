"""Pretrain stage: SwAV (Caron et al., NeurIPS 2020) continued on labeled + unlabeled shards.

Owns `run(cfg, run_dir)` around SwAV's objective (train/swav.py) and the multi-crop stream
(data/multicrop.py): the SwAV net with a SwAV checkpoint's heads, the step objective (backbone per
micro-batch; head, prototypes, queue and codes once per step over all ranks), the lr groups and
the hand-on of the better of input and output weights (pretrain.keep_better). The method and its
choices: docs/METHOD.md, stage 1. The export <run>/pretrain/final.pt is a plain Embedder file.
Tests: tests/unit/test_pretrain.py, tests/unit/test_swav.py.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import dist
from ..config import Config, PretrainConfig, swav_backbone_lr_mult
from ..data.curation import test_copies
from ..data.multicrop import swav_batches
from ..data.readers import finite_batches
from ..data.shards import shard_paths
from ..models import build_embedder, embed_batches, load_state_dict_checked, read_checkpoint, save_weights
from ..models.retrieval import knn_map_at_r
from ..stages import RunLayout, stage_id
from .batch_split import rank_share
from .common import check_trunk_bn, export_final, fit_summary, open_tb, stream_seed
from .engine import ParamGroup, Trainer
from .loop import Micro, StepObjective, fit, timed_next
from .swav import FeatureQueue, SwAVNet, queue_length, swav_loss


# ------------------------------------------------------------------------------------ stage
def run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    stage_dir = RunLayout(run_dir).stage_dir("pretrain")
    stage_dir.mkdir(parents=True, exist_ok=True)
    if cfg.pretrain.steps == 0:  # no SwAV: the initial (model.pretrained_path) weights, unchanged
        extra = {"stage": "pretrain", "step": 0, "init": cfg.model.pretrained_path}
        export_final(stage_dir, build_embedder(cfg.model), cfg.model, extra)
        return {"steps": 0, "final_loss": None, "init": cfg.model.pretrained_path, "exported_initial": True}
    lr_mult, why = swav_backbone_lr_mult(cfg)
    dist.get_logger().info(f"pretrain: backbone lr = pretrain.lr x {lr_mult} ({why})")
    pc = dataclasses.replace(cfg.pretrain, backbone_lr_mult=lr_mult)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    net, heads_loaded = build_swav_net(cfg)
    check_trunk_bn(net.embedder, cfg)
    # the input weights, to compare with the output before handing one on (rank 0 decides)
    initial = copy.deepcopy(net.embedder) if pc.keep_better and dist.is_main() else None
    # pretrain.batch_size is the whole optimizer step's: this rank takes its share per micro-batch
    share = rank_share(pc.batch_size, "pretrain.batch_size", cfg.train.grad_accum)
    trainer = Trainer(
        net,
        swav_groups(net, pc),
        cfg.train,  # the optimisation knobs; SwAV's own lr is in its groups
        stage_dir=stage_dir,
        total_steps=pc.steps,
        micro_batch=share,
        stage_id=stage_id(cfg, "pretrain"),
        sync_bn=cfg.model.sync_bn,
    )
    seed = stream_seed(cfg.run.seed, trainer.step, salt=7)
    leave_out = _test_copies(cfg)
    stream = swav_batches(
        [cfg.data.train_shards, cfg.data.unlabeled_shards],
        cfg.data,
        share,
        seed=seed,
        rank=dist.rank(),
        world=dist.world_size(),
        augment=pc.augment,
        pretrain_cfg=pc,
        leave_out=leave_out,
    )
    tb = open_tb(cfg, run_dir, "pretrain", None, trainer.step)
    objective = SwAVObjective(pc, trainer, stream, tb)

    def after_step(step: int) -> dict[str, float]:
        if cfg.train.zero_stage == 0:  # ZeRO-0: the parameter is the optimizer's master copy
            trainer.module.normalize_prototypes_()
        return {}

    resumed = dict(trainer.resume_info)
    result = fit(
        trainer,
        objective,
        tb=tb,
        state_fn=lambda: {"stream_seeds": {"swav_stream_seed": seed}},
        after_step=after_step,
        desc="pretrain (SwAV)",
    )
    tb.close()
    knn: dict[str, Any] = {}
    if dist.is_main():
        out, knn = _better_of(cfg, trainer.module.embedder, initial, trainer.device, result.seconds)
        save_weights(
            stage_dir / "final.pt",
            out,
            cfg.model,
            extra={"stage": "pretrain", "step": trainer.step, "init": cfg.model.pretrained_path, "knn": knn},
        )
    knn = dist.broadcast_object(knn)
    dist.barrier()
    left_out = {"test_copies_left_out": sum(map(len, leave_out.values()))} if cfg.curate.enabled else {}
    summary = {**fit_summary(result, resumed), "init": cfg.model.pretrained_path, "heads_from_init": heads_loaded}
    return {**summary, **left_out, **knn}


def _test_copies(cfg: Config) -> dict[Path, frozenset[int]]:
    """The pool's copies of test images (the curate stage's decisions, curate.enabled): SwAV never
    sees them, so no stage trains on a test image. Near-duplicates stay: SSL only sees them more often."""
    if not cfg.curate.enabled:
        return {}
    copies = test_copies(RunLayout(cfg.run.dir).stage_dir("curate"), shard_paths(cfg.data.unlabeled_shards))
    dist.get_logger().info(f"pretrain: {sum(map(len, copies.values()))} pool images that copy a test image left out")
    return copies


class SwAVObjective(StepObjective):
    """SwAV over the optimizer step: the trunk is the backbone on one micro-batch's crops (global
    and local sizes); the loss runs the projection head, the prototypes, the queue and the
    Sinkhorn codes once on every micro-batch's features of every rank."""

    def __init__(self, pc: PretrainConfig, trainer: Trainer, stream: Iterator[dict[str, Any]], tb: Any) -> None:
        self.pc, self.trainer, self.stream, self.tb = pc, trainer, stream, tb
        world = dist.world_size()
        rows = queue_length(pc.queue_length, pc.batch_size, world, _k(trainer))
        proj_dim = trainer.module.prototypes.weight.shape[1]
        self.queue = FeatureQueue(2, rows, proj_dim, trainer.device) if rows else None
        self.queue_start = pc.freeze_prototypes_steps if pc.queue_start_step is None else pc.queue_start_step
        if self.queue is not None:
            dist.get_logger().info(
                f"pretrain: feature queue of {rows} rows per rank x {world} ranks (global batch "
                f"{pc.batch_size} < {_k(trainer)} prototypes), used from step {self.queue_start}"
            )

    def draw(self, step: int) -> Micro:
        batch, wait = timed_next(self.stream)
        n = min(8, len(batch["view1"]))  # row 1: the first views, row 2: the second views of the same images
        self.tb.images("batch/two_views", torch.cat([batch["view1"][:n], batch["view2"][:n]]), step, nrow=n, once=True)
        dev = self.trainer.device
        crops = [torch.cat([batch["view1"], batch["view2"]]).to(dev, non_blocking=True)]
        if "local" in batch:  # (V, B, 3, s, s) -> V x B rows, view-major
            crops.append(batch["local"].flatten(0, 1).to(dev, non_blocking=True))
        B = len(batch["view1"])
        return Micro(x=crops, data={"B": B}, images=B, skipped=int(batch["skipped"]), wait_s=wait)

    def trunk(self, x: Any) -> torch.Tensor:
        return self.trainer.forward(x, part="features")

    def loss(self, step: int, outs: list[torch.Tensor], micros: list[Micro]) -> tuple[torch.Tensor, dict[str, float]]:
        views = _views_of_step(outs, [m.data["B"] for m in micros])
        B = views[0].shape[0]
        use_queue = self.queue is not None and self.queue.full and step >= self.queue_start
        out = self.trainer.forward(torch.cat(views), self.queue.z if use_queue else None, part="head")
        pc = self.pc
        scores = list(out.scores.float().split(B))
        loss = swav_loss(scores, pc.temperature, pc.epsilon, pc.sinkhorn_iters, queue_scores=out.queue_scores)
        if self.queue is not None:
            self.queue.push(out.z[: 2 * B].split(B))
        return loss, {"loss/swav": float(loss.detach()), "swav/queue_used": float(use_queue)}


def _views_of_step(outs: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    """Each micro-batch's trunk output holds its views in order (view 1, view 2, then the local
    views, B rows each); the step's view v is view v of every micro-batch, concatenated."""
    per_micro = [out.split(b) for out, b in zip(outs, sizes)]
    return [torch.cat(parts) for parts in zip(*per_micro, strict=True)]


def _k(trainer: Trainer) -> int:
    return int(trainer.module.prototypes.weight.shape[0])


def swav_groups(net: SwAVNet, pc: PretrainConfig) -> list[ParamGroup]:
    """backbone at lr x backbone_lr_mult from freeze_backbone_steps on (a pretrained trunk is not
    shaken by a random head's first gradients), projection at lr, prototypes from
    freeze_prototypes_steps (SwAV's freeze)."""
    return [
        ParamGroup(
            "backbone", net.embedder.param_groups()["backbone"], pc.lr * pc.backbone_lr_mult, pc.freeze_backbone_steps
        ),
        ParamGroup("projection", list(net.projection.parameters()), pc.lr),
        ParamGroup(
            "prototypes", list(net.prototypes.parameters()), pc.lr, start=pc.freeze_prototypes_steps, weight_decay=0.0
        ),
    ]


# ------------------------------------------------------------------ init heads, hand-on choice
def swav_head_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The projection head and prototypes a SwAV checkpoint carries, under SwAVNet's names.

    Official SwAV files name them `projection_head.{0,1,3}.*` (Linear, BatchNorm1d, ReLU, Linear:
    our `projection` layout) and `prototypes.weight`, all possibly under `module.` and/or a
    "state_dict" entry. Empty when the file has neither (a torchvision or our own weights file)."""
    obj = read_checkpoint(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    sd = {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}
    heads = {
        "projection." + k.removeprefix("projection_head."): v for k, v in sd.items() if k.startswith("projection_head.")
    }
    if "prototypes.weight" in sd:
        heads["prototypes.weight"] = sd["prototypes.weight"]
    return heads


def build_swav_net(cfg: Config) -> tuple[SwAVNet, bool]:
    """SwAVNet on cfg.model's embedder; with model.pretrained_path's SwAV heads when it has them
    (prototype count and width then come from the file). Returns (net, heads loaded)."""
    pc = cfg.pretrain
    heads = swav_head_state(cfg.model.pretrained_path) if cfg.model.pretrained_path else {}
    protos = heads.get("prototypes.weight")
    k, proj_dim = (protos.shape[0], protos.shape[1]) if protos is not None else (pc.prototypes, pc.proj_dim)
    net = SwAVNet(build_embedder(cfg.model), int(proj_dim), int(k))
    if not heads:
        return net, False
    what = f"SwAV heads of {cfg.model.pretrained_path!r}"
    for name, module in (("projection", net.projection), ("prototypes", net.prototypes)):
        part = {key[len(name) + 1 :]: v for key, v in heads.items() if key.startswith(name + ".")}
        if part:
            load_state_dict_checked(module, part, what=f"{what} ({name})")
    net.normalize_prototypes_()
    dist.get_logger().info(
        f"pretrain: projection head / {k} prototypes of width {proj_dim} loaded from {cfg.model.pretrained_path}"
        + (f" (pretrain.prototypes={pc.prototypes} is not used)" if protos is not None and k != pc.prototypes else "")
    )
    return net, True


class _PooledFeatures(nn.Module):
    """The embedder's pooled backbone features: what SwAV trains (the embedding head is untouched
    here and random until the teacher trains it, so it would only blur the comparison)."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedder.features(x)


def labeled_knn_map_at_r(cfg: Config, embedder: nn.Module, device: torch.device) -> float:
    """kNN MAP@R of the pooled backbone features on data.train_shards (eval transforms, this process alone)."""
    stream = finite_batches(cfg.data.train_shards, cfg.data, cfg.eval.batch_size, rank=0, world=1)
    feats, labels = [], []
    for e, batch in embed_batches(_PooledFeatures(embedder), stream, device):
        feats.append(torch.from_numpy(e))
        labels.append(batch["labels"])
    if not feats:
        return float("nan")
    return knn_map_at_r(torch.cat(feats).to(device), torch.cat(labels))


def _better_of(
    cfg: Config, trained: nn.Module, initial: nn.Module | None, device: torch.device, seconds: float = 0.0
) -> tuple[nn.Module, dict[str, Any]]:
    """(the embedder to hand on, {"knn_map_at_r": {"input", "output", "handed_on"}}); the SwAV
    output unless the input weights score higher (pretrain.keep_better). Handing on the input
    means the stage's `seconds` of SwAV were spent for nothing: a WARNING says so, with both
    figures, and the result carries it ("warning") for the closing summary."""
    if initial is None:
        return trained, {}
    scores = {"input": labeled_knn_map_at_r(cfg, initial, device), "output": labeled_knn_map_at_r(cfg, trained, device)}
    keep_input = scores["input"] > scores["output"]  # nan (no labeled pairs) compares False: the output
    scores["handed_on"] = "input" if keep_input else "output"
    figures = f"input {scores['input']:.4f}, SwAV output {scores['output']:.4f}"
    if not keep_input:
        dist.get_logger().info(
            f"pretrain: labeled-train kNN MAP@R of the pooled features: {figures}; handing on the output"
        )
        return trained, {"knn_map_at_r": scores}
    warning = (
        f"pretrain handed on its INPUT weights: the SwAV output scored below them (labeled-train kNN MAP@R "
        f"{figures}); its {seconds:.0f} s of SwAV were spent for nothing (pretrain.steps=0 skips SwAV; "
        f"more steps or another pretrain.backbone_lr_mult may make it pay)"
    )
    dist.get_logger().warning(warning)
    return initial, {"knn_map_at_r": scores, "warning": warning}
