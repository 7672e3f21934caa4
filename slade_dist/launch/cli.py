"""The launcher's command line: `python launch/submit.py --stage STAGE --config FILE [k=v ...]`.

Owns: the arguments (and their --help, with every stage and config key), resolving them into a
config + cluster + plan with every check done before anything is submitted, `--dry-run` (resolved
config + exact #SBATCH lines per job), choosing the cluster (slurm when sbatch is on PATH, else
local), dropping finished stages, `<run>/logs/submitted.json`, the closing hints (squeue,
tensorboard, the metrics table of a local chain) and turning every known failure into exit code 2
with one clear line.
Tests: tests/unit/test_launch.py (dry run, errors, --help, --shards, the debug cluster),
tests/integration/test_launch_local.py, tests/integration/test_slurm.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .. import stages
from ..config import Config, ConfigError, describe_sections, load_config
from .checks import check_flag_ranges, check_flags_fit_stage, check_inputs, check_shard_ids, check_stages_exist
from .local import check_local_shape, run_here
from .plan import (
    JobSpec,
    LaunchError,
    Submitted,
    describe_shape,
    drop_done,
    log_folder,
    parse_shard_ids,
    plan_jobs,
    run_root,
)
from .slurm import check_shape_fits, query_partition, sbatch_lines, slurm_params, submit_slurm

CLUSTERS = ("slurm", "local", "debug")
PROG = "launch/submit.py"


# -------------------------------------------------------------------------------- arguments
def shard_list(text: str) -> list[int]:
    """argparse type of --shards: a clear message instead of argparse's "invalid value"."""
    try:
        ids = parse_shard_ids(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected shard ids like 0-9,12, got {text!r} ({e})") from e
    if not ids:
        raise argparse.ArgumentTypeError(f"names no shard: {text!r}")
    return ids


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit slade_dist stages as Slurm jobs (submitit), or run them on this machine.",
        epilog="stages:\n"
        + "\n".join(f"  {n:9s} {s.help}" for n, s in stages.STAGES.items())
        + "\n  all       pretrain -> teacher -> R x (embed -> cluster -> student) -> eval, as jobs\n"
        "            linked by afterok dependencies, each with the shape cfg.launch.<stage>\n"
        "            (cfg.launch.cluster_job for the cluster stage)\n\n"
        "config overrides (section.key=value), sections and keys:\n" + describe_sections() + "\n\nexamples:\n"
        "  python launch/submit.py --stage all --config configs/demo.yaml --cluster local\n"
        "  python launch/submit.py --stage student --nodes 8 --gpus-per-node 8 --config configs/cub.yaml\n"
        "  python launch/submit.py --stage all --config configs/web.yaml --array 64 --dry-run\n"
        "  python launch/submit.py --stage embed --config configs/web.yaml --shards 0-9,12 --cluster local",
    )
    p.add_argument(
        "--stage",
        required=True,
        choices=[*stages.STAGES, "all"],
        metavar="STAGE",
        help=f"one of {', '.join(stages.STAGES)} or all (the whole chain)",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="run file layered over configs/defaults.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4 launch.student.nodes=4"
    )
    g = p.add_argument_group("job shape (overrides cfg.launch.<stage> for every job submitted)")
    g.add_argument("--nodes", type=int, help="nodes per job")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU")
    g.add_argument("--tasks-per-node", type=int, help="tasks (processes) per node; default one per GPU, 1 on CPU")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per task (data loader workers + 1)")
    g.add_argument("--mem", type=int, metavar="GB", help="memory per node in GB (0: the partition default)")
    g.add_argument(
        "--time",
        type=int,
        metavar="MIN",
        help="time limit per job in minutes; at the limit the job is requeued and resumes from its checkpoint",
    )
    s = p.add_argument_group("Slurm")
    s.add_argument("--partition", help="partition (default: launch.partition, else Slurm's default)")
    s.add_argument("--account", help="account to charge")
    s.add_argument("--qos", help="quality of service")
    s.add_argument("--constraint", help="node features, e.g. a100")
    s.add_argument(
        "--cluster",
        choices=CLUSTERS,
        help="slurm: sbatch through submitit; local: this machine, "
        "one process per task, jobs one after the other; debug: in this process (pdb works). "
        "Default: launch.cluster, else slurm when sbatch is on PATH, else local",
    )
    s.add_argument(
        "--array",
        type=int,
        default=0,
        metavar="N",
        help="embed as a job array of N parts (disjoint "
        "shard subsets), followed by one embed job that marks the stage done",
    )
    s.add_argument(
        "--shards",
        type=shard_list,
        metavar="IDS",
        help="with --stage embed: embed only these "
        "unlabeled shard ids, e.g. 0-9,12 (shards already embedded are skipped; the stage is "
        "marked done only by a run over every shard)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--rounds", type=int, help="self-training rounds R (run.rounds)")
    r.add_argument(
        "--force",
        action="store_true",
        help="rerun stages even when their DONE.json matches (trainers still resume from their latest checkpoint)",
    )
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the exact Slurm parameters of every job; submit nothing",
    )
    return p


