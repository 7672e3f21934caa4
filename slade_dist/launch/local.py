"""`--cluster local|debug`: the plan's jobs one after the other on this machine, through submitit's
LocalExecutor (one process per task, each job's log streamed here) or DebugExecutor (in this
process: pdb works); the first failure stops the chain with its error line and log path.
Tests: tests/unit/test_launch.py (debug executor, log tails), tests/integration/test_launch_local.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
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
    cfg: Config, plan: Sequence[JobSpec], force: bool, cluster: str, job_cls: type | None = None
) -> list[Submitted]:
    """--cluster local/debug: run the jobs one after the other on this machine (no dependencies to
    wait for: the next starts when the previous one succeeded)."""
    finished: list[Submitted] = []
    for spec in plan:
        executor = local_executor(cfg, spec, cluster)
        job = make_job(cfg, spec, force, job_cls)
        t0 = time.time()
        jobs = executor.map_array(job, list(range(spec.array))) if spec.array else [executor.submit(job)]
        sub = Submitted(spec, jobs[0].job_id, str(jobs[0].paths.stdout), jobs)
        print(
            f"  {spec.name:22s} job {sub.job_id:>8s}  {describe_shape(spec)}\n  {'':22s} log {sub.stdout}",
            flush=True,
        )
        for i, j in enumerate(jobs):
            if cluster == "local":  # the debug executor runs in this process: its output is already here
                label = f"{spec.name}[{i}]" if spec.array else spec.name
                follow_logs(j, label)
            wait_for_job(spec, j)
        print(f"  {'':22s} finished in {time.time() - t0:.1f}s", flush=True)
        finished.append(sub)
    return finished


class LogTail:
    """The complete lines a growing log file gained since the last call."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.partial = b""

    def new_lines(self, final: bool = False) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:  # the task has not opened its log yet
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        if final and self.partial:  # the job ended: a last line without its newline still counts
            lines, self.partial = [*lines, self.partial], b""
        return [ln.decode(errors="replace").rstrip("\r") for ln in lines]


# submitit's own INFO lines (job environment, "Job completed successfully"): the launcher already
# says when a job starts and ends; its warnings and errors still come through
QUIET_PREFIXES = ("submitit INFO",)


def follow_logs(job: Any, label: str, poll_s: float = 0.5) -> None:
    """Print the job's task-0 stdout and stderr lines as they come, `[label] line`, until it ends."""
    tails = [LogTail(job.paths.stdout), LogTail(job.paths.stderr)]
    while True:
        ended = job.done()  # read before the logs: nothing written before the end is missed
        for tail in tails:
            for line in tail.new_lines(final=ended):
                if not line.startswith(QUIET_PREFIXES):
                    print(f"  [{label}] {line}", flush=True)
        if ended:
            return
        time.sleep(poll_s)


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
