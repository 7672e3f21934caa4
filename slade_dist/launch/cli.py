"""The launcher's command line: `python launch/submit.py --stage STAGE [--config FILE] [k=v ...]`.

Owns: the arguments (and their --help, with every stage and config key), which config file a
command without --config takes (the run directory's saved config, else configs/demo.yaml),
resolving the arguments into a config + cluster + plan with every check done before anything is
submitted, `--dry-run` (resolved config, each job's #SBATCH, setup and srun lines, and every problem
a real submission would stop at, as warnings: it needs neither sbatch nor the data), choosing the
cluster (slurm when sbatch is on PATH or a job spans nodes, else local), dropping finished stages,
`--status` / `--cancel` (status.py), the closing hints (status, cancel, tensorboard, the metrics
table of a local chain) and turning every known failure into exit code 2 with one clear line.
Tests: tests/unit/test_launch.py (dry run, errors, --help, --shards, the debug cluster, shipped
configs), tests/integration/test_launch_local.py, tests/integration/test_slurm.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import stages
from ..config import REPO_ROOT, Config, ConfigError, describe_sections, load_config
from ..errors import DEBUG_FLAG, DEBUG_HELP, exit_on_user_error
from .checks import (
    check_flag_ranges,
    check_flags_fit_stage,
    check_inputs,
    check_sbatch_extra,
    check_shard_ids,
    check_stages_exist,
    check_step_batches,
    input_problems,
    missing_input_paths,
    step_picture,
)
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
    run_name,
    run_root,
)
from .slurm import check_shape_fits, query_partition, script_lines, slurm_params, submit_slurm
from .status import cancel_chain, print_status, write_record

CLUSTERS = ("slurm", "local", "debug")
PROG = "launch/submit.py"
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


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


EXAMPLES = """examples:
  python launch/submit.py --stage all --config configs/demo.yaml --cluster local
  python launch/submit.py --stage student --nodes 8 --gpus-per-node 8 --config configs/cub.yaml
  python launch/submit.py --stage all --config configs/web.yaml --array 64 --dry-run
  python launch/submit.py --stage embed --config configs/web.yaml --shards 0-9,12 --cluster local
  python launch/submit.py --status --config configs/cub.yaml     (or: --status run.dir=runs/cub)
  python launch/submit.py --cancel --config configs/cub.yaml
  python launch/submit.py --stage all --config configs/cub.yaml launch.setup='["module load cuda/12.1"]' \
      launch.sbatch_extra.exclusive=true launch.eval.sbatch_extra.exclusive=false"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit slade_dist stages as Slurm jobs (submitit), or run them on this machine.",
        epilog="stages:\n"
        + "\n".join(f"  {n:9s} {s.help}" for n, s in stages.STAGES.items())
        + "\n  all       [curate ->] pretrain -> teacher -> R x (embed -> cluster -> student) -> eval, as jobs\n"
        "            linked by afterok dependencies, each with the shape cfg.launch.<stage>\n"
        "            (cfg.launch.cluster_job for the cluster stage)\n\n"
        "Slurm jobs are named slade-<run name>-<job> (run name: the last part of run.dir), e.g.\n"
        "slade-cub-round1-embed: `squeue --name`, `scancel --name` or --status / --cancel.\n"
        "More sbatch options: launch.sbatch_extra (every job) and launch.<stage>.sbatch_extra;\n"
        "shell lines before srun (module loads): launch.setup.\n\n"
        "config overrides (section.key=value), sections and keys:\n" + describe_sections() + "\n\n" + EXAMPLES,
    )
    p.add_argument(
        "--stage",
        choices=[*stages.STAGES, "all"],
        metavar="STAGE",
        help=f"one of {', '.join(stages.STAGES)} or all (the whole chain); not with --status / --cancel",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="run file layered over configs/defaults.yaml (default: <run.dir>/config.yaml, the config the "
        "run last saved, when it exists, else configs/demo.yaml)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4 launch.student.nodes=4"
    )
    _shape_flags(p)
    _slurm_flags(p)
    _run_flags(p)
    p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return p


def _shape_flags(p: argparse.ArgumentParser) -> None:
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


