"""What one Slurm / submitit task runs: one stage of one round, inside the job's distributed env.

Owns: `StageJob`, the picklable callable the launcher (launch/submit.py) submits. In every task it
exports the submitit environment for torch.distributed (dist.export_submitit_env, CUDA devices left
visible: DeepSpeed picks one by local rank), sets DS_ACCELERATOR=cpu and hides GPUs in GPU-less
jobs, initialises torch.distributed, sets run.round and calls stages.run_stage. It never builds a
model: stages do.
Preemption / time limit: submitit calls `checkpoint()` on global rank 0 when the job receives its
signal (USR2). It ONLY resubmits the same call (never a collective save: the other ranks are not
in that code path, so a collective there would hang); the requeued job resumes from the stage's own
latest periodic checkpoint / finished shards, and a stage whose DONE.json matches is skipped, which
makes resubmitting a finished chain a no-op.
Embed job arrays: array task i of N calls the embed function on the i-th contiguous range of the
unlabeled shard ids (embed.run's `shard_ids` hook) without writing DONE.json; a normal embed job
after the array runs the full stage, which finds every shard embedded and writes the marker.
Tests: tests/unit/test_submit.py (single process), tests/integration/test_launch_local.py and
tests/integration/test_slurm.py (real LocalExecutor / Slurm jobs, requeue and resume).
"""
from __future__ import annotations

import copy
import os
from typing import Any

import submitit

from . import dist, stages
from .config import Config


def array_part(items: list[int], index: int, parts: int) -> list[int]:
    """The index-th of `parts` contiguous, near-equal ranges of items (earlier ranges get the extra)."""
    if not 0 <= index < parts:
        raise ValueError(f"array index {index} is outside 0..{parts - 1}")
    base, extra = divmod(len(items), parts)
    start = index * base + min(index, extra)
    return items[start:start + base + (1 if index < extra else 0)]


def in_submitit_job() -> bool:
    try:
        submitit.JobEnvironment()
        return True
    except RuntimeError:  # "Could not figure out which environment the job is running in"
        return False


class StageJob(submitit.helpers.Checkpointable):
    """Run `stage` (round `round_`) with `cfg` in each task of a submitit job.

    cpu: True for jobs without GPUs (DeepSpeed then needs DS_ACCELERATOR=cpu before it is imported).
    array_parts: N > 0 makes this an embed array task: it embeds shard range `part` of N.
    """

    def __init__(self, cfg: Config, stage: str, round_: int = 1, force: bool = False,
                 cpu: bool = True, array_parts: int = 0) -> None:
        if stage not in stages.STAGES:
            raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(stages.STAGES)}")
        if array_parts and stage != "embed":
            raise ValueError(f"only the embed stage runs as a job array, not {stage!r}")
        self.cfg = cfg
        self.stage = stage
        self.round = round_
        self.force = force
        self.cpu = cpu
        self.array_parts = array_parts

    def __repr__(self) -> str:
        rnd = f" round {self.round}" if stages.STAGES[self.stage].per_round else ""
        return f"StageJob({self.stage}{rnd})"

    def stage_config(self) -> Config:
        """A copy of the config with this job's round set."""
        cfg = copy.deepcopy(self.cfg)
        cfg.run.round = self.round
        return cfg

    def __call__(self, part: int | None = None) -> dict[str, Any] | None:
        """Run in every task of the job. `part`: this array task's index (embed arrays only)."""
        saved_env = dict(os.environ)  # the debug executor runs jobs in the launcher's own process
        try:
            if self.cpu:  # a job that asked for no GPU uses none: DeepSpeed, gloo and the model agree
                os.environ["DS_ACCELERATOR"] = "cpu"
                os.environ["CUDA_VISIBLE_DEVICES"] = ""
            if in_submitit_job():  # called outside submitit, dist reads the environment as it is
                dist.export_submitit_env()
            dist.init_distributed()
            if self.array_parts:
                return self._run_array_part(int(part or 0))
            return stages.run_stage(self.stage_config(), self.stage, force=self.force)
        finally:
            dist.shutdown()
            os.environ.clear()
            os.environ.update(saved_env)

    def _run_array_part(self, index: int) -> dict[str, Any] | None:
        """Array task `index`: embed its shard range; no DONE.json (the embed job after the array writes it)."""
        from .data.pseudo_labels import shard_index
        from .data.shards import shard_paths

        cfg = self.stage_config()
        log = dist.get_logger()
        if not self.force and stages.is_done(cfg, self.stage):
            log.info(f"[embed part {index}/{self.array_parts}] stage already DONE: skipped")
            return None
        cfg.require_inputs(*stages.STAGES[self.stage].requires)
        ids = sorted(shard_index(p) for p in shard_paths(cfg.data.unlabeled_shards))
        mine = array_part(ids, index, self.array_parts)
        log.info(f"[embed part {index}/{self.array_parts}] shard ids {mine[:1]}..{mine[-1:]} ({len(mine)})")
        if not mine:
            return {"shards": 0}
        return stages.STAGES[self.stage].load()(cfg, stages.RunLayout(cfg.run.dir).root, shard_ids=mine)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 at preemption / time limit: resubmit this same call, nothing else."""
        dist.get_logger().warning(f"{self!r}: interrupted, requeueing; the stage resumes from its "
                                  f"latest checkpoint")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
