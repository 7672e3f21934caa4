"""Every launch recorded for a run directory, `<run>/logs/submitted.json` (the last launch at the top
level, the earlier ones under `earlier`: launch/README.md), and `--status` / `--cancel` over all of
them through submitit's job objects (`SlurmJob(folder, id)`: `.state` from sacct, `.cancel()`).
Tests: tests/unit/test_launch.py (no record, local launches), tests/integration/test_slurm.py.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from ..config import Config
from ..fileio import atomic_write_json
from .plan import LaunchError, Submitted, run_root, slurm_job_name


def record_path(cfg: Config) -> Path:
    return run_root(cfg) / "logs" / "submitted.json"


def write_record(cfg: Config, cluster: str, subs: Sequence[Submitted]) -> Path:
    """Add this launch to <run>/logs/submitted.json (for --status, --cancel, people, tests)."""
    earlier = read_launches(cfg) if record_path(cfg).is_file() else []
    launch = {
        "cluster": cluster,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "jobs": [
            {
                "name": s.spec.name,
                "job_name": slurm_job_name(cfg, s.spec) if cluster == "slurm" else s.spec.name,
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
    # the last launch stays at the top level, where readers of one launch (and of older records) look
    return atomic_write_json(record_path(cfg), {**launch, "earlier": earlier}, indent=2)


def read_launches(cfg: Config, need_jobs: bool = False) -> list[dict[str, Any]]:
    """Every launch recorded for the run directory, oldest first; need_jobs: at least one job among them."""
    path = record_path(cfg)
    if not path.is_file():
        raise LaunchError(
            f"nothing was submitted for run dir {run_root(cfg)} (no {path}); submit with "
            "`python launch/submit.py --stage all --config FILE`, or name the run: --config FILE / run.dir=DIR"
        )
    last = json.loads(path.read_text())
    launches = [*last.pop("earlier", []), last]
    if need_jobs and not any(launch["jobs"] for launch in launches):
        raise LaunchError(
            f"the {len(launches)} launch(es) of run dir {run_root(cfg)} submitted no job: every stage was already done"
        )
    return launches


def _slurm_tasks(cfg: Config, job: dict[str, Any]) -> list[submitit.SlurmJob]:
    """submitit's view of a recorded job: one SlurmJob, or one per task of an array."""
    folder = run_root(cfg) / "logs" / job["name"]
    ids = [f"{job['job_id']}_{i}" for i in range(job["array"])] if job.get("array") else [job["job_id"]]
    return [submitit.SlurmJob(folder=folder, job_id=i) for i in ids]


def _state(task: submitit.SlurmJob) -> str:
    """The first word of the sacct state ("CANCELLED by 0" -> CANCELLED); UNKNOWN until sacct knows
    the job (it lags a few seconds behind sbatch) or after Slurm forgot it."""
    return (task.state.split() or ["UNKNOWN"])[0]


def _need_sacct() -> None:
    # without sacct submitit logs a warning and reports every job UNKNOWN: say what to do instead
    if not shutil.which("sacct"):
        raise LaunchError("sacct is not on PATH here: ask from a login node of the Slurm cluster that runs the jobs")


def print_status(cfg: Config) -> None:
    """--status: every job of every launch with its state (local launches: what ran)."""
    launches = read_launches(cfg, need_jobs=True)
    if any(launch["cluster"] == "slurm" and launch["jobs"] for launch in launches):
        _need_sacct()
    print(f"run dir {run_root(cfg)}: {len(launches)} launch(es)")
    for i, launch in enumerate(launches, 1):
        jobs = launch["jobs"]
        print(f"launch {i} at {launch['time']}: {len(jobs)} job(s) on cluster={launch['cluster']}")
        if not jobs:
            print("  nothing submitted: every stage was already done")
        elif launch["cluster"] != "slurm":  # local jobs end with the launcher, which writes the record last
            for job in jobs:
                print(f"  {job['name']:24s} {job['job_id']:>10s}  ran here, finished  log {job['stdout']}")
        else:
            _print_slurm_jobs(cfg, jobs)
    print(f"logs: {run_root(cfg) / 'logs'}/<job>/<job id>_<task>_log.{{out,err}}")


def _print_slurm_jobs(cfg: Config, jobs: list[dict[str, Any]]) -> None:
    print(f"  {'NAME':34s} {'JOB ID':>12s}  {'STATE':12s} NODES")
    tasks = {job["job_id"]: _slurm_tasks(cfg, job) for job in jobs}  # all registered: one sacct call
    for job in jobs:
        for task in tasks[job["job_id"]]:
            state = _state(task)  # asks sacct (once for all registered jobs); the node list comes with it
            nodes = task.get_info(mode="cache").get("NodeList", "")
            print(f"  {job['job_name']:34s} {task.job_id:>12s}  {state:12s} {nodes}")


def cancel_chain(cfg: Config) -> list[str]:
    """--cancel: cancel every Slurm job of every launch that is not known to have ended; returns their ids."""
    launches = read_launches(cfg, need_jobs=True)
    jobs = [job for launch in launches if launch["cluster"] == "slurm" for job in launch["jobs"]]
    if not jobs:
        clusters = ", ".join(sorted({launch["cluster"] for launch in launches}))
        raise LaunchError(
            f"the launches of run dir {run_root(cfg)} ran on cluster={clusters}: their jobs "
            "ran inside the launcher and end with it (Ctrl-C there); nothing is queued to cancel"
        )
    _need_sacct()
    tasks = {job["job_id"]: _slurm_tasks(cfg, job) for job in jobs}
    live = [job for job in jobs if not all(task.done() for task in tasks[job["job_id"]])]
    for job in jobs:
        states = ", ".join(sorted({_state(task) for task in tasks[job["job_id"]]}))
        verb = "cancelling" if job in live else "left alone"
        print(f"  {verb:10s} {job['job_name']:34s} job {job['job_id']:>10s}  ({states})")
    if not live:
        print(f"nothing to cancel: every job launched for run dir {run_root(cfg)} has ended")
        return []
    ids = [job["job_id"] for job in live]
    try:  # the array's own id cancels all its tasks
        for job in live:
            submitit.SlurmJob(folder=run_root(cfg) / "logs" / job["name"], job_id=job["job_id"]).cancel(check=False)
    except OSError as e:
        raise LaunchError(f"scancel failed: {e}") from e
    print(f"scancel {' '.join(ids)}")
    print("cancelled; `python launch/submit.py --status ...` shows them as CANCELLED once Slurm is done")
    return ids
