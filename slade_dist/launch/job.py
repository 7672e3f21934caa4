"""What one Slurm / submitit task runs: one stage of one round, inside the job's distributed env.

Owns: `StageJob`, the picklable callable the launcher (slade_dist.launch) submits. In every task it
exports the submitit environment for torch.distributed (export_job_env: RANK, WORLD_SIZE, MASTER_*
with the job's own rendezvous port, CUDA devices left visible: DeepSpeed picks one by local rank),
sets DS_ACCELERATOR=cpu and hides GPUs in GPU-less jobs, initialises torch.distributed, sets
run.round and calls runner.run_stage. It never builds a model: stages do. The launcher imports
this module only when it makes a job (it imports torch).
Preemption / time limit: submitit calls `checkpoint()` on global rank 0 when the job receives its
signal (USR2). It ONLY resubmits the same call (never a collective save: the other ranks are not
in that code path, so a collective there would hang); the requeued job resumes from the stage's own
latest periodic checkpoint / finished shards, and a stage whose DONE.json matches is skipped, which
makes resubmitting a finished chain a no-op.
Embed shard subsets: array task i of N calls the embed function on the i-th contiguous range of the
unlabeled shard ids (embed.run's `shard_ids` hook), and a `--shards` job on its explicit ids; neither
writes DONE.json (the stage is complete only when every shard is): a normal embed job after the
array runs the full stage, which finds every shard embedded and writes the marker.
Tests: tests/unit/test_launch.py (single process), tests/integration/test_launch_local.py and
tests/integration/test_slurm.py (real LocalExecutor / Slurm jobs, requeue and resume).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import submitit

from .. import dist, runner, stages
from ..config import Config
from ..data.shards import shard_index, shard_paths


def array_part(items: list[int], index: int, parts: int) -> list[int]:
    """The index-th of `parts` contiguous, near-equal ranges of items (earlier ranges get the extra)."""
    if not 0 <= index < parts:
        raise ValueError(f"array index {index} is outside 0..{parts - 1}")
    base, extra = divmod(len(items), parts)
    start = index * base + min(index, extra)
    return items[start : start + base + (1 if index < extra else 0)]


def export_job_env() -> None:
    """Inside a submitit task: export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for torch.

    set_cuda_visible_devices=False: DeepSpeed picks the GPU by LOCAL_RANK; pinning would break that.
    """
    # Inside a submitit task the job environment is the truth: overwrite=True replaces values left by
    # an earlier stage run in this same process (--cluster debug runs jobs in-process). submitit reads
    # MASTER_PORT as given; unset it would pick one in the ephemeral range (see dist.job_master_port).
    os.environ["MASTER_PORT"] = str(dist.job_master_port(submitit.JobEnvironment().job_id))
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


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
    shard_ids: embed exactly these unlabeled shard ids (the launcher's --shards).
    """

    def __init__(
        self,
        cfg: Config,
        stage: str,
        round_: int = 1,
        force: bool = False,
        cpu: bool = True,
        array_parts: int = 0,
        shard_ids: Sequence[int] | None = None,
    ) -> None:
        if stage not in stages.STAGES:
            raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(stages.STAGES)}")
        if array_parts and stage != "embed":
            raise ValueError(f"only the embed stage runs as a job array, not {stage!r}")
        if shard_ids is not None and stage != "embed":
            raise ValueError(f"only the embed stage runs on a shard subset, not {stage!r}")
        if shard_ids is not None and array_parts:
            raise ValueError("a job array already splits the shards: pass shard_ids or array_parts, not both")
        self.cfg = cfg
        self.stage = stage
        self.round = round_
        self.force = force
        self.cpu = cpu
        self.array_parts = array_parts
        self.shard_ids = None if shard_ids is None else sorted(set(shard_ids))

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
        """Called by submitit on rank 0 at preemption / time limit: resubmit this same call, nothing else."""
        dist.get_logger().warning(f"{self!r}: interrupted, requeueing; the stage resumes from its latest checkpoint")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
