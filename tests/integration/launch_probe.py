"""A tiny checkpointing "trainer" stage for testing the launcher's mechanics on real executors.

Not a stub of any slade_dist stage: it is a test fixture under its own name `probe` (in the stage
registry only while a test or a job uses it: the `probe_stage` fixture, ProbeJob), so
launcher tests (dependencies, requeue + resume, DONE skip, multi-node env) run on real Slurm /
submitit jobs whether or not the real stages exist yet. Like a real trainer it resumes from its
latest checkpoint, runs a real gloo all_reduce every step (so every task must be in one process
group) and records where each start began, which is what the requeue test asserts on.
Used by tests/integration/test_slurm.py, test_launch_local.py and tests/unit/test_launch.py.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from slade_dist import dist, stages
from slade_dist.config import Config
from slade_dist.launch.job import StageJob

PROBE = stages.Stage(
    "probe",
    f"{__name__}:run",
    ("train",),
    False,
    (),
    "launcher test fixture: counts steps with an all_reduce, checkpoints, resumes",
)


def register_probe() -> bool:
    """Put `probe` in the stage registry; True when this call added it. Never at import: the
    registry is global and other tests (in the same pytest process) list the real stages."""
    if "probe" in stages.STAGES:
        return False
    stages.STAGES["probe"] = PROBE
    return True


def probe_dir(run_dir: str | os.PathLike[str]) -> Path:
    return stages.RunLayout(run_dir).stage_dir("probe")


def run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """cfg.train.teacher_steps steps, a checkpoint every cfg.train.ckpt_every, PROBE_SLEEP_S per step."""
    out = probe_dir(run_dir)
    ckpt = out / "ckpt.json"
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "total": 0.0}
    hosts = dist.all_gather_object(os.environ.get("SLURMD_NODENAME", socket.gethostname()))
    if dist.is_main():
        with open(out / "starts.txt", "a") as f:
            f.write(f"{state['step']}\n")
    if os.environ.get("PROBE_FAIL") == "1":
        raise RuntimeError("probe asked to fail (PROBE_FAIL=1)")
    sleep_s = float(os.environ.get("PROBE_SLEEP_S", "0"))
    step, total = state["step"], state["total"]
    while step < cfg.train.teacher_steps:
        total += float(dist.all_reduce_sum(torch.ones(1)).item())  # adds world_size per step
        step += 1
        time.sleep(sleep_s)
        if step % cfg.train.ckpt_every == 0 and dist.is_main():
            tmp = ckpt.with_name("ckpt.json.tmp")
            tmp.write_text(json.dumps({"step": step, "total": total}))
            tmp.replace(ckpt)
        dist.barrier()
    return {"steps": step, "total": total, "world": dist.world_size(), "hosts": sorted(set(hosts)), "rank": dist.rank()}


class ProbeJob(StageJob):
    """StageJob that registers the probe stage in the job's process while it runs (tests register
    it in their own process with the `probe_stage` fixture, before the launcher checks the name)."""

    def __init__(self, *args: Any, env: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env = dict(env or {})

    def __call__(self, *args: Any) -> Any:
        saved = dict(os.environ)  # the debug executor runs in the test process: leave no trace
        added = register_probe()
        try:
            os.environ.update(self.env)
            return super().__call__(*args)
        finally:
            if added:
                stages.STAGES.pop("probe", None)
            os.environ.clear()
            os.environ.update(saved)
