"""What each task of a launched job runs: `StageJob`, one stage of one round inside the job's
distributed environment (launch/README.md: "Inside a job", "Preemption, time limits, resubmission",
"Embed as a job array"). The launcher imports it only when it makes a job: it imports torch.
Tests: tests/unit/test_launch.py (in process), tests/integration/test_{launch_local,slurm}.py
(real LocalExecutor / Slurm jobs, requeue and resume).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import submitit

from .. import dist, runner, stages
from ..config import Config
from ..data.shards import shard_index, shard_paths


def array_part(items: list[int], index: int, parts: int) -> list[int]:
    """The index-th of `parts` contiguous, near-equal ranges of items (earlier ranges get the extra)."""
    if not 0 <= index < parts:
        raise ValueError(f"array index {index} is outside 0..{parts - 1}")
    return [int(i) for i in np.array_split(np.asarray(items, dtype=np.int64), parts)[index]]


def export_job_env() -> None:
    """Inside a submitit task: export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for torch.
    Outside one (a test calling the job), dist reads the environment as it is."""
    try:
        job_id = submitit.JobEnvironment().job_id
    except RuntimeError:  # "Could not figure out which environment the job is running in"
        return
    # submitit takes MASTER_PORT as given; unset, it picks one in the ephemeral range (dist.job_master_port)
    os.environ["MASTER_PORT"] = str(dist.job_master_port(job_id))
    # GPUs not pinned: DeepSpeed picks one by LOCAL_RANK. overwrite: --cluster debug runs jobs in this
    # process, and the job's environment replaces what an earlier stage left
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


@dataclass(eq=False, repr=False)
class StageJob(submitit.helpers.Checkpointable):
    """Run `stage` (round `round`) with `cfg` in each task of a submitit job."""

    cfg: Config
    stage: str
    round: int = 1
    force: bool = False
    cpu: bool = True  # a job without GPUs (DeepSpeed then needs DS_ACCELERATOR=cpu before it is imported)
    array_parts: int = 0  # N > 0: an embed array task, it embeds shard range `part` of N
    shard_ids: Sequence[int] | None = None  # embed exactly these unlabeled shard ids (the launcher's --shards)

    def __post_init__(self) -> None:
        if self.stage not in stages.STAGES:
            raise KeyError(f"unknown stage {self.stage!r}; stages: {', '.join(stages.STAGES)}")
        if self.array_parts and self.stage != "embed":
            raise ValueError(f"only the embed stage runs as a job array, not {self.stage!r}")
        if self.shard_ids is not None and self.stage != "embed":
            raise ValueError(f"only the embed stage runs on a shard subset, not {self.stage!r}")
        if self.shard_ids is not None and self.array_parts:
            raise ValueError("a job array already splits the shards: pass shard_ids or array_parts, not both")
        if self.shard_ids is not None:
            self.shard_ids = sorted(set(self.shard_ids))

    def __repr__(self) -> str:
        rnd = f" round {self.round}" if stages.STAGES[self.stage].per_round else ""
        return f"StageJob({self.stage}{rnd})"

    def stage_config(self) -> Config:
        """The config with this job's round set."""
        cfg = copy.deepcopy(self.cfg)  # not shallow: under --cluster debug this is the launcher's own config
        cfg.run.round = self.round
        return cfg

    def __call__(self, part: int | None = None) -> dict[str, Any] | None:
        """Run in every task of the job. `part`: this array task's index (embed arrays only)."""
        saved_env = dict(os.environ)  # the debug executor runs jobs in the launcher's own process
        try:
            if self.cpu:  # a job that asked for no GPU uses none: DeepSpeed, gloo and the model agree
                os.environ["DS_ACCELERATOR"] = "cpu"
                os.environ["CUDA_VISIBLE_DEVICES"] = ""
            export_job_env()
            dist.init_distributed()
            if self.array_parts or self.shard_ids is not None:
                return self._embed_subset(int(part or 0))
            return runner.run_stage(self.stage_config(), self.stage, force=self.force)
        finally:
            dist.shutdown()
            os.environ.clear()
            os.environ.update(saved_env)

    def _embed_subset(self, index: int) -> dict[str, Any] | None:
        """Embed this job's shard subset; no DONE.json (the stage is done only once every shard is)."""
        cfg = self.stage_config()
        log = dist.get_logger()
        what = f"embed part {index}/{self.array_parts}" if self.array_parts else "embed shards"
        if not self.force and stages.is_done(cfg, self.stage):
            log.info(f"[{what}] stage already DONE: skipped")
            return None
        cfg.require_inputs(*stages.STAGES[self.stage].requires)
        mine = self._subset_ids(cfg, index)
        log.info(f"[{what}] shard ids {mine[:1]}..{mine[-1:]} ({len(mine)})")
        if not mine:
            return {"shards": 0}
        return stages.STAGES[self.stage].load()(cfg, stages.RunLayout(cfg.run.dir).root, shard_ids=mine)

    def _subset_ids(self, cfg: Config, index: int) -> list[int]:
        if self.shard_ids is not None:
            return list(self.shard_ids)
        ids = sorted(shard_index(p) for p in shard_paths(cfg.data.unlabeled_shards))
        return array_part(ids, index, self.array_parts)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 at preemption / time limit (USR2): resubmit this same call. No
        collective save here: the other ranks are not in this code path, it would hang; the requeued
        job resumes from the stage's own latest checkpoint (a finished stage: skipped by DONE.json)."""
        dist.get_logger().warning(f"{self!r}: interrupted, requeueing; the stage resumes from its latest checkpoint")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
