"""One launch, from parsed arguments to jobs: which config file, the config, the cluster and the
plan with every check done before anything is submitted; the dry run (launch/README.md); submitting
or running the jobs and the closing hints; --status / --cancel. Tests: tests/unit/test_launch.py,
tests/integration/test_{launch_local,slurm}.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import stages
from ..config import REPO_ROOT, Config, ConfigError, load_config, missing_input_paths
from .checks import (
    check_flags,
    check_sbatch_extra,
    check_shard_ids,
    check_stages_exist,
    check_step_batches,
    input_problems,
    step_picture,
)
from .local import check_local_shape, run_here
from .plan import JobSpec, LaunchError, Submitted, describe_shape, drop_done, log_folder, plan_jobs, run_name, run_root
from .slurm import check_shape_fits, query_partition, script_lines, slurm_params, submit_slurm
from .status import cancel_chain, print_status, write_record

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def pick_config_file(args: argparse.Namespace) -> tuple[str, str]:
    """--config, else the run directory's saved config, else the demo's; and why (for the user)."""
    if args.config:
        return args.config, ""
    # run.dir from defaults + overrides: the run whose saved config to take
    run_dir = Path(load_config(None, args.overrides, check_paths=False).run.dir)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        return str(saved), f"no --config given: using {saved}, the config run dir {run_dir} last ran with"
    demo = os.path.relpath(DEMO_CONFIG) if DEMO_CONFIG.is_relative_to(Path.cwd()) else str(DEMO_CONFIG)
    return demo, f"no --config given and no {saved}: using {demo}"


def pick_cluster(requested: str | None, cfg: Config, plan: Sequence[JobSpec] = ()) -> str:
    choice = requested or cfg.launch.cluster
    if choice != "auto":
        return choice
    if shutil.which("sbatch"):
        return "slurm"
    # no Slurm here, but a job across nodes can only mean Slurm: a dry run shows its script, a real
    # submission stops with "sbatch is not on PATH" (not with "--cluster local runs on one machine")
    return "slurm" if any(spec.shape.nodes > 1 for spec in plan) else "local"


def fit_problems(cluster: str, plan: Sequence[JobSpec], cfg: Config, dry_run: bool = False) -> list[str]:
    """Each job that would not fit where it is headed (one sinfo query for all of them)."""
    if cluster != "slurm":
        return [p for spec in plan for p in _problem(check_local_shape, spec)]
    if not shutil.which("sbatch"):
        if dry_run:
            return ["sbatch is not on PATH here: the jobs' sizes were not checked against a partition"]
        widest = max(plan, key=lambda spec: spec.shape.nodes)
        return [
            f"--cluster slurm (job {widest.name} asks for {widest.shape.nodes} node(s)) but `sbatch` is not "
            "on PATH: submit from a Slurm login node, or run here with --cluster local --nodes 1 "
            "(--dry-run shows the jobs' scripts anywhere)"
        ]
    try:
        part = query_partition(cfg.launch.partition)
    except LaunchError as e:
        return [str(e)]
    return [p for spec in plan for p in _problem(check_shape_fits, spec, part)]


def resolve(args: argparse.Namespace, config_file: str) -> tuple[Config, str, list[JobSpec]]:
    """Load the config, plan the jobs and check everything that can be checked before submitting."""
    check_flags(args)
    # a dry run shows the plan of a run whose data is not there yet (dry_run_warnings lists it)
    cfg = load_config(config_file, args.overrides, check_paths=not args.dry_run)
    for name in cfg.launch.shapes:
        if name not in stages.STAGES:
            raise LaunchError(f"launch.shapes.{name}: there is no stage {name!r} (stages: {', '.join(stages.STAGES)})")
    plan = plan_jobs(cfg, args.stage, args)
    check_sbatch_extra(cfg, plan)
    check_step_batches(cfg, plan)  # also in a dry run: such a job could never start
    cluster = pick_cluster(args.cluster, cfg, plan)
    if not args.dry_run:  # what a dry run only warns about (dry_run_warnings)
        problems = fit_problems(cluster, plan, cfg) or input_problems(cfg, plan)
        if problems:
            raise LaunchError(problems[0])
        check_shard_ids(cfg, plan)  # reads the unlabeled index: after the inputs are known to exist
        check_stages_exist(plan)
    return cfg, cluster, plan


def _problem(check: Callable[..., Any], *check_args: Any) -> list[str]:
    """The one-line error of a check, as a list (empty when it passes)."""
    try:
        check(*check_args)
    except (LaunchError, ConfigError) as e:
        return [str(e)]
    return []


def dry_run_warnings(args: argparse.Namespace, config_file: str, cfg: Config, cluster: str, plan) -> list[str]:
    """Everything a real submission would stop at, without stopping: missing inputs (all of them),
    the checks on the data, and whether the jobs fit the partition (when sbatch is here to ask)."""
    warnings = missing_input_paths(cfg)
    if not warnings:  # the load-time checks that need the data (P of P x K vs the classes there)
        warnings += _problem(load_config, config_file, args.overrides)
    warnings += input_problems(cfg, plan, skip_missing=True)
    if not warnings:  # --shards against the unlabeled index, which must be there to read
        warnings += _problem(check_shard_ids, cfg, plan)
    warnings += _problem(check_stages_exist, plan)
    return list(dict.fromkeys(warnings + fit_problems(cluster, plan, cfg, dry_run=True)))


def print_dry_run(cfg: Config, cluster: str, plan: Sequence[JobSpec], warnings: Sequence[str]) -> None:
    print(f"# resolved config (hash {cfg.hash()})")
    print(cfg.dump_yaml())
    print(f"# {len(plan)} job(s) on cluster={cluster}; nothing submitted (--dry-run)")
    for warning in warnings:
        print(f"# WARNING: a real submission would stop here: {warning}")
    for spec in plan:
        rnd = f" round {spec.round}" if stages.STAGES[spec.stage].per_round else ""
        done = (
            " [DONE.json matches: not submitted without --force]"
            if stages.is_done(stages.with_round(cfg, spec.round), spec.stage)
            else ""
        )
        print(f"\n## job {spec.name}: stage {spec.stage}{rnd}, {describe_shape(spec)}{done}")
        if picture := step_picture(cfg, spec):
            print(f"# {picture}")
        if cluster == "slurm":
            dep = f"afterok:<job id of {spec.after}>" if spec.after else None
            for line in script_lines(slurm_params(spec, cfg, dep), log_folder(cfg, spec), spec.array):
                print(line)
        else:
            print(
                f"{cluster} executor: tasks_per_node={spec.shape.tasks_per_node} "
                f"gpus_per_node={spec.shape.gpus_per_node} timeout_min={spec.shape.time_min}"
                + (f" (starts after {spec.after} succeeded)" if spec.after else ""),
            )


def submit_or_run(args: argparse.Namespace, config_file: str, job_cls: type | None, prog: str) -> None:
    """Resolve, then submit or run the jobs (after a dry run: nothing) and say where to follow them."""
    cfg, cluster, plan = resolve(args, config_file)
    if args.dry_run:
        print_dry_run(cfg, cluster, plan, dry_run_warnings(args, config_file, cfg, cluster, plan))
        return
    if not args.force:
        plan, finished = drop_done(cfg, plan)
        for spec in finished:
            print(f"  {spec.name:22s} already done (DONE.json matches the config): not submitted")
    cfg.save(run_root(cfg) / "config.yaml")
    print(f"slade_dist: {len(plan)} job(s) on cluster={cluster}, run dir {run_root(cfg)}", flush=True)
    if cluster == "slurm":
        subs = submit_slurm(cfg, plan, args.force, job_cls)
    else:
        subs = run_here(cfg, plan, args.force, cluster, job_cls)
    print_follow_up(cfg, cluster, subs, write_record(cfg, cluster, subs), prog)


def print_follow_up(cfg: Config, cluster: str, subs: Sequence[Submitted], record: Path, prog: str) -> None:
    print(f"record:      {record}")
    metrics = run_root(cfg) / "eval" / "metrics.json"
    if cluster != "slurm" and metrics.exists():
        from ..eval.report import format_table  # only a local chain that ran eval needs it

        print(format_table(json.loads(metrics.read_text())))
    if cluster == "slurm" and subs:
        again = f"{prog} --config {run_root(cfg) / 'config.yaml'}"
        print(f"status:      {again} --status   (squeue --name slade-{run_name(cfg)}-<job>, sacct -j ...)")
        print(f"cancel:      {again} --cancel   (every job of every launch of this run)")
    print(f"tensorboard: tensorboard --logdir {run_root(cfg) / 'tb'}")


def status_or_cancel(args: argparse.Namespace, config_file: str) -> None:
    cfg = load_config(config_file, args.overrides, check_paths=False)  # only run.dir matters
    if args.cancel:
        cancel_chain(cfg)
    else:
        print_status(cfg)
