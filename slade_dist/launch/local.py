"""`--cluster local|debug`: the same chain of jobs on this machine, one job after the other.

Owns: refusing multi-node jobs here, running each job through submitit's LocalExecutor (one
process per task) or DebugExecutor (in the launcher's own process: pdb works), waiting for it and
stopping at the first failure with the job's error line and the path of its full log.
Tests: tests/unit/test_launch.py (debug executor, error lines),
tests/integration/test_launch_local.py (LocalExecutor, 2 processes).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import submitit

from ..config import Config
from .plan import JobSpec, LaunchError, Submitted, describe_shape, log_folder, make_job


def check_local_shape(spec: JobSpec) -> None:
    if spec.shape.nodes > 1:
        raise LaunchError(
            f"job {spec.name} asks for {spec.shape.nodes} nodes but --cluster local/debug "
            f"runs on this one machine: use --nodes 1 or --cluster slurm"
        )


def local_executor(cfg: Config, spec: JobSpec, cluster: str) -> Any:
    folder = log_folder(cfg, spec)
    if cluster == "debug":
        return submitit.DebugExecutor(folder=folder)
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(
        tasks_per_node=spec.shape.tasks_per_node,
        nodes=1,
        gpus_per_node=spec.shape.gpus_per_node,
        timeout_min=spec.shape.time_min,
    )
    return executor


def run_here(
    cfg: Config, plan: Sequence[JobSpec], force: bool, cluster: str, job_cls: type | None = None, out=None
) -> list[Submitted]:
    """--cluster local/debug: run the jobs one after the other on this machine (no dependencies to
    wait for: the next starts when the previous one succeeded)."""
    out = out or sys.stdout
    finished: list[Submitted] = []
    for spec in plan:
        executor = local_executor(cfg, spec, cluster)
        job = make_job(cfg, spec, force, job_cls)
        t0 = time.time()
        jobs = executor.map_array(job, list(range(spec.array))) if spec.array else [executor.submit(job)]
        sub = Submitted(spec, jobs[0].job_id, str(jobs[0].paths.stdout), jobs)
        print(
            f"  {spec.name:22s} job {sub.job_id:>8s}  {describe_shape(spec)}\n  {'':22s} log {sub.stdout}",
            file=out,
            flush=True,
        )
        for j in jobs:
            wait_for_job(spec, j)
        print(f"  {'':22s} finished in {time.time() - t0:.1f}s", file=out, flush=True)
        finished.append(sub)
    return finished


def wait_for_job(spec: JobSpec, job: Any) -> None:
    try:
        job.results()
    except Exception as e:  # the job's own traceback is in its log
        raise LaunchError(
            f"job {spec.name} ({job.job_id}) failed: {job_error_line(e)} (full log: {job.paths.stderr})"
        ) from e


def job_error_line(error: BaseException) -> str:
    """The `SomeError: message` line of a failed job's trace (submitit wraps it in prose)."""
    lines = [ln.strip() for ln in str(error).splitlines()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if (
            ":" in ln
            and head.replace(".", "").isidentifier()
            and (head.endswith(("Error", "Exception")) or "." in head)
        ):
            return ln
    return lines[0] if lines else type(error).__name__
