"""Teacher stage: the embedder trained with the ranking loss on labeled P x K batches.

Owns `run(cfg, run_dir)` and `TeacherObjective`: init from the pretrain stage's export when it
exists (else model.pretrained_path / random), train.teacher_steps optimizer steps on the engine
(train/engine.py, train/loop.py), export <run>/teacher/final.pt. Method: docs/METHOD.md, stage 2.
Tests: tests/integration/test_train_multirank.py, tests/integration/test_resume.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data.readers import labeled_batches
from ..losses import build_loss
from ..stages import RunLayout, stage_id
from ..tb import TBWriter
from .batch_split import rank_share
from .common import (
    Evaluate,
    check_trunk_bn,
    embedder_groups,
    eval_every,
    export_final,
    fit_summary,
    init_embedder,
    open_tb,
    pretrain_init_path,
    stream_seed,
)
from .engine import Trainer
from .loop import Micro, SkipDelta, StepObjective, fit, timed_next


def run(cfg: Config, run_dir: Path, evaluate: Evaluate | None = None) -> dict[str, Any]:
    """Train the teacher; `evaluate` (from the stage runner) runs every train.eval_every steps."""
    run_dir = Path(run_dir)
    stage_dir = RunLayout(run_dir).stage_dir("teacher")
    init = pretrain_init_path(run_dir)
    torch.manual_seed(cfg.run.seed)  # identical initial weights (heads, W_a) on every rank
    embedder = init_embedder(cfg.model, init)
    check_trunk_bn(embedder, cfg)
    # P is the whole optimizer step's: this rank draws its share of the classes per micro-batch
    P = rank_share(cfg.train.classes_per_batch, "train.classes_per_batch", cfg.train.grad_accum)
    K = cfg.train.samples_per_class
    trainer = Trainer(
        embedder,
        embedder_groups(embedder, cfg.train),
        cfg.train,
        stage_dir=stage_dir,
        total_steps=cfg.train.teacher_steps,
        micro_batch=P * K,
        stage_id=stage_id(cfg, "teacher"),
        sync_bn=cfg.model.sync_bn,
    )
    seed = stream_seed(cfg.run.seed, trainer.step)
    stream = labeled_batches(cfg.data.train_shards, cfg.data, P, K, seed=seed)
    tb = open_tb(cfg, run_dir, "teacher", None, trainer.step)
    objective = TeacherObjective(trainer, stream, build_loss(cfg.loss), tb, K)
    seeds = {"labeled_stream_seed": seed}
    resumed = dict(trainer.resume_info)
    result = fit(
        trainer,
        objective,
        tb=tb,
        state_fn=lambda: {"stream_seeds": seeds},
        eval_fn=eval_every(evaluate, lambda: trainer.module),
        desc="teacher",
    )
    tb.close()
    extra = {"stage": "teacher", "step": trainer.step, "init": str(init) if init else ""}
    export_final(stage_dir, trainer.module, cfg.model, extra)
    return {**fit_summary(result, resumed), "init": str(init) if init else cfg.model.pretrained_path}


class TeacherObjective(StepObjective):
    """The ranking loss of the step's labeled P x K batch (every micro-batch of every rank)."""

    def __init__(self, trainer: Trainer, stream: Any, rank_loss: Any, tb: TBWriter, K: int) -> None:
        self.trainer, self.stream, self.rank_loss, self.tb, self.K = trainer, stream, rank_loss, tb, K
        self.skip = SkipDelta()

    def draw(self, step: int) -> Micro:
        batch, wait = timed_next(self.stream)
        self.tb.images("batch/labeled", batch["images"], step, nrow=self.K, once=True)  # one class a row
        dev = self.trainer.device
        return Micro(
            x=batch["images"].to(dev, non_blocking=True),
            data={"labels": batch["labels"].to(dev, non_blocking=True)},
            images=int(batch["images"].shape[0]),
            skipped=self.skip("labeled", batch.get("skipped", 0)),
            wait_s=wait,
        )

    def loss(self, step: int, outs: list[torch.Tensor], micros: list[Micro]) -> tuple[torch.Tensor, dict[str, float]]:
        emb = torch.cat(outs).float()  # the loss in fp32 even under bf16 autocast
        loss = self.rank_loss(emb, torch.cat([m.data["labels"] for m in micros]))
        return loss, {"loss/rank_labeled": float(loss.detach())}
