#!/usr/bin/env python
"""slade_dist launcher: stages -> Slurm jobs through submitit (or local / in-process runs).

Owns: the command line users run (`python launch/submit.py --stage STAGE --config FILE [k=v ...]`),
turning a stage (or `all`: pretrain -> teacher -> R x (embed -> cluster -> student) -> eval) into
jobs, each with its own node/GPU shape (cfg.launch.<stage>, flags override), linked by `afterok`
dependencies; checking everything it can BEFORE submitting anything (stage names, config keys,
input paths, the partition's size through `sinfo`); `--dry-run` (resolved config + exact sbatch
lines per job); and `--cluster local|debug`, which runs the same chain on this machine job after
job. What runs inside each task is slade_dist.jobs.StageJob. This file never imports torch models.
Tests: tests/unit/test_submit.py, tests/integration/test_launch_local.py,
tests/integration/test_slurm.py.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python launch/submit.py` from the repo root or anywhere
    sys.path.insert(0, str(REPO_ROOT))

from slade_dist import stages  # noqa: E402
from slade_dist.config import Config, ConfigError, JobShape, describe_sections, load_config  # noqa: E402

CLUSTERS = ("slurm", "local", "debug")
# a long training under a short time limit is requeued at every limit (preemptions do not count);
# submitit's default of 3 would end a 24 h run under a 4 h limit
MAX_TIMEOUT_REQUEUES = 100


class LaunchError(RuntimeError):
    """A problem found before submitting (or while running locally): one clear line for the user."""


@dataclass
class JobSpec:
    """One job of the plan. `after` names the job it waits for (afterok)."""

    name: str                 # unique in the plan: "teacher", "round1-embed", ...
    stage: str
    round: int
    shape: JobShape           # resolved: tasks_per_node > 0
    after: str | None = None
    array: int = 0            # > 0: embed job array with this many parts


# ---------------------------------------------------------------------------------- planning
def shape_key(stage: str) -> str:
    """cfg.launch field of a stage's job shape (`cluster` already names the executor kind)."""
    return "cluster_job" if stage == "cluster" else stage


def resolve_shape(cfg: Config, stage: str, args: argparse.Namespace) -> JobShape:
    """cfg.launch.<stage> with the command-line flags on top; tasks_per_node 0 -> one per GPU (or 1)."""
    # a stage registered without a launch.<stage> section gets the default shape
    shape = copy.deepcopy(getattr(cfg.launch, shape_key(stage), None) or JobShape())
    for flag, field in [("nodes", "nodes"), ("gpus_per_node", "gpus_per_node"),
                        ("tasks_per_node", "tasks_per_node"), ("cpus_per_task", "cpus_per_task"),
                        ("mem", "mem_gb"), ("time", "time_min")]:
        value = getattr(args, flag, None)
        if value is not None:
            setattr(shape, field, value)
    if shape.tasks_per_node == 0:
        shape.tasks_per_node = shape.gpus_per_node or 1
    return shape


def job_name(stage: str, round_: int) -> str:
    return f"round{round_}-{stage}" if stages.STAGES[stage].per_round else stage


def plan_jobs(cfg: Config, stage: str, args: argparse.Namespace) -> list[JobSpec]:
    """The jobs to submit, in dependency order (each waits for the one before it)."""
    if stage == "all":
        steps = stages.pipeline_plan(cfg.run.rounds)
    else:
        steps = [(stage, cfg.run.round if stages.STAGES[stage].per_round else 1)]
    plan: list[JobSpec] = []
    for st, rnd in steps:
        after = plan[-1].name if plan else None
        name = job_name(st, rnd)
        if st == "embed" and args.array:
            # the array embeds disjoint parts; the normal embed job after it finds every shard
            # done, and writes DONE.json (array tasks never do: one would mark the stage done early)
            plan.append(JobSpec(name + "-array", st, rnd, resolve_shape(cfg, st, args), after, args.array))
            after = plan[-1].name
        plan.append(JobSpec(name, st, rnd, resolve_shape(cfg, st, args), after))
    return plan


