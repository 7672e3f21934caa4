"""Running stages in this process: one (`run_stage`) or the whole chain (`run_pipeline`).

Owns what happens around a stage function on every rank: the skip decision (stages.why_not_done),
the exclusive lock of the run directory (rank 0; all ranks fail together when another launch holds
it), the resolved config saved beside the outputs, `--force` (a trainer's checkpoints moved aside),
the periodic evaluator handed to trainers, DONE.json on rank 0 and one closing line with what the
stage read and left out. Call dist.init_distributed() first for multi-process runs.
Tests: tests/unit/test_stages.py, tests/integration/test_faults.py.
"""

from __future__ import annotations

import time
from typing import Any

from . import dist
from .config import Config
from .errors import UserError
from .fileio import DirInUse, DirLock, set_aside
from .stages import (
    STAGES,
    RunLayout,
    chain_switches,
    data_keys,
    pipeline_plan,
    stage_inputs,
    why_not_done,
    with_round,
    write_done,
)


class StageNotAvailable(RuntimeError, UserError):
    pass


def _lock_run_dir(layout: RunLayout) -> DirLock | None:
    """Rank 0 takes the run directory's lock; every rank fails together when it is in use."""
    lock, error = None, None
    if dist.is_main():
        try:
            lock = DirLock(layout.root).acquire()
        except DirInUse as e:
            error = str(e)
        if lock is not None and lock.stale:
            dist.get_logger().warning(
                f"stale lock in {layout.root} ({lock.stale}): that run ended without "
                f"releasing it (killed?); taking it over"
            )
    error = dist.broadcast_object(error)
    if error:
        raise DirInUse(error)
    return lock


def run_stage(cfg: Config, stage: str, force: bool = False) -> dict[str, Any] | None:
    """Run one stage in this process (all ranks call it). Returns its result, None when skipped.

    Rank 0 writes config + DONE.json.
    """
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    st = STAGES[stage]
    log = dist.get_logger()
    reason = "--force" if force else why_not_done(cfg, stage)
    if reason is None:
        log.info(f"[{stage}] DONE.json matches the config and the inputs: skipped (use --force to rerun)")
        return None
    try:
        fn = st.load()
    except (ImportError, AttributeError) as e:
        raise StageNotAvailable(f"stage {stage!r} is not implemented yet ({e})") from e
    cfg.require_inputs(*data_keys(cfg, stage))
    layout = RunLayout(cfg.run.dir)
    out_dir = layout.stage_dir(stage, cfg.run.round)
    inputs = stage_inputs(cfg, stage)  # as they are now, before the stage reads them
    lock = _lock_run_dir(layout)
    try:
        if dist.is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
            if force:  # a forced trainer starts over: its checkpoints are moved aside, not resumed
                set_aside(out_dir / "ckpt", "forced")
            cfg.save(layout.root / "config.yaml")
            cfg.save(out_dir / "config.yaml")
        dist.barrier()
        t0 = time.time()
        log.info(f"[{stage}{f' round {cfg.run.round}' if st.per_round else ''}] start ({reason}) -> {out_dir}")
        result = fn(cfg, layout.root, **st.kwargs(cfg)) or {}
        dist.barrier()
        if dist.is_main():
            write_done(cfg, stage, result, time.time() - t0, inputs, world_size=dist.world_size())
    finally:
        if lock is not None:
            lock.release()
    data = result.get("data") if isinstance(result, dict) else None
    facts = f"; data: {', '.join(f'{k} {v}' for k, v in data.items())}" if data else ""
    log.info(f"[{stage}] done in {time.time() - t0:.1f}s{facts}")
    return result


def run_pipeline(cfg: Config, force: bool = False) -> None:
    """Every stage of the chain in order, in this process (all ranks call it; finished stages are
    skipped by their DONE.json). Stops at the first stage that is not available."""
    missing = [s.name for s in STAGES.values() if not s.available()]
    for stage, round_ in pipeline_plan(cfg.run.rounds, chain_switches(cfg)):
        if stage in missing:
            dist.print0(f"[pipeline] stage {stage!r} is not available: stopping here. Missing: {', '.join(missing)}")
            return
        run_stage(with_round(cfg, round_), stage, force=force)
