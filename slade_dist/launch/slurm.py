"""Slurm through submitit: the partition's size, whether a job fits it, #SBATCH parameters, sbatch.

Owns: asking `sinfo` how big a partition is (nodes, CPUs and GPUs of its smallest node), refusing
a job larger than the partition (it would stay PENDING forever), the SlurmExecutor parameters of a
job (shape, requeue, USR2 before the time limit, afterok + kill-on-invalid-dep, arrays), the exact
#SBATCH lines they become (for --dry-run) and submitting a whole plan at once.
Tests: tests/unit/test_launch.py (parameters through submitit's own #SBATCH rendering),
tests/integration/test_slurm.py (a real two-node cluster).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from ..config import Config
from .plan import JobSpec, LaunchError, Submitted, describe_shape, log_folder, make_job, shape_key

# a long training under a short time limit is requeued at every limit (preemptions do not count);
# submitit's default of 3 would end a 24 h run under a 4 h limit
MAX_TIMEOUT_REQUEUES = 100


# -------------------------------------------------------------------------------- partitions
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
            raise LaunchError(f"Slurm has no default partition: pass --partition (one of {', '.join(names)})")
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
            f"{part.nodes}: lower --nodes (or launch.{shape_key(spec.stage)}.nodes)"
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


# -------------------------------------------------------------------------------- parameters
def slurm_params(spec: JobSpec, cfg: Config, dependency: str | None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of one job (what becomes its #SBATCH lines)."""
    s = spec.shape
    params: dict[str, Any] = {
        "job_name": f"slade-{spec.name}",
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
    text = _make_sbatch_string(
        command="python -u -m submitit.core._submit <folder>", folder=str(folder), map_count=array or None, **params
    )
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


# -------------------------------------------------------------------------------- submission
def submit_slurm(
    cfg: Config, plan: Sequence[JobSpec], force: bool, job_cls: type | None = None, out=None
) -> list[Submitted]:
    """Submit every job at once; each waits (afterok) for the one before it."""
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
        sub = Submitted(
            spec, jobs[0].job_id.split("_")[0] if spec.array else jobs[0].job_id, str(jobs[0].paths.stdout), jobs
        )
        done[spec.name] = sub
        print(
            f"  {spec.name:22s} job {sub.job_id:>8s}  {describe_shape(spec)}"
            f"{f'  afterok {done[spec.after].job_id}' if spec.after else ''}\n"
            f"  {'':22s} log {sub.stdout}",
            file=out,
            flush=True,
        )
    return list(done.values())