def drop_done(cfg: Config, plan: Sequence[JobSpec]) -> tuple[list[JobSpec], list[JobSpec]]:
    """Split the plan into jobs to submit and jobs whose stage's DONE.json already matches the config.

    A kept job that waited for a dropped one waits for the last kept job before it instead (none:
    it starts at once). A job submitted anyway would exit at once too; not submitting it saves a
    job start (and a queue wait) per finished stage.
    """
    kept: list[JobSpec] = []
    dropped: list[JobSpec] = []
    for spec in plan:
        if stages.is_done(round_config(cfg, spec.round), spec.stage):
            dropped.append(spec)
            continue
        kept.append(dataclasses.replace(spec, after=kept[-1].name if kept and spec.after else None))
    return kept, dropped


def round_config(cfg: Config, round_: int) -> Config:
    out = copy.deepcopy(cfg)
    out.run.round = round_
    return out


# -------------------------------------------------------------------------------- validation
def pick_cluster(requested: str | None, cfg: Config) -> str:
    choice = requested or cfg.launch.cluster
    if choice == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return choice


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


@dataclass
class PartitionInfo:
    name: str
    nodes: int
    cpus_per_node: int        # the smallest node's CPU count
    gpus_per_node: int        # the smallest node's GPU count (gres gpu)


def _gres_gpus(gres: str) -> int:
    """'gpu:4' / 'gpu:a100:8(S:0-1)' / '(null)' -> GPUs per node."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def query_partition(partition: str) -> PartitionInfo:
    """Ask `sinfo` how big the partition (or the default one) is."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%G"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"cannot ask Slurm for its partitions (sinfo failed: {e})") from e
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 3]
    names = sorted({p.rstrip("*") for _, p, _, _ in rows})
    if not partition:
        default = [p.rstrip("*") for _, p, _, _ in rows if p.endswith("*")]
        if not default:
            raise LaunchError(f"Slurm has no default partition: pass --partition (one of {', '.join(names)})")
        partition = default[0]
    mine = {node: (int(c), _gres_gpus(g)) for node, p, c, g in rows if p.rstrip("*") == partition}
    if not mine:
        raise LaunchError(f"partition {partition!r} does not exist; partitions: {', '.join(names) or 'none'}")
    return PartitionInfo(partition, len(mine), min(c for c, _ in mine.values()),
                         min(g for _, g in mine.values()))


def check_shape_fits(spec: JobSpec, part: PartitionInfo) -> None:
    """A job larger than the partition would stay PENDING forever: refuse it now."""
    s = spec.shape
    if s.nodes > part.nodes:
        raise LaunchError(f"job {spec.name} asks for {s.nodes} nodes but partition {part.name!r} has "
                          f"{part.nodes}: lower --nodes (or launch.{shape_key(spec.stage)}.nodes)")
    if s.tasks_per_node * s.cpus_per_task > part.cpus_per_node:
        raise LaunchError(f"job {spec.name} asks for {s.tasks_per_node} tasks x {s.cpus_per_task} CPUs per "
                          f"node but nodes of partition {part.name!r} have {part.cpus_per_node} CPUs")
    if s.gpus_per_node > part.gpus_per_node:
        raise LaunchError(f"job {spec.name} asks for {s.gpus_per_node} GPUs per node but nodes of partition "
                          f"{part.name!r} have {part.gpus_per_node}")


def check_local_shape(spec: JobSpec) -> None:
    if spec.shape.nodes > 1:
        raise LaunchError(f"job {spec.name} asks for {spec.shape.nodes} nodes but --cluster local/debug "
                          f"runs on this one machine: use --nodes 1 or --cluster slurm")


