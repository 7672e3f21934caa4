"""Teacher stage: the embedder trained with the ranking loss on labeled P x K batches.

Owns `run(cfg, run_dir)`: init from the pretrain stage's final.pt when it exists (else from
model.pretrained_path / random), cfg.train.teacher_steps optimizer steps on the DeepSpeed engine
(train/engine.py: checkpoint/resume, schedule, TensorBoard), export <run>/teacher/final.pt.
Tests: tests/integration/test_train_multirank.py, tests/integration/test_resume.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import dist
from ..config import Config
from ..stages import RunLayout
from . import engine as E


def pretrain_init_path(run_dir: Path) -> Path | None:
    """The pretrain stage's export when that stage ran, else None."""
    p = RunLayout(run_dir).stage_dir("pretrain") / "final.pt"
    return p if p.exists() else None


def ranking_loss_fn(cfg: Config):
    """loss(emb, labels=None, pos_pairs=..., neg_pairs=...), cross-rank when cfg.loss.cross_rank."""
    from ..losses import build_loss, cross_rank_loss

    loss_fn = build_loss(cfg.loss)

    def rank_loss(emb: torch.Tensor, labels: torch.Tensor | None = None, **pairs: Any) -> torch.Tensor:
        if cfg.loss.cross_rank and labels is not None and not pairs:
            return cross_rank_loss(loss_fn, emb, labels)
        return loss_fn(emb, labels, **pairs)

    return rank_loss


def run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    from ..data.readers import labeled_batches
    from ..models import save_weights

    run_dir = Path(run_dir)
    stage_dir = RunLayout(run_dir).stage_dir("teacher")
    init = pretrain_init_path(run_dir)
    torch.manual_seed(cfg.run.seed)  # identical initial weights (heads, W_a) on every rank
    embedder = E.init_embedder(cfg.model, init)
    P, K = cfg.train.classes_per_batch, cfg.train.samples_per_class
    trainer = E.Trainer(embedder, E.embedder_groups(embedder, cfg.train), cfg.train, stage_dir=stage_dir,
                        total_steps=cfg.train.teacher_steps, micro_batch=P * K)
    seed = E.stream_seed(cfg.run.seed, trainer.step)
    stream = labeled_batches(cfg.data.train_shards, cfg.data, P, K, seed=seed, rank=dist.rank(),
                             world=dist.world_size(), train=True)
    rank_loss = ranking_loss_fn(cfg)
    tb = E.open_tb(cfg, run_dir, "teacher", None, trainer.step)
    device = trainer.device
    skip = E.SkipDelta()

    def micro(step: int) -> E.MicroResult:
        batch, wait = E.timed_next(stream)
        x = batch["images"].to(device, non_blocking=True)
        y = batch["labels"].to(device, non_blocking=True)
        emb = trainer.forward(x).float()  # the loss in fp32 even under bf16 autocast
        loss = rank_loss(emb, y)
        return E.MicroResult(loss=loss, scalars={"loss/rank_labeled": float(loss.detach())},
                             images=int(x.shape[0]), skipped=skip("labeled", batch.get("skipped", 0)), wait_s=wait)

    seeds = {"labeled_stream_seed": seed}
    resumed = dict(trainer.resume_info)
    result = E.fit(trainer, micro, tb=tb, state_fn=lambda: {"stream_seeds": seeds},
                   eval_fn=E.make_eval_fn(cfg, lambda: trainer.module), desc="teacher")
    tb.close()
    if dist.is_main():
        save_weights(stage_dir / "final.pt", trainer.module, cfg.model,
                     extra={"stage": "teacher", "step": trainer.step, "init": str(init) if init else ""})
    dist.barrier()
    return {"steps": result.steps, "resumed_from": result.start_step, "first_loss": result.first_loss,
            "final_loss": result.final_loss, "init": str(init) if init else cfg.model.pretrained_path,
            "seconds": round(result.seconds, 2), "param_digest": result.param_digest, "resumed": resumed,
            "loss_history": result.history}
