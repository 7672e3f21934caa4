"""Slurm through submitit: a partition's size (sinfo) and whether a job fits it, each job's
SlurmExecutor parameters and the script lines they become (for --dry-run, anywhere), submitting a
plan; job states and cancelling: status.py. Tests: tests/unit/test_launch.py (#SBATCH lines),
tests/integration/test_slurm.py (a real two-node cluster: the dry run's lines are the script submitit submitted).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import JobPaths
from submitit.slurm.slurm import SlurmJobEnvironment

from ..config import Config
from .plan import JobSpec, LaunchError, Submitted, describe_shape, log_folder, make_job, slurm_job_name

# a long training under a short time limit is requeued at every limit (preemptions do not count);
# submitit's default of 3 would end a 24 h run under a 4 h limit
MAX_TIMEOUT_REQUEUES = 100
SITE_KEYS = ("partition", "account", "qos", "constraint")  # launch.<key>: the same sbatch option on every job


@dataclass
class PartitionInfo:
    name: str
    nodes: int
    cpus_per_node: int  # the smallest node's CPU count
    gpus_per_node: int  # the smallest node's GPU count (gres gpu)


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
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N|%P|%c|%G"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"cannot ask Slurm for its partitions (sinfo failed: {e})") from e
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 3]
    names = sorted({p.rstrip("*") for _, p, _, _ in rows})
    if not partition:
        default = [p.rstrip("*") for _, p, _, _ in rows if p.endswith("*")]
        if not default:
            raise LaunchError(f"Slurm has no default partition: set launch.partition (one of {', '.join(names)})")
        partition = default[0]
    mine = {node: (int(c), _gres_gpus(g)) for node, p, c, g in rows if p.rstrip("*") == partition}
    if not mine:
        raise LaunchError(f"partition {partition!r} does not exist; partitions: {', '.join(names) or 'none'}")
    return PartitionInfo(partition, len(mine), min(c for c, _ in mine.values()), min(g for _, g in mine.values()))


def check_shape_fits(spec: JobSpec, part: PartitionInfo) -> None:
    """A job larger than the partition would stay PENDING forever: refuse it now."""
    s = spec.shape
    if s.nodes > part.nodes:
        raise LaunchError(
            f"job {spec.name} asks for {s.nodes} nodes but partition {part.name!r} has "
            f"{part.nodes}: lower --nodes (or launch.shapes.{spec.stage}.nodes)"
        )
    if s.tasks_per_node * s.cpus_per_task > part.cpus_per_node:
        raise LaunchError(
            f"job {spec.name} asks for {s.tasks_per_node} tasks x {s.cpus_per_task} CPUs per "
            f"node but nodes of partition {part.name!r} have {part.cpus_per_node} CPUs"
        )
    if s.gpus_per_node > part.gpus_per_node:
        raise LaunchError(
            f"job {spec.name} asks for {s.gpus_per_node} GPUs per node but nodes of partition "
            f"{part.name!r} have {part.gpus_per_node}"
        )


def sbatch_extra(cfg: Config, spec: JobSpec) -> dict[str, Any]:
    """launch.sbatch_extra with launch.shapes.<stage>.sbatch_extra on top, as sbatch option names; a value
    of false drops the option (a stage opting out of a global `exclusive: true`)."""
    merged = {**cfg.launch.sbatch_extra, **spec.shape.sbatch_extra}
    return {str(k).replace("_", "-"): v for k, v in merged.items() if v is not False}


def slurm_params(spec: JobSpec, cfg: Config, dependency: str | None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of one job (what becomes its #SBATCH lines)."""
    s = spec.shape
    params: dict[str, Any] = {
        "job_name": slurm_job_name(cfg, spec),
        "nodes": s.nodes,
        "ntasks_per_node": s.tasks_per_node,
        "cpus_per_task": s.cpus_per_task,
        "time": s.time_min,
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
    for key in SITE_KEYS:
        if getattr(cfg.launch, key):
            params[key] = getattr(cfg.launch, key)
    if cfg.launch.setup:
        params["setup"] = list(cfg.launch.setup)
    extra: dict[str, Any] = {}
    if cfg.launch.requeue:
        extra["requeue"] = True
    if dependency:
        params["dependency"] = dependency
        # a failed upstream job cancels this one instead of leaving it pending forever
        extra["kill-on-invalid-dep"] = "yes"
    extra.update(sbatch_extra(cfg, spec))  # checks.check_sbatch_extra keeps it off the options above
    if extra:
        params["additional_parameters"] = extra
    if spec.array:
        params["array_parallelism"] = spec.array
    return params


# slurm_params keys that are not sbatch options: submitit turns them into the lines below
NOT_OPTIONS = ("setup", "srun_args", "signal_delay_s", "additional_parameters", "array_parallelism")


def script_lines(params: dict[str, Any], folder: Path, array: int = 0) -> list[str]:
    """The job script's lines as --dry-run shows them (#SBATCH lines sorted by name, launch.setup lines,
    the srun line; no blanks, shebang or comments), rendered from the SlurmExecutor parameters as
    submitit renders them. Rendered here because submitit writes a script only inside a
    SlurmExecutor, which refuses to exist where `srun` is not on PATH (and its renderer is private);
    tests/integration/test_slurm.py holds these lines against the script submitit submitted."""
    paths = JobPaths(folder)  # submitit's log names: <folder>/%j_%t_log.{out,err}
    out, err = str(paths.stdout), str(paths.stderr)
    if array:  # an array task's logs: <array id>_<task index>_...
        out, err = out.replace("%j", "%A_%a"), err.replace("%j", "%A_%a")
    options = {k: v for k, v in params.items() if k not in NOT_OPTIONS}
    options |= {
        "signal": f"{SlurmJobEnvironment.USR_SIG}@{params['signal_delay_s']}",
        "output": out.replace("%t", "0"),  # sbatch's own log: task 0's
        "error": err.replace("%t", "0"),
        "open-mode": "append",  # a requeued job appends to its logs
        "wckey": "submitit",
    }
    if array:
        options["array"] = f"0-{array - 1}%{min(array, params.get('array_parallelism', 256))}"
    options |= params.get("additional_parameters", {})
    srun = shlex.join(["srun", "--unbuffered", "--output", out, "--error", err, *params.get("srun_args", [])])
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return [
        *(_sbatch_line(k, options[k]) for k in sorted(options)),
        *params.get("setup", []),
        "export SUBMITIT_EXECUTOR=slurm",
        f"{srun} {command}",
    ]


def _sbatch_line(key: str, value: Any) -> str:
    flag = f"#SBATCH --{key.replace('_', '-')}"
    return flag if value is True else f"{flag}={shlex.quote(str(value))}"


def submit_slurm(cfg: Config, plan: Sequence[JobSpec], force: bool, job_cls: type | None = None) -> list[Submitted]:
    """Submit every job at once; each waits (afterok) for the one before it."""
    done: dict[str, Submitted] = {}
    for spec in plan:
        dep = f"afterok:{done[spec.after].job_id}" if spec.after else None
        executor = submitit.SlurmExecutor(folder=log_folder(cfg, spec), max_num_timeout=MAX_TIMEOUT_REQUEUES)
        executor.update_parameters(**slurm_params(spec, cfg, dep))
        job = make_job(cfg, spec, force, job_cls)
        jobs = executor.map_array(job, list(range(spec.array))) if spec.array else [executor.submit(job)]
        # an array's tasks are <array id>_<i>: the array id names them all (afterok, scancel)
        array_id = jobs[0].job_id.split("_")[0]
        sub = Submitted(spec, array_id if spec.array else jobs[0].job_id, str(jobs[0].paths.stdout), jobs)
        done[spec.name] = sub
        print(
            f"  {slurm_job_name(cfg, spec):30s} job {sub.job_id:>8s}  {describe_shape(spec)}"
            f"{f'  afterok {done[spec.after].job_id}' if spec.after else ''}\n"
            f"  {'':30s} log {sub.stdout}",
            flush=True,
        )
    return list(done.values())
