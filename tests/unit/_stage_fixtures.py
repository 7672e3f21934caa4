"""A real (tiny) stage function registered by tests/unit/test_stages.py to exercise the registry."""

from __future__ import annotations

import json
from pathlib import Path

from slade_dist.stages import RunLayout

CALLS: list[int] = []


def counting_stage(cfg, run_dir: Path) -> dict:
    out = RunLayout(run_dir).stage_dir("unit_counter")
    CALLS.append(cfg.train.teacher_steps)
    (out / "work.json").write_text(json.dumps({"steps": cfg.train.teacher_steps}))
    return {"steps": cfg.train.teacher_steps}
