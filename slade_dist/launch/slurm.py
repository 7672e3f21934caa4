"""Slurm through submitit: the partition's size, whether a job fits it, #SBATCH parameters, sbatch.

Owns: asking `sinfo` how big a partition is (nodes, CPUs and GPUs of its smallest node), refusing
a job larger than the partition (it would stay PENDING forever), the SlurmExecutor parameters of a
job (name slade-<run>-<job>, shape, requeue, USR2 before the time limit, afterok +
kill-on-invalid-dep, arrays, launch.setup lines, launch[.<stage>].sbatch_extra options), the exact
script they become (for --dry-run, without sbatch), submitting a whole plan at once, and asking
sacct / squeue for job states and scancel for cancelling (for --status / --cancel).
Tests: tests/unit/test_launch.py (parameters through submitit's own #SBATCH rendering),
tests/integration/test_slurm.py (a real two-node cluster: states, scancel, pass-through options).
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
from submitit.slurm.slurm import _make_sbatch_string

from ..config import Config
from .plan import JobSpec, LaunchError, Submitted, describe_shape, log_folder, make_job, shape_key, slurm_job_name

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
def sbatch_extra(cfg: Config, spec: JobSpec) -> dict[str, Any]:
    """launch.sbatch_extra with launch.<stage>.sbatch_extra on top, as sbatch option names; a value
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
    for key in ("partition", "account", "qos", "constraint"):
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


def job_script(params: dict[str, Any], folder: Path, array: int = 0) -> str:
    """The batch script submitit will write for these parameters, with the command its
    SlurmExecutor runs (for --dry-run: no SlurmExecutor, which needs srun on PATH)."""
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=str(folder), map_count=array or None, **params)


def sbatch_lines(params: dict[str, Any], folder: Path, array: int = 0) -> list[str]:
    """The exact #SBATCH lines of the job's script."""
    return [line for line in job_script(params, folder, array).splitlines() if line.startswith("#SBATCH")]


def script_lines(params: dict[str, Any], folder: Path, array: int = 0) -> list[str]:
    """What --dry-run shows of the script: #SBATCH lines, setup lines, the srun line (no blanks,
    no shebang, no section comments)."""
    text = job_script(params, folder, array)
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("#!", "# "))]


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
            f"  {slurm_job_name(cfg, spec):30s} job {sub.job_id:>8s}  {describe_shape(spec)}"
            f"{f'  afterok {done[spec.after].job_id}' if spec.after else ''}\n"
            f"  {'':30s} log {sub.stdout}",
            file=out,
            flush=True,
        )
    return list(done.values())


# ------------------------------------------------------------------------------ status, cancel
# sacct states after which a job never runs again (a PREEMPTED job may still be requeued)
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
}


@dataclass
class JobState:
    """One row of sacct / squeue: a job, or one task of an array ("312_4", "312_[5-7]" pending)."""

    job_id: str
    name: str
    state: str  # first word: "CANCELLED by 0" -> CANCELLED
    elapsed: str

    @property
    def base_id(self) -> str:
        return self.job_id.split("_")[0]

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES


def _rows(cmd: list[str], what: str) -> list[JobState]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        raise LaunchError(f"cannot ask Slurm about the jobs ({what} failed: {str(detail).strip()})") from e
    rows = []
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 4 and parts[0]:
            job_id, name, state, elapsed = (p.strip() for p in parts)
            rows.append(JobState(job_id, name, (state.split() or ["UNKNOWN"])[0], elapsed))
    return rows


def query_states(job_ids: Sequence[str]) -> dict[str, list[JobState]]:
    """Each job id's rows (an array: one per task or pending range): sacct first (it also knows
    finished jobs), squeue for jobs sacct has not recorded yet (it lags a few seconds behind sbatch)."""
    ids = [str(j) for j in job_ids]
    found: dict[str, list[JobState]] = {j: [] for j in ids}
    if not ids:
        return found
    sacct = ["sacct", "-n", "-X", "-P", "-j", ",".join(ids), "-o", "JobID,JobName,State,Elapsed"]
    for row in _rows(sacct, "sacct"):
        if row.base_id in found:
            found[row.base_id].append(row)
    if any(not rows for rows in found.values()):
        for row in _rows(["squeue", "-h", "-a", "-o", "%i|%j|%T|%M"], "squeue"):
            if row.base_id in found and not found[row.base_id]:
                found[row.base_id].append(row)
    return found


def scancel(job_ids: Sequence[str]) -> str:
    """Cancel these jobs (an array id cancels all its tasks); returns what scancel reported."""
    try:
        proc = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"scancel failed: {e}") from e
    return (proc.stdout + proc.stderr).strip()
