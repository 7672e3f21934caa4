"""What the launcher checks before submitting anything, whatever the cluster: flag ranges and which
stage they fit, stage modules, input paths, --shards ids, launch.sbatch_extra, and that each trainer
job's ranks divide the step's batch. Each failure is one LaunchError line (launch/README.md lists
them); a cluster's own checks live with it (slurm.check_shape_fits, local.check_local_shape).
Tests: tests/unit/test_launch.py (errors before anything runs), tests/integration/test_slurm.py.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence

from .. import stages
from ..config import Config, ConfigError, step_share
from ..provenance import describe_unvalidated, unvalidated_img2dataset
from .plan import JobSpec, LaunchError, format_shard_ids
from .slurm import SITE_KEYS


def check_flags(args: argparse.Namespace) -> None:
    """The ranges of --nodes and --array, and that --array / --shards fit the stage."""
    for flag, minimum in (("nodes", 1), ("array", 0)):  # 0 parts: no array
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise LaunchError(f"--{flag} must be >= {minimum}, got {value}")
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


def input_problems(cfg: Config, plan: Sequence[JobSpec], skip_missing: bool = False) -> list[str]:
    """Each planned stage's input keys that are unset, missing on disk (unless skip_missing: a dry
    run lists those through missing_input_paths already) or raw img2dataset output nobody validated
    (read as it is, the reader would index its tars unchecked, into that very directory)."""
    problems = []
    for stage in dict.fromkeys(spec.stage for spec in plan):
        for key in stages.STAGES[stage].shard_keys(cfg):
            value = cfg.get(key)
            try:
                cfg.require_inputs(key)
            except ConfigError as e:
                if value and skip_missing:
                    continue
                problems.append(f"stage {stage}: {e}")
                continue
            command = unvalidated_img2dataset(value)
            if command:
                problems.append(describe_unvalidated(key, value, command))
    return list(dict.fromkeys(problems))


# sbatch options the launcher sets from its own keys and flags: through sbatch_extra they would fight
# them (and output / error / open-mode / signal / array are how submitit finds a job's logs and result)
MANAGED_SBATCH = {
    "job-name": "the launcher names jobs slade-<run name>-<job>",
    "output": "submitit writes the logs under <run>/logs/<job>/",
    "error": "submitit writes the logs under <run>/logs/<job>/",
    "open-mode": "submitit appends to the logs across requeues",
    "signal": "submitit's checkpoint signal (USR2 before the time limit)",
    "array": "use --array",
    "dependency": "the chain's afterok dependencies",
    "kill-on-invalid-dep": "set on every job that waits for another",
    "requeue": "use launch.requeue",
    "nodes": "use launch.shapes.<stage>.nodes or --nodes",
    "ntasks-per-node": "use launch.shapes.<stage>.tasks_per_node",
    "cpus-per-task": "use launch.shapes.<stage>.cpus_per_task",
    "gpus-per-node": "use launch.shapes.<stage>.gpus_per_node",
    "mem": "use launch.shapes.<stage>.mem_gb",
    "time": "use launch.shapes.<stage>.time_min",
    **{key: f"use launch.{key}" for key in SITE_KEYS},
}


def check_sbatch_extra(cfg: Config, plan: Sequence[JobSpec]) -> None:
    """launch.sbatch_extra and launch.shapes.<stage>.sbatch_extra: option -> scalar, none the launcher sets."""
    places = {"launch.sbatch_extra": cfg.launch.sbatch_extra}
    for spec in plan:
        places[f"launch.shapes.{spec.stage}.sbatch_extra"] = spec.shape.sbatch_extra
    for key, extra in places.items():
        if not isinstance(extra, dict):
            raise LaunchError(
                f"{key} (from {cfg.source_of(key)}) must be a mapping of sbatch option -> value, "
                f"e.g. {{exclusive: true, comment: text}}; got {extra!r}"
            )
        for option, value in extra.items():
            name = str(option).replace("_", "-")
            if name in MANAGED_SBATCH:
                raise LaunchError(f"{key}.{option}: the launcher sets --{name} itself ({MANAGED_SBATCH[name]})")
            if not isinstance(value, (str, int, float, bool)):
                raise LaunchError(
                    f"{key}.{option} (from {cfg.source_of(f'{key}.{option}')}): expected a string, number "
                    f"or true/false (true: a bare --{name}; false: left out), got {value!r}"
                )


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


def step_counts(cfg: Config, stage: str) -> list[tuple[str, int, int, str]]:
    """The per-step counts a trainer stage shares over its ranks and micro-batches: (key, count,
    images per counted unit, what the images are). Other stages: none."""
    t, st = cfg.train, cfg.student
    if stage == "pretrain":
        crops = 2 + cfg.pretrain.local_crops
        return [("pretrain.batch_size", cfg.pretrain.batch_size, 1, f"SwAV images (x {crops} crops)")]
    labeled = ("train.classes_per_batch", t.classes_per_batch, t.samples_per_class, "labeled images")
    if stage == "teacher":
        return [labeled]
    if stage == "student":
        pseudo = ("student.unlabeled_classes_per_batch", st.unlabeled_classes_per_batch)
        return [labeled, (*pseudo, st.unlabeled_samples_per_class, "pseudo-labeled images")]
    return []


def _world(spec: JobSpec) -> int:
    return spec.shape.nodes * spec.shape.tasks_per_node


def check_step_batches(cfg: Config, plan: Sequence[JobSpec]) -> None:
    """Each trainer job's ranks x train.grad_accum must divide the batch of an optimizer step (what
    the job would otherwise stop at once it started, after queueing)."""
    for spec in plan:
        for key, count, _, _ in step_counts(cfg, spec.stage):
            try:
                step_share(count, key, _world(spec), cfg.train.grad_accum)
            except ConfigError as e:
                raise LaunchError(
                    f"job {spec.name} runs {spec.shape.nodes} node(s) x {spec.shape.tasks_per_node} task(s) = "
                    f"{_world(spec)} ranks: {e}"
                ) from None


def step_picture(cfg: Config, spec: JobSpec) -> str:
    """'per GPU and step: 4 labeled images + 4 pseudo-labeled images (of 32 + 32 over 8 rank(s))' ('' for
    a stage that does not train); call after check_step_batches."""
    counts = step_counts(cfg, spec.stage)
    if not counts:
        return ""
    world, accum = _world(spec), cfg.train.grad_accum
    mine = " + ".join(f"{count // (world * accum) * per} {what}" for _, count, per, what in counts)
    total = " + ".join(str(count * per) for _, count, per, _ in counts)
    micro = f" x {accum} micro-batches" if accum > 1 else ""
    unit = "GPU" if spec.shape.gpus_per_node else "task"
    return f"per {unit}{micro} and step: {mine} (of {total} over {world} rank(s))"