# ---------------------------------------------------------------------------------- resolving
def pick_cluster(requested: str | None, cfg: Config) -> str:
    choice = requested or cfg.launch.cluster
    if choice == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return choice


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The k=v overrides plus the flags that are config keys (--rounds, --partition, ...)."""
    overrides = list(args.overrides)
    if args.rounds is not None:
        overrides.append(f"run.rounds={args.rounds}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key) is not None:
            overrides.append(f"launch.{key}={getattr(args, key)}")
    return overrides


def check_cluster_fits(cluster: str, plan: Sequence[JobSpec], cfg: Config, dry_run: bool) -> None:
    if cluster != "slurm":
        for spec in plan:
            check_local_shape(spec)
    elif shutil.which("sbatch"):
        part = query_partition(cfg.launch.partition)
        for spec in plan:
            check_shape_fits(spec, part)
    elif not dry_run:
        raise LaunchError("--cluster slurm but `sbatch` is not on PATH: use --cluster local on this machine")


def check_data(cfg: Config, plan: Sequence[JobSpec]) -> None:
    """The checks that need the run's data (a dry run only warns about them)."""
    check_inputs(cfg, plan)
    check_shard_ids(cfg, plan)
    check_stages_exist(plan)


def resolve(args: argparse.Namespace) -> tuple[Config, str, list[JobSpec]]:
    """Load the config, plan the jobs and check everything that can be checked before submitting."""
    check_flag_ranges(args)
    cfg = load_config(args.config, config_overrides(args))
    check_flags_fit_stage(args)
    cluster = pick_cluster(args.cluster, cfg)
    plan = plan_jobs(cfg, args.stage, args)
    check_cluster_fits(cluster, plan, cfg, args.dry_run)
    if not args.dry_run:  # a dry run also shows the plan of a run whose data is not there yet
        check_data(cfg, plan)
    return cfg, cluster, plan


# ---------------------------------------------------------------------------------- dry run
def print_dry_run(cfg: Config, cluster: str, plan: Sequence[JobSpec], out=None) -> None:
    out = out or sys.stdout
    print(f"# resolved config (hash {cfg.hash()})", file=out)
    print(cfg.dump_yaml(), file=out)
    print(f"# {len(plan)} job(s) on cluster={cluster}; nothing submitted (--dry-run)", file=out)
    try:
        check_data(cfg, plan)
    except LaunchError as e:
        print(f"# WARNING: a real submission would stop here: {e}", file=out)
    for spec in plan:
        rnd = f" round {spec.round}" if stages.STAGES[spec.stage].per_round else ""
        done = (
            " [DONE.json matches: not submitted without --force]"
            if stages.is_done(stages.with_round(cfg, spec.round), spec.stage)
            else ""
        )
        print(f"\n## job {spec.name}: stage {spec.stage}{rnd}, {describe_shape(spec)}{done}", file=out)
        if cluster == "slurm":
            dep = f"afterok:<job id of {spec.after}>" if spec.after else None
            for line in sbatch_lines(slurm_params(spec, cfg, dep), log_folder(cfg, spec), spec.array):
                print(line, file=out)
        else:
            print(
                f"{cluster} executor: tasks_per_node={spec.shape.tasks_per_node} "
                f"gpus_per_node={spec.shape.gpus_per_node} timeout_min={spec.shape.time_min}"
                + (f" (starts after {spec.after} succeeded)" if spec.after else ""),
                file=out,
            )


# ---------------------------------------------------------------------------------- records
def write_record(cfg: Config, cluster: str, subs: Sequence[Submitted]) -> Path:
    """<run>/logs/submitted.json: what was submitted where (for people and tests)."""
    path = run_root(cfg) / "logs" / "submitted.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "cluster": cluster,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "jobs": [
            {
                "name": s.spec.name,
                "stage": s.spec.stage,
                "round": s.spec.round,
                "job_id": s.job_id,
                "after": s.spec.after,
                "array": s.spec.array,
                "shard_ids": list(s.spec.shard_ids) if s.spec.shard_ids is not None else None,
                "stdout": s.stdout,
            }
            for s in subs
        ],
    }
    path.write_text(json.dumps(body, indent=2))
    return path


def print_metrics(cfg: Config) -> None:
    """The eval stage's table, when the chain that just ran here produced one."""
    # imported here: only a local chain that ran eval needs it
    from ..eval.report import format_table

    metrics = run_root(cfg) / "eval" / "metrics.json"
    if metrics.exists():
        print(format_table(json.loads(metrics.read_text())))


def print_follow_up(cfg: Config, cluster: str, subs: Sequence[Submitted], record: Path) -> None:
    print(f"record:      {record}")
    if cluster != "slurm":
        print_metrics(cfg)
    if cluster == "slurm" and subs:
        print(f"follow:      squeue -j {','.join(s.job_id for s in subs)}   (sacct -j ... once done)")
    print(f"tensorboard: tensorboard --logdir {run_root(cfg) / 'tb'}")


def print_error(prog: str, error: Exception) -> None:
    """The first line after `<prog>: error: ` (argparse's own format), any further lines indented."""
    lines = str(error).splitlines()
    print(f"{prog}: error: {lines[0]}", file=sys.stderr)
    for extra in lines[1:]:
        print(f"  {extra}", file=sys.stderr)


# ------------------------------------------------------------------------------------- main
def submit_or_run(args: argparse.Namespace, job_cls: type | None) -> tuple[Config, str, list[Submitted], Path] | None:
    """Resolve, then submit or run the jobs; None after a dry run."""
    cfg, cluster, plan = resolve(args)
    if args.dry_run:
        print_dry_run(cfg, cluster, plan)
        return None
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
    return cfg, cluster, subs, write_record(cfg, cluster, subs)


def main(argv: Sequence[str] | None = None, job_cls: type | None = None, prog: str = PROG) -> int:
    """The launcher; `job_cls` replaces StageJob (tests run their probe stage through it)."""
    parser = build_parser(prog)
    args = parser.parse_intermixed_args(argv)  # overrides may sit between the flags
    try:
        launched = submit_or_run(args, job_cls)
    except (ConfigError, LaunchError) as e:
        print_error(parser.prog, e)
        return 2
    if launched is not None:
        print_follow_up(*launched)
    return 0