def _slurm_flags(p: argparse.ArgumentParser) -> None:
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
        "Default: launch.cluster, else slurm when sbatch is on PATH or a job asks for more than one "
        "node, else local",
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
    s.add_argument(
        "--status",
        action="store_true",
        help="show the jobs of every launch of the run (<run>/logs/submitted.json) with their state and "
        "nodes (sacct, through submitit); submits nothing",
    )
    s.add_argument(
        "--cancel", action="store_true", help="cancel every job of every launch of the run that has not ended"
    )


def _run_flags(p: argparse.ArgumentParser) -> None:
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
        help="print the resolved config, each job's #SBATCH, setup and srun lines, and what a real submission "
        "would stop at (missing data, partition too small) as warnings; submit nothing. Needs neither "
        "sbatch nor the data",
    )


# ---------------------------------------------------------------------------------- resolving
def pick_config_file(args: argparse.Namespace) -> tuple[str, str]:
    """--config, else the run directory's saved config, else the demo's; and why (for the user)."""
    if args.config:
        return args.config, ""
    # run.dir from defaults + overrides: the run whose saved config to take
    run_dir = Path(load_config(None, config_overrides(args), check_paths=False).run.dir)
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


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The k=v overrides plus the flags that are config keys (--rounds, --partition, ...)."""
    overrides = list(args.overrides)
    if args.rounds is not None:
        overrides.append(f"run.rounds={args.rounds}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key) is not None:
            overrides.append(f"launch.{key}={getattr(args, key)}")
    return overrides


def check_cluster_fits(cluster: str, plan: Sequence[JobSpec], cfg: Config) -> None:
    if cluster != "slurm":
        for spec in plan:
            check_local_shape(spec)
        return
    if not shutil.which("sbatch"):
        widest = max(plan, key=lambda spec: spec.shape.nodes)
        raise LaunchError(
            f"--cluster slurm (job {widest.name} asks for {widest.shape.nodes} node(s)) but `sbatch` is not "
            "on PATH: submit from a Slurm login node, or run here with --cluster local --nodes 1 "
            "(--dry-run shows the jobs' scripts anywhere)"
        )
    part = query_partition(cfg.launch.partition)
    for spec in plan:
        check_shape_fits(spec, part)


def check_data(cfg: Config, plan: Sequence[JobSpec]) -> None:
    """The checks that need the run's data (a dry run only warns about them)."""
    check_inputs(cfg, plan)
    check_shard_ids(cfg, plan)
    check_stages_exist(plan)


def resolve(args: argparse.Namespace, config_file: str) -> tuple[Config, str, list[JobSpec]]:
    """Load the config, plan the jobs and check everything that can be checked before submitting."""
    check_flag_ranges(args)
    # a dry run shows the plan of a run whose data is not there yet (dry_run_warnings lists it)
    cfg = load_config(config_file, config_overrides(args), check_paths=not args.dry_run)
    check_flags_fit_stage(args)
    plan = plan_jobs(cfg, args.stage, args)
    check_sbatch_extra(cfg, plan)
    check_step_batches(cfg, plan)  # also in a dry run: such a job could never start
    cluster = pick_cluster(args.cluster, cfg, plan)
    if not args.dry_run:
        check_cluster_fits(cluster, plan, cfg)
        check_data(cfg, plan)
    return cfg, cluster, plan


# ---------------------------------------------------------------------------------- dry run
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
        warnings += _problem(load_config, config_file, config_overrides(args))
    warnings += input_problems(cfg, plan, skip_missing=True)
    if not warnings:  # --shards against the unlabeled index, which must be there to read
        warnings += _problem(check_shard_ids, cfg, plan)
    warnings += _problem(check_stages_exist, plan)
    return list(dict.fromkeys(warnings + fit_warnings(cluster, plan, cfg)))


def fit_warnings(cluster: str, plan: Sequence[JobSpec], cfg: Config) -> list[str]:
    """Each job that would not fit where it is headed (one sinfo query for all of them)."""
    if cluster != "slurm":
        return [w for spec in plan for w in _problem(check_local_shape, spec)]
    if not shutil.which("sbatch"):
        return ["sbatch is not on PATH here: the jobs' sizes were not checked against a partition"]
    try:
        part = query_partition(cfg.launch.partition)
    except LaunchError as e:
        return [str(e)]
    return [w for spec in plan for w in _problem(check_shape_fits, spec, part)]


