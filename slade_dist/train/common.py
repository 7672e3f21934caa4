"""What the three trainers (pretrain, teacher, student) share, so no stage imports another:
stream seeds, the embedder's initial weights and lr groups, the refusal of per-micro-batch
BatchNorm under train.grad_accum, the stage's TensorBoard writer, the periodic-eval hook and the
result summary for DONE.json.
Tests: tests/unit/test_engine.py, tests/unit/test_pretrain.py, tests/unit/test_student.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import dist
from ..config import Config, ConfigError, ModelConfig, TrainConfig
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..models import build_embedder, load_state_dict_checked, read_checkpoint, save_weights
from ..stages import RunLayout
from ..tb import TBWriter
from .engine import ParamGroup
from .loop import FitResult
from .sync_bn import bn_trains

# metrics of the current model on the test split; called on every rank, same dict on each
Evaluate = Callable[[torch.nn.Module], dict[str, float]]


def stream_seed(base_seed: int, step: int, salt: int = 0) -> int:
    """Seed of a data stream started at `step`: a resumed run draws new batches, not a replay."""
    return (int(base_seed) * 1_000_003 + int(step) * 7_919 + int(salt) * 104_729) % (2**31 - 1)


def pretrain_init_path(run_dir: str | os.PathLike[str]) -> Path | None:
    """The pretrain stage's export when that stage ran, else None."""
    p = RunLayout(run_dir).stage_dir("pretrain") / "final.pt"
    return p if p.exists() else None


def init_embedder(model_cfg: ModelConfig, init_path: str | os.PathLike[str] | None) -> torch.nn.Module:
    """An Embedder from cfg.model; `init_path` (a save_weights file) replaces all its weights.

    With no init_path the embedder starts from model.pretrained_path (backbone) or random.
    """
    if init_path is None:
        return build_embedder(model_cfg)
    plain = dataclasses.replace(model_cfg, pretrained="none", pretrained_path="")  # the file replaces them anyway
    emb = build_embedder(plain)
    obj = read_checkpoint(init_path)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise RuntimeError(f"{str(init_path)!r} is not a slade_dist weights file (save_weights format)")
    load_state_dict_checked(emb, obj["state_dict"], what=f"init weights {str(init_path)!r}")
    return emb


def embedder_groups(embedder: Any, tcfg: TrainConfig, *, start: int = 0) -> list[ParamGroup]:
    """backbone at lr * backbone_lr_mult, head at lr (both starting at optimizer step `start`)."""
    parts = embedder.param_groups()
    return [
        ParamGroup("backbone", parts["backbone"], tcfg.lr * tcfg.backbone_lr_mult, start),
        ParamGroup("head", parts["head"], tcfg.lr, start),
    ]


def check_trunk_bn(trunk: torch.nn.Module, cfg: Config) -> None:
    """Refuse train.grad_accum > 1 when the trunk (the part run per micro-batch) has BatchNorm that
    trains: each micro-batch would be normalised on its own, not on the optimizer step's batch."""
    if cfg.train.grad_accum > 1 and bn_trains(trunk.train()):
        raise ConfigError(
            f"train.grad_accum = {cfg.train.grad_accum} (from {cfg.source_of('train.grad_accum')}) with "
            f"BatchNorm layers that train in model.backbone = {cfg.model.backbone}: each micro-batch would be "
            f"normalised on its own, not on the optimizer step's batch; set model.freeze_bn=true, or "
            f"train.grad_accum=1 (more GPUs give the same step: each rank takes its share)"
        )


def open_tb(cfg: Config, run_dir: str | os.PathLike[str], stage: str, round_: int | None, resume_step: int) -> TBWriter:
    """The stage's rank-0 writer (image grids de-normalised with the data's mean/std); the resolved
    config goes in as text on a fresh start."""
    norm = (IMAGENET_MEAN, IMAGENET_STD)
    tb = TBWriter(RunLayout(run_dir).tb_dir(stage, round_), resume_step=resume_step, image_norm=norm)
    if resume_step == 0:
        tb.text("config", cfg.dump_yaml())
    return tb


def eval_every(
    evaluate: Evaluate | None, module: Callable[[], torch.nn.Module]
) -> Callable[[int], dict[str, float]] | None:
    """fit()'s eval_fn: the stage's evaluator on the current model (the evaluator's one inference
    pass, models/inference.py, puts the model back in train mode)."""
    return None if evaluate is None else lambda step: evaluate(module())


def export_final(stage_dir: Path, module: torch.nn.Module, model_cfg: ModelConfig, extra: dict[str, Any]) -> None:
    """<stage_dir>/final.pt, written by rank 0 (fit left the replicas equal); every rank waits for it."""
    if dist.is_main():
        save_weights(stage_dir / "final.pt", module, model_cfg, extra=extra)
    dist.barrier()


def fit_summary(result: FitResult, resumed: dict[str, Any]) -> dict[str, Any]:
    """The part of a trainer's DONE.json result every trainer shares."""
    return {
        "steps": result.steps,
        "resumed_from": result.start_step,
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "seconds": round(result.seconds, 2),
        "param_digest": result.param_digest,
        "resumed": resumed,
        "loss_history": result.history,
        "data": {"images_read": result.images, "skipped_corrupt_or_truncated": result.skipped},
    }
