"""The jobs of one launch: a `JobSpec` per job (stage, round, shape: launch.shapes.<stage> with
--nodes on top, the job it waits for), the chain of a stage or `all` with finished stages dropped,
job names, shard-id lists, where logs go, and `LaunchError`, which every launch module raises.
Never imports torch (the launcher starts without it). Tests: tests/unit/test_launch.py.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import stages
from ..config import Config, JobShape
from ..errors import UserError


class LaunchError(RuntimeError, UserError):
    """A problem found before submitting (or while running locally): one clear line for the user."""


@dataclass
class JobSpec:
    """One job of the plan. `after` names the job it waits for (afterok)."""

    name: str  # unique in the plan: "teacher", "round1-embed", ...
    stage: str
    round: int
    shape: JobShape  # resolved: tasks_per_node > 0
    after: str | None = None
    array: int = 0  # > 0: embed job array with this many parts
    shard_ids: tuple[int, ...] | None = None  # embed only these unlabeled shards (no DONE.json)


@dataclass
class Submitted:
    """A job of the plan once submitted (Slurm) or run (local/debug)."""

    spec: JobSpec
    job_id: str
    stdout: str
    jobs: list[Any]  # the submitit Job objects (one per array task)


def parse_shard_ids(text: str) -> list[int]:
    """ "0-9,12" -> [0..9, 12], sorted and without repeats (what `--shards` takes). ValueError on
    anything else, a reversed range included ("9-3" would silently name no shard)."""
    ids: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if hi < lo:
                raise ValueError(f"shard range {part!r} runs backwards")
            ids.extend(range(lo, hi + 1))
        else:
            ids.append(int(part))
    return sorted(set(ids))


def format_shard_ids(ids: Sequence[int]) -> str:
    """[0..9, 12] -> "0-9,12" (the inverse of parse_shard_ids, for job descriptions)."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in runs)


def resolve_shape(cfg: Config, stage: str, args: argparse.Namespace) -> JobShape:
    """cfg.launch.shapes.<stage> with --nodes on top; tasks_per_node 0 -> one per GPU (or 1)."""
    shape = copy.deepcopy(cfg.launch.shapes.get(stage) or JobShape())  # a stage not named: the defaults
    if args.nodes is not None:
        shape.nodes = args.nodes
    if shape.tasks_per_node == 0:
        shape.tasks_per_node = shape.gpus_per_node or 1
    return shape


def describe_shape(spec: JobSpec) -> str:
    s = spec.shape
    gpus = f", {s.gpus_per_node} GPU/node" if s.gpus_per_node else ""
    arr = f", array of {spec.array}" if spec.array else ""
    shards = f", shards {format_shard_ids(spec.shard_ids)}" if spec.shard_ids is not None else ""
    return f"{s.nodes} node(s) x {s.tasks_per_node} task(s), {s.cpus_per_task} CPU/task{gpus}{arr}{shards}"


def run_name(cfg: Config) -> str:
    """The run's short name: the basename of run.dir, reduced to what squeue and `scancel -n` take
    without quoting (letters, digits, `.`, `_`, `-`)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_root(cfg).name).strip("-.")
    return name or "run"


def slurm_job_name(cfg: Config, spec: JobSpec) -> str:
    """`slade-<run name>-<job>`: two runs' jobs tell apart in squeue, and `scancel -n` targets one."""
    return f"slade-{run_name(cfg)}-{spec.name}"


def plan_jobs(cfg: Config, stage: str, args: argparse.Namespace) -> list[JobSpec]:
    """The jobs to submit, in dependency order (each waits for the one before it)."""
    if stage == "all":
        steps = stages.pipeline_plan(cfg.run.rounds, stages.chain_switches(cfg))
    else:
        steps = [(stage, cfg.run.round if stages.STAGES[stage].per_round else 1)]
    shard_ids = args.shards
    plan: list[JobSpec] = []
    for st, rnd in steps:
        after = plan[-1].name if plan else None
        name = f"round{rnd}-{st}" if stages.STAGES[st].per_round else st
        shape = resolve_shape(cfg, st, args)
        if st == "embed" and shard_ids is not None:
            # a subset only: the stage is not complete after it, so this job never writes DONE.json
            plan.append(JobSpec(name + "-shards", st, rnd, shape, after, shard_ids=tuple(shard_ids)))
            continue
        if st == "embed" and args.array:
            # the array embeds disjoint parts; the normal embed job after it finds every shard
            # done, and writes DONE.json (array tasks never do: one would mark the stage done early)
            plan.append(JobSpec(name + "-array", st, rnd, shape, after, args.array))
            after = plan[-1].name
        plan.append(JobSpec(name, st, rnd, shape, after))
    return plan


def drop_done(cfg: Config, plan: Sequence[JobSpec]) -> tuple[list[JobSpec], list[JobSpec]]:
    """Split the plan into jobs to submit and jobs whose stage's DONE.json already matches the config
    (submitted, each would exit at once: dropping it saves a job start and a queue wait). A kept job
    that waited for a dropped one waits for the last kept job before it instead (none: starts at once)."""
    kept: list[JobSpec] = []
    dropped: list[JobSpec] = []
    for spec in plan:
        # once a job of the chain reruns, the jobs after it read its new outputs: they are kept too
        # (each still skips itself at run time when its inputs turn out unchanged)
        upstream_reruns = bool(kept) and spec.after is not None
        if not upstream_reruns and stages.is_done(stages.with_round(cfg, spec.round), spec.stage):
            dropped.append(spec)
            continue
        kept.append(dataclasses.replace(spec, after=kept[-1].name if kept and spec.after else None))
    return kept, dropped


def run_root(cfg: Config) -> Path:
    return Path(cfg.run.dir).resolve()


def log_folder(cfg: Config, spec: JobSpec) -> Path:
    return run_root(cfg) / "logs" / spec.name


def make_job(cfg: Config, spec: JobSpec, force: bool, job_cls: type | None = None) -> Any:
    """The picklable callable every task of the job runs (StageJob, or a test's subclass)."""
    # imported here: job.py imports torch (through dist), which the launcher itself never needs
    from .job import StageJob

    return (job_cls or StageJob)(
        cfg,
        spec.stage,
        spec.round,
        force=force,
        cpu=spec.shape.gpus_per_node == 0,
        array_parts=spec.array,
        shard_ids=spec.shard_ids,
    )
