"""The run's record of what the last launch submitted, and what `--status` / `--cancel` do with it.

Owns: `<run>/logs/submitted.json` (written after every launch: cluster, time and, per job, its
name, Slurm job name, id, stage, round, dependency and log), `--status` (each job of that launch
with its Slurm job name, id, state and elapsed time, from sacct, or squeue for jobs sacct has not
recorded yet) and `--cancel` (scancel every job of that launch that has not ended; reports what it
cancelled and what had already ended). Each problem is one LaunchError line.
Tests: tests/unit/test_launch.py (no record, a local record), tests/integration/test_slurm.py
(--status and --cancel on real jobs).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from .plan import LaunchError, Submitted, run_root, slurm_job_name
from .slurm import JobState, query_states, scancel


def record_path(cfg: Config) -> Path:
    return run_root(cfg) / "logs" / "submitted.json"


def write_record(cfg: Config, cluster: str, subs: Sequence[Submitted]) -> Path:
    """<run>/logs/submitted.json: what was submitted where (for --status, --cancel, people, tests)."""
    path = record_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
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
    path.write_text(json.dumps(body, indent=2))
    return path


def read_record(cfg: Config) -> dict[str, Any]:
    path = record_path(cfg)
    if not path.is_file():
        raise LaunchError(
            f"nothing was submitted for run dir {run_root(cfg)} (no {path}); submit with "
            "`python launch/submit.py --stage all --config FILE`, or name the run: --config FILE / run.dir=DIR"
        )
    return json.loads(path.read_text())


def _jobs_or_explain(cfg: Config, record: dict[str, Any]) -> list[dict[str, Any]]:
    if not record["jobs"]:
        raise LaunchError(
            f"the last launch of run dir {run_root(cfg)} ({record['time']}) submitted no job: "
            "every stage was already done"
        )
    return record["jobs"]


def _rows_of(job: dict[str, Any], states: dict[str, list[JobState]]) -> list[JobState]:
    """The job's sacct rows, or one UNKNOWN row (Slurm forgot it, or it never reached Slurm)."""
    return states.get(job["job_id"]) or [JobState(job["job_id"], job.get("job_name", job["name"]), "UNKNOWN", "")]


def print_status(cfg: Config, out=None) -> None:
    """--status: the jobs of the last launch with their state (local launches: what ran)."""
    out = out or sys.stdout
    record = read_record(cfg)
    jobs = _jobs_or_explain(cfg, record)
    print(f"run dir {run_root(cfg)}: {len(jobs)} job(s) on cluster={record['cluster']} at {record['time']}", file=out)
    if record["cluster"] != "slurm":  # local jobs end with the launcher, which writes the record last
        for job in jobs:
            print(f"  {job['name']:24s} {job['job_id']:>10s}  ran here, finished  log {job['stdout']}", file=out)
        return
    states = query_states([j["job_id"] for j in jobs])
    print(f"  {'NAME':34s} {'JOB ID':>12s}  {'STATE':12s} ELAPSED", file=out)
    for job in jobs:
        for row in _rows_of(job, states):
            print(f"  {row.name:34s} {row.job_id:>12s}  {row.state:12s} {row.elapsed}", file=out)
    print(f"logs: {run_root(cfg) / 'logs'}/<job>/<job id>_<task>_log.{{out,err}}", file=out)


def cancel_chain(cfg: Config, out=None) -> list[str]:
    """--cancel: scancel every job of the last launch that has not ended; returns their ids."""
    out = out or sys.stdout
    record = read_record(cfg)
    jobs = _jobs_or_explain(cfg, record)
    if record["cluster"] != "slurm":
        raise LaunchError(
            f"the last launch of run dir {run_root(cfg)} ran on cluster={record['cluster']}: its jobs "
            "ran inside the launcher and end with it (Ctrl-C there); nothing is queued to cancel"
        )
    states = query_states([j["job_id"] for j in jobs])
    live = [j for j in jobs if not all(row.ended for row in _rows_of(j, states) if row.state != "UNKNOWN")]
    for job in jobs:
        rows = _rows_of(job, states)
        summary = ", ".join(sorted({row.state for row in rows}))
        verb = "cancelling" if job in live else "left alone"
        print(f"  {verb:10s} {job.get('job_name', job['name']):34s} job {job['job_id']:>10s}  ({summary})", file=out)
    if not live:
        print("nothing to cancel: every job of the last launch has ended", file=out)
        return []
    ids = [j["job_id"] for j in live]
    said = scancel(ids)
    print(f"scancel {' '.join(ids)}" + (f": {said}" if said else ""), file=out)
    print("cancelled; `python launch/submit.py --status ...` shows them as CANCELLED once Slurm is done", file=out)
    return ids
