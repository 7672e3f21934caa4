"""What the launcher checks before submitting anything, whatever the cluster.

Owns: the ranges of the numeric flags, which flags apply to which stage (--array, --shards), that
every planned stage's module exists (found without importing it: no torch), that its input paths
are set and exist, and that --shards names shards of the unlabeled index. Each failure is one
LaunchError line. The cluster's own checks live with it (slurm.check_shape_fits,
local.check_local_shape).
Tests: tests/unit/test_launch.py (errors before anything runs), tests/integration/test_slurm.py.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence

from .. import stages
from ..config import Config, ConfigError
from .plan import JobSpec, LaunchError, format_shard_ids

# flag -> smallest value it takes (0 where 0 means "none" or "the default")
FLAG_MINIMUM = {
    "nodes": 1,
    "gpus_per_node": 0,
    "tasks_per_node": 0,
    "cpus_per_task": 1,
    "mem": 0,
    "time": 1,
    "rounds": 1,
    "array": 0,
}


def check_flag_ranges(args: argparse.Namespace) -> None:
    for flag, minimum in FLAG_MINIMUM.items():
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise LaunchError(f"--{flag.replace('_', '-')} must be >= {minimum}, got {value}")


def check_flags_fit_stage(args: argparse.Namespace) -> None:
    if args.array and args.stage not in ("embed", "all"):
        raise LaunchError(f"--array applies to the embed stage, not {args.stage!r}")
    if args.shards is None:
        return
    if args.stage != "embed":  # not `all` either: the cluster stage needs every shard embedded
        raise LaunchError(f"--shards applies to the embed stage, not {args.stage!r}")
    if args.array:
        raise LaunchError("--shards and --array both pick the shards an embed job embeds: pass one of them")


def check_stages_exist(plan: Sequence[JobSpec]) -> None:
    """Each stage's module must be importable (found without importing it: no torch here)."""
    for spec in plan:
        module = stages.STAGES[spec.stage].target.split(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise LaunchError(f"stage {spec.stage!r} is not implemented yet (module {module} not found)")


def check_inputs(cfg: Config, plan: Sequence[JobSpec]) -> None:
    for stage in dict.fromkeys(spec.stage for spec in plan):
        try:
            cfg.require_inputs(*stages.STAGES[stage].requires)
        except ConfigError as e:
            raise LaunchError(f"stage {stage}: {e}") from e


def check_shard_ids(cfg: Config, plan: Sequence[JobSpec]) -> None:
    """--shards names shards of data.unlabeled_shards (the embed job would fail on the others)."""
    wanted = {i for spec in plan if spec.shard_ids is not None for i in spec.shard_ids}
    if not wanted:
        return
    # imported here: the shard reader imports webdataset, which imports torch
    from ..data.shards import shard_index, shard_paths

    known = {shard_index(p) for p in shard_paths(cfg.data.unlabeled_shards)}
    unknown = sorted(wanted - known)
    if unknown:
        valid = format_shard_ids(sorted(known)) or "none"
        raise LaunchError(
            f"--shards: shard ids {format_shard_ids(unknown)} are not in data.unlabeled_shards "
            f"({cfg.data.unlabeled_shards}; its shards: {valid})"
        )