# ------------------------------------------------------------------------------- parameters
def slurm_params(spec: JobSpec, cfg: Config, dependency: str | None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of one job (what becomes its #SBATCH lines)."""
    s = spec.shape
    params: dict[str, Any] = {
        "job_name": f"slade-{spec.name}", "nodes": s.nodes, "ntasks_per_node": s.tasks_per_node,
        "cpus_per_task": s.cpus_per_task, "time": s.time_min,
        # USR2 this long before the time limit: submitit then checkpoints (= requeues) the job
        "signal_delay_s": min(90, max(10, s.time_min * 60 // 10)),
        # one task failing (e.g. rank 0 cannot open the rendezvous port) ends the whole step: the other
        # tasks would otherwise wait in init_process_group until its timeout, holding the nodes
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb:
        params["mem"] = f"{s.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cfg.launch, key):
            params[key] = getattr(cfg.launch, key)
    extra: dict[str, Any] = {}
    if cfg.launch.requeue:
        extra["requeue"] = True
    if dependency:
        params["dependency"] = dependency
        # a failed upstream job cancels this one instead of leaving it pending forever
        extra["kill-on-invalid-dep"] = "yes"
    if extra:
        params["additional_parameters"] = extra
    if spec.array:
        params["array_parallelism"] = spec.array
    return params


def sbatch_lines(params: dict[str, Any], folder: Path, array: int = 0) -> list[str]:
    """The exact #SBATCH lines submitit will write for these parameters (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command="python -u -m submitit.core._submit <folder>", folder=str(folder),
                               map_count=array or None, **params)
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def run_root(cfg: Config) -> Path:
    return Path(cfg.run.dir).resolve()


def log_folder(cfg: Config, spec: JobSpec) -> Path:
    return run_root(cfg) / "logs" / spec.name


# ------------------------------------------------------------------------------- submission
@dataclass
class Submitted:
    spec: JobSpec
    job_id: str
    stdout: str
    jobs: list[Any]


def make_job(cfg: Config, spec: JobSpec, force: bool, job_cls: type | None = None) -> Any:
    from slade_dist.jobs import StageJob

    cls = job_cls or StageJob
    return cls(cfg, spec.stage, spec.round, force=force, cpu=spec.shape.gpus_per_node == 0,
               array_parts=spec.array)


def submit_slurm(cfg: Config, plan: Sequence[JobSpec], force: bool, job_cls: type | None = None,
                 out=None) -> list[Submitted]:
    """Submit every job at once; each waits (afterok) for the one before it."""
    import submitit

    out = out or sys.stdout

    done: dict[str, Submitted] = {}
    for spec in plan:
        dep = None
        if spec.after:
            dep = f"afterok:{done[spec.after].job_id.split('_')[0]}"  # an array: all its tasks
        executor = submitit.SlurmExecutor(folder=log_folder(cfg, spec), max_num_timeout=MAX_TIMEOUT_REQUEUES)
        executor.update_parameters(**slurm_params(spec, cfg, dep))
        job = make_job(cfg, spec, force, job_cls)
        jobs = executor.map_array(job, list(range(spec.array))) if spec.array else [executor.submit(job)]
        sub = Submitted(spec, jobs[0].job_id.split("_")[0] if spec.array else jobs[0].job_id,
                        str(jobs[0].paths.stdout), jobs)
        done[spec.name] = sub
        print(f"  {spec.name:22s} job {sub.job_id:>8s}  {describe_shape(spec)}"
              f"{f'  afterok {done[spec.after].job_id}' if spec.after else ''}\n"
              f"  {'':22s} log {sub.stdout}", file=out, flush=True)
    return list(done.values())


def run_here(cfg: Config, plan: Sequence[JobSpec], force: bool, cluster: str, job_cls: type | None = None,
             out=None) -> list[Submitted]:
    """--cluster local/debug: run the jobs one after the other on this machine (no dependencies to
    wait for: the next starts when the previous one succeeded)."""
    import submitit

    out = out or sys.stdout

    finished: list[Submitted] = []
    for spec in plan:
        folder = log_folder(cfg, spec)
        if cluster == "debug":
            executor: Any = submitit.DebugExecutor(folder=folder)
        else:
            executor = submitit.LocalExecutor(folder=folder)
            executor.update_parameters(tasks_per_node=spec.shape.tasks_per_node, nodes=1,
                                       gpus_per_node=spec.shape.gpus_per_node,
                                       timeout_min=spec.shape.time_min)
        job = make_job(cfg, spec, force, job_cls)
        t0 = time.time()
        jobs = executor.map_array(job, list(range(spec.array))) if spec.array else [executor.submit(job)]
        sub = Submitted(spec, jobs[0].job_id, str(jobs[0].paths.stdout), jobs)
        print(f"  {spec.name:22s} job {sub.job_id:>8s}  {describe_shape(spec)}\n"
              f"  {'':22s} log {sub.stdout}", file=out, flush=True)
        for j in jobs:
            try:
                j.results()
            except Exception as e:  # the job's own traceback is in its log
                raise LaunchError(f"job {spec.name} ({j.job_id}) failed: {job_error_line(e)} "
                                  f"(full log: {j.paths.stderr})") from e
        print(f"  {'':22s} finished in {time.time() - t0:.1f}s", file=out, flush=True)
        finished.append(sub)
    return finished


def job_error_line(error: BaseException) -> str:
    """The `SomeError: message` line of a failed job's trace (submitit wraps it in prose)."""
    lines = [ln.strip() for ln in str(error).splitlines()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if ":" in ln and head.replace(".", "").isidentifier() and (head.endswith(("Error", "Exception"))
                                                                    or "." in head):
            return ln
    return lines[0] if lines else type(error).__name__


def describe_shape(spec: JobSpec) -> str:
    s = spec.shape
    gpus = f", {s.gpus_per_node} GPU/node" if s.gpus_per_node else ""
    arr = f", array of {spec.array}" if spec.array else ""
    return f"{s.nodes} node(s) x {s.tasks_per_node} task(s), {s.cpus_per_task} CPU/task{gpus}{arr}"


def write_record(cfg: Config, cluster: str, subs: Sequence[Submitted]) -> Path:
    """<run>/logs/submitted.json: what was submitted where (for people and tests)."""
    path = run_root(cfg) / "logs" / "submitted.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"cluster": cluster, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "jobs": [{"name": s.spec.name, "stage": s.spec.stage, "round": s.spec.round, "job_id": s.job_id,
                      "after": s.spec.after, "array": s.spec.array, "stdout": s.stdout} for s in subs]}
    path.write_text(json.dumps(body, indent=2))
    return path


# ------------------------------------------------------------------------------------ the CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/submit.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit slade_dist stages as Slurm jobs (submitit), or run them on this machine.",
        epilog="stages:\n" + "\n".join(f"  {n:9s} {s.help}" for n, s in stages.STAGES.items())
        + "\n  all       pretrain -> teacher -> R x (embed -> cluster -> student) -> eval, as jobs\n"
          "            linked by afterok dependencies, each with the shape cfg.launch.<stage>\n"
          "            (cfg.launch.cluster_job for the cluster stage)\n\n"
          "config overrides (section.key=value), sections and keys:\n" + describe_sections()
        + "\n\nexamples:\n"
          "  python launch/submit.py --stage all --config configs/demo.yaml --cluster local\n"
          "  python launch/submit.py --stage student --nodes 8 --gpus-per-node 8 --config configs/cub.yaml\n"
          "  python launch/submit.py --stage all --config configs/web.yaml --array 64 --dry-run")
    p.add_argument("--stage", required=True, choices=[*stages.STAGES, "all"], metavar="STAGE",
                   help=f"one of {', '.join(stages.STAGES)} or all (the whole chain)")
    p.add_argument("--config", required=True, metavar="FILE", help="run file layered over configs/defaults.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.lr=3e-4 launch.student.nodes=4")
    g = p.add_argument_group("job shape (overrides cfg.launch.<stage> for every job submitted)")
    g.add_argument("--nodes", type=int, help="nodes per job")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU")
    g.add_argument("--tasks-per-node", type=int, help="tasks (processes) per node; default one per GPU, 1 on CPU")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per task (data loader workers + 1)")
    g.add_argument("--mem", type=int, metavar="GB", help="memory per node in GB (0: the partition default)")
    g.add_argument("--time", type=int, metavar="MIN", help="time limit per job in minutes; at the limit the "
                   "job is requeued and resumes from its checkpoint")
    s = p.add_argument_group("Slurm")
    s.add_argument("--partition", help="partition (default: launch.partition, else Slurm's default)")
    s.add_argument("--account", help="account to charge")
    s.add_argument("--qos", help="quality of service")
    s.add_argument("--constraint", help="node features, e.g. a100")
    s.add_argument("--cluster", choices=CLUSTERS, help="slurm: sbatch through submitit; local: this machine, "
                   "one process per task, jobs one after the other; debug: in this process (pdb works). "
                   "Default: launch.cluster, else slurm when sbatch is on PATH, else local")
    s.add_argument("--array", type=int, default=0, metavar="N", help="embed as a job array of N parts (disjoint "
                   "shard subsets), followed by one embed job that marks the stage done")
    r = p.add_argument_group("run")
    r.add_argument("--rounds", type=int, help="self-training rounds R (run.rounds)")
    r.add_argument("--force", action="store_true", help="rerun stages even when their DONE.json matches "
                   "(trainers still resume from their latest checkpoint)")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and the exact Slurm "
                   "parameters of every job; submit nothing")
    return p


def resolve(args: argparse.Namespace) -> tuple[Config, str, list[JobSpec]]:
    """Load the config, plan the jobs and check everything that can be checked before submitting."""
    for flag in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "time", "rounds", "array"):
        value = getattr(args, flag)
        minimum = 0 if flag in ("gpus_per_node", "tasks_per_node", "mem", "array") else 1
        if value is not None and value < minimum:
            raise LaunchError(f"--{flag.replace('_', '-')} must be >= {minimum}, got {value}")
    overrides = list(args.overrides)
    if args.rounds is not None:
        overrides.append(f"run.rounds={args.rounds}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key) is not None:
            overrides.append(f"launch.{key}={getattr(args, key)}")
    cfg = load_config(args.config, overrides)
    if args.array and args.stage not in ("embed", "all"):
        raise LaunchError(f"--array applies to the embed stage, not {args.stage!r}")
    cluster = pick_cluster(args.cluster, cfg)
    plan = plan_jobs(cfg, args.stage, args)
    if cluster == "slurm":
        if shutil.which("sbatch"):
            part = query_partition(cfg.launch.partition)
            for spec in plan:
                check_shape_fits(spec, part)
        elif not args.dry_run:
            raise LaunchError("--cluster slurm but `sbatch` is not on PATH: use --cluster local on this machine")
    else:
        for spec in plan:
            check_local_shape(spec)
    if not args.dry_run:  # a dry run also shows the plan of a run whose data is not there yet
        check_inputs(cfg, plan)
        check_stages_exist(plan)
    return cfg, cluster, plan


def print_dry_run(cfg: Config, cluster: str, plan: Sequence[JobSpec], out=None) -> None:
    out = out or sys.stdout
    print(f"# resolved config (hash {cfg.hash()})", file=out)
    print(cfg.dump_yaml(), file=out)
    print(f"# {len(plan)} job(s) on cluster={cluster}; nothing submitted (--dry-run)", file=out)
    try:
        check_inputs(cfg, plan)
        check_stages_exist(plan)
    except LaunchError as e:
        print(f"# WARNING: a real submission would stop here: {e}", file=out)
    for spec in plan:
        rnd = f" round {spec.round}" if stages.STAGES[spec.stage].per_round else ""
        done = " [DONE.json matches: not submitted without --force]" if stages.is_done(
            round_config(cfg, spec.round), spec.stage) else ""
        print(f"\n## job {spec.name}: stage {spec.stage}{rnd}, {describe_shape(spec)}{done}", file=out)
        if cluster == "slurm":
            dep = f"afterok:<job id of {spec.after}>" if spec.after else None
            for line in sbatch_lines(slurm_params(spec, cfg, dep), log_folder(cfg, spec), spec.array):
                print(line, file=out)
        else:
            print(f"{cluster} executor: tasks_per_node={spec.shape.tasks_per_node} "
                  f"gpus_per_node={spec.shape.gpus_per_node} timeout_min={spec.shape.time_min}"
                  + (f" (starts after {spec.after} succeeded)" if spec.after else ""), file=out)


def print_metrics(cfg: Config) -> None:
    """The eval stage's table, when the chain that just ran here produced one."""
    from slade_dist.eval.report import format_table

    metrics = run_root(cfg) / "eval" / "metrics.json"
    if metrics.exists():
        print(format_table(json.loads(metrics.read_text())))


def main(argv: Sequence[str] | None = None, job_cls: type | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # overrides may sit between the flags
    try:
        cfg, cluster, plan = resolve(args)
        if args.dry_run:
            print_dry_run(cfg, cluster, plan)
            return 0
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
        record = write_record(cfg, cluster, subs)
    except (ConfigError, LaunchError) as e:
        lines = str(e).splitlines()
        print(f"{parser.prog}: error: {lines[0]}", file=sys.stderr)
        for extra in lines[1:]:
            print(f"  {extra}", file=sys.stderr)
        return 2
    print(f"record:      {record}")
    if cluster != "slurm":
        print_metrics(cfg)
    if cluster == "slurm" and subs:
        print(f"follow:      squeue -j {','.join(s.job_id for s in subs)}   (sacct -j ... once done)")
    print(f"tensorboard: tensorboard --logdir {run_root(cfg) / 'tb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