def print_dry_run(cfg: Config, cluster: str, plan: Sequence[JobSpec], warnings: Sequence[str], out=None) -> None:
    out = out or sys.stdout
    print(f"# resolved config (hash {cfg.hash()})", file=out)
    print(cfg.dump_yaml(), file=out)
    print(f"# {len(plan)} job(s) on cluster={cluster}; nothing submitted (--dry-run)", file=out)
    for warning in warnings:
        print(f"# WARNING: a real submission would stop here: {warning}", file=out)
    for spec in plan:
        rnd = f" round {spec.round}" if stages.STAGES[spec.stage].per_round else ""
        done = (
            " [DONE.json matches: not submitted without --force]"
            if stages.is_done(stages.with_round(cfg, spec.round), spec.stage)
            else ""
        )
        print(f"\n## job {spec.name}: stage {spec.stage}{rnd}, {describe_shape(spec)}{done}", file=out)
        if picture := step_picture(cfg, spec):
            print(f"# {picture}", file=out)
        if cluster == "slurm":
            dep = f"afterok:<job id of {spec.after}>" if spec.after else None
            for line in script_lines(slurm_params(spec, cfg, dep), log_folder(cfg, spec), spec.array):
                print(line, file=out)
        else:
            print(
                f"{cluster} executor: tasks_per_node={spec.shape.tasks_per_node} "
                f"gpus_per_node={spec.shape.gpus_per_node} timeout_min={spec.shape.time_min}"
                + (f" (starts after {spec.after} succeeded)" if spec.after else ""),
                file=out,
            )


# ---------------------------------------------------------------------------------- follow-up
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
        again = f"python {PROG} --config {run_root(cfg) / 'config.yaml'}"
        print(f"status:      {again} --status   (squeue --name slade-{run_name(cfg)}-<job>, sacct -j ...)")
        print(f"cancel:      {again} --cancel   (every job of every launch of this run)")
    print(f"tensorboard: tensorboard --logdir {run_root(cfg) / 'tb'}")


# ------------------------------------------------------------------------------------- main
def submit_or_run(
    args: argparse.Namespace, config_file: str, job_cls: type | None
) -> tuple[Config, str, list[Submitted], Path] | None:
    """Resolve, then submit or run the jobs; None after a dry run."""
    cfg, cluster, plan = resolve(args, config_file)
    if args.dry_run:
        print_dry_run(cfg, cluster, plan, dry_run_warnings(args, config_file, cfg, cluster, plan))
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


def status_or_cancel(args: argparse.Namespace, config_file: str) -> None:
    cfg = load_config(config_file, config_overrides(args), check_paths=False)  # only run.dir matters
    if args.cancel:
        cancel_chain(cfg)
    else:
        print_status(cfg)


def main(argv: Sequence[str] | None = None, job_cls: type | None = None, prog: str = PROG) -> int:
    """The launcher; `job_cls` replaces StageJob (tests run their probe stage through it). A user
    error (errors.py) ends it with one line `<prog>: error: ...` and exit code 2."""
    return exit_on_user_error(lambda args: _main(args, job_cls, prog), argv, prog)


def _main(argv: list[str], job_cls: type | None, prog: str) -> int:
    parser = build_parser(prog)
    args = parser.parse_intermixed_args(argv)  # overrides may sit between the flags
    if args.status and args.cancel:
        parser.error("--status and --cancel: pass one of them")
    if not (args.stage or args.status or args.cancel):
        parser.error("--stage is required (or --status / --cancel, about the jobs already submitted)")
    config_file, why = pick_config_file(args)
    if why:
        print(f"slade_dist: {why}", flush=True)
    if args.status or args.cancel:
        status_or_cancel(args, config_file)
        return 0
    launched = submit_or_run(args, config_file, job_cls)
    if launched is not None:
        print_follow_up(*launched)
    return 0
