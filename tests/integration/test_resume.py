"""Checkpoint/resume of the trainers with real processes, real DeepSpeed checkpoints and SIGKILL.

A 2-rank ZeRO-1 student run is SIGKILLed mid-stage and restarted: it resumes from its last
complete checkpoint (step counter, optimizer and scheduler state, basis Gaussians restored),
repeats no more than one checkpoint interval, and TensorBoard shows every step exactly once.
Its final 2-rank checkpoint then resumes on 1 rank through DeepSpeed's universal conversion
with exactly the same parameters and buffers. (ZeRO-0 2 -> 1 ranks: test_train_multirank.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slade_dist.config import ModelConfig
from slade_dist.models import build_embedder, save_weights
from slade_dist.stages import RunLayout
from slade_dist.train.engine import complete_checkpoints

from . import _train_workers as W

REPO = Path(__file__).resolve().parents[2]


def _fake_teacher(run_dir: Path) -> None:
    """The student starts from the teacher's export; a fresh embedder is enough here."""
    torch.manual_seed(0)
    mcfg = ModelConfig(backbone="tiny_cnn", embed_dim=32, freeze_bn=False)
    save_weights(RunLayout(run_dir).teacher_weights(1), build_embedder(mcfg), mcfg)


def _start_killable(stages: str, ovr: list[str], tmp: Path) -> subprocess.Popen:
    (tmp / "ovr.json").write_text(json.dumps(ovr))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    # own session: its process group holds the launcher and both ranks, killed together below
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration._train_workers", stages, str(tmp / "ovr.json"), str(tmp / "killed")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_for_checkpoint(proc: subprocess.Popen, ckpt_dir: Path, step: int, timeout: float = 150.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(s >= step for s, _, _ in complete_checkpoints(ckpt_dir)):
            return
        assert proc.poll() is None, f"training process exited early with {proc.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint at step >= {step} after {timeout}s")


def _ckpt_buffers(ckpt_dir: Path, tag: str) -> dict[str, float]:
    sd = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    return {k: float(sd[f"basis.{k}"]) for k in ("mu_pos", "mu_neg", "var_pos", "var_neg")}


@pytest.mark.slow
def test_sigkill_mid_student_then_resume_then_one_rank_zero1(tmp_path):
    data = W.make_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    layout = RunLayout(run_dir)
    W.write_pseudo(data["unlabeled"], layout.stage_dir("cluster", 1), data["truth"])
    _fake_teacher(run_dir)
    every, total = 5, 20
    ovr = W.overrides(
        data,
        run_dir,
        f"train.student_steps={total}",
        f"train.ckpt_every={every}",
        "train.zero_stage=1",
        "train.log_every=1",
        "student.basis_warmup_steps=2",
    )
    ckpt_dir = layout.stage_dir("student", 1) / "ckpt"
    tb_dir = layout.tb_dir("student", 1)

    proc = _start_killable("student", ovr, tmp_path)
    try:
        _wait_for_checkpoint(proc, ckpt_dir, 10)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-stage
        proc.wait()
    last_ckpt_step, last_tag, _ = complete_checkpoints(ckpt_dir)[-1]
    assert 10 <= last_ckpt_step < total, "the kill must land mid-stage"
    logged_before = max(s for s, _ in W.tb_scalars(tb_dir)["loss/total"])
    gaussians = _ckpt_buffers(ckpt_dir, last_tag)

    res = W.run_ranks(2, ["student"], ovr, tmp_path / "resumed")
    for r in res:
        resumed = r["student"]["resumed"]
        assert resumed["step"] == last_ckpt_step == r["student"]["resumed_from"]
        assert resumed["optimizer_step"] == last_ckpt_step  # AdamW state came back, not a fresh one
        assert resumed["scheduler_step"] == last_ckpt_step
        assert resumed["basis"] == gaussians  # the running Gaussians, exactly as checkpointed
        assert resumed["written_by_world_size"] == 2
        assert r["student"]["steps"] == total
    assert logged_before - last_ckpt_step <= every  # repeated at most one checkpoint interval
    assert res[0]["student"]["param_digest"] == res[1]["student"]["param_digest"]
    steps = [s for s, _ in W.tb_scalars(tb_dir)["loss/total"]]
    assert steps == list(range(1, total + 1))  # each step once, despite the repeated ones

    # the 2-rank ZeRO-1 checkpoint at `total` loads on 1 rank (universal conversion), same state
    layout.done_file("student", 1).unlink()  # the same work again, now on one rank
    one = W.run_ranks(1, ["student"], ovr, tmp_path / "one")[0]["student"]
    assert one["resumed"]["step"] == total and one["resumed"]["written_by_world_size"] == 2
    assert one["resumed"]["tag"].endswith("_universal")
    assert one["resumed"]["param_digest"] == res[0]["student"]["param_digest"]
    assert one["resumed"]["optimizer_step"] == total
    assert one["steps"] == total
