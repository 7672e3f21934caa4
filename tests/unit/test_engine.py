"""Tests of slade_dist/train/engine.py, loop.py and tb.py on a real (CPU, one process) DeepSpeed engine.

A toy regression model and in-memory batches: schedule values, parameter groups that start late,
gradient accumulation, checkpoint pruning, resume (step, optimizer state, module state), the
TensorBoard tags read back with EventAccumulator, and no duplicated steps after a resume.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from slade_dist.config import TrainConfig
from slade_dist.models import UnsafeCheckpointError
from slade_dist.tb import TBWriter
from slade_dist.train import engine as E
from slade_dist.train import loop as L

pytestmark = pytest.mark.usefixtures("one_thread_no_leftover_group")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def _trainer(stage_dir: Path, total: int, head_start: int = 0, stage_id: str = "", **tc) -> E.Trainer:
    m = _model()
    tcfg = TrainConfig(**{"lr": 0.01, "warmup_steps": 2, "ckpt_every": 5, "log_every": 1, **tc})
    groups = [
        E.ParamGroup("backbone", list(m[0].parameters()), 0.05),
        E.ParamGroup("head", list(m[2].parameters()), 0.05, start=head_start),
    ]
    return E.Trainer(m, groups, tcfg, stage_dir=stage_dir, total_steps=total, micro_batch=32, stage_id=stage_id)


class _Regression(L.StepObjective):
    """y = sum(x): learnable, deterministic per draw (same batches after a resume)."""

    def __init__(self, trainer: E.Trainer):
        self.trainer = trainer
        self.calls = 0
        self.trunk_calls = 0

    def draw(self, step: int) -> L.Micro:
        g = torch.Generator().manual_seed(1000 + self.calls)
        self.calls += 1
        x = torch.randn(32, 8, generator=g)
        return L.Micro(x=x, data={"y": x.sum(1, keepdim=True)}, images=32, skipped=1)

    def trunk(self, x):
        self.trunk_calls += 1
        return self.trainer.forward(x)

    def loss(self, step, outs, micros):
        loss = torch.nn.functional.mse_loss(torch.cat(outs), torch.cat([m.data["y"] for m in micros]))
        return loss, {"loss/mse": float(loss.detach())}


def test_warmup_cosine_factors():
    f = E.WarmupCosine(total_steps=20, warmup_steps=4)
    assert f(0) == pytest.approx(0.25) and f(3) == pytest.approx(1.0)
    assert f(4) == pytest.approx(1.0)
    assert f(12) < f(8) < f(4)
    assert f(19) < 0.02 and f(25) == pytest.approx(0.0)
    late = E.WarmupCosine(total_steps=20, warmup_steps=4, start=5)
    assert late(0) == 0.0 and late(4) == 0.0 and late(5) == pytest.approx(0.25)


def test_precision_and_ds_config():
    assert E.resolve_precision("auto") == ("bf16" if torch.cuda.is_available() else "fp32")
    cfg = E.ds_config(TrainConfig(precision="bf16", zero_stage=1, grad_clip=2.0, grad_accum=3), 16)
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in cfg  # bf16 mode would cast BatchNorm buffers
    assert cfg["zero_optimization"]["stage"] == 1
    assert cfg["gradient_clipping"] == 2.0 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_micro_batch_size_per_gpu"] == 16


def test_fit_learns_delays_groups_and_checkpoints(tmp_path):
    tr = _trainer(tmp_path / "stage", total=24, head_start=3)
    head0 = [p.detach().clone() for p in tr.module[2].parameters()]
    backbone0 = [p.detach().clone() for p in tr.module[0].parameters()]
    lrs_seen = []

    def after(step):
        lrs_seen.append(tr.lrs())
        if step == 3:  # 3 optimizer steps done, head still frozen (lr 0 until its start step)
            assert all(torch.equal(a, b) for a, b in zip(head0, tr.module[2].parameters()))
            assert not all(torch.equal(a, b) for a, b in zip(backbone0, tr.module[0].parameters()))
        return {}

    tb = TBWriter(tmp_path / "tb")
    res = L.fit(tr, _Regression(tr), tb=tb, after_step=after)
    tb.close()
    assert res.steps == 24 and tr.step == 24
    losses = [v for _, v in res.history]
    assert sum(losses[-4:]) < 0.3 * sum(losses[:4])
    assert lrs_seen[0]["head"] == 0.0 and lrs_seen[0]["backbone"] > 0
    assert lrs_seen[5]["head"] > 0
    # checkpoints at 5, 10, 15, 20, 24: the newest two are kept, each with its completion marker
    kept = sorted(p.name for p in (tmp_path / "stage" / "ckpt").glob("step*"))
    assert kept == ["step00000020", "step00000024"]
    assert all((tmp_path / "stage" / "ckpt" / k / E.META_FILE).exists() for k in kept)

    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {
        "loss/total",
        "loss/mse",
        "lr/backbone",
        "lr/head",
        "perf/images_per_s",
        "perf/data_wait_pct",
        "data/skipped_samples",
    } <= tags
    assert [e.step for e in ea.Scalars("loss/total")] == list(range(1, 25))
    assert all(e.value == 1.0 for e in ea.Scalars("data/skipped_samples"))


def test_resume_restores_step_optimizer_and_module(tmp_path):
    tr = _trainer(tmp_path / "stage", total=10)
    L.fit(tr, _Regression(tr), tb=TBWriter(None))
    opt_state = {
        k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)}
        for k, s in tr.optimizer.state_dict()["state"].items()
    }
    params = [p.detach().clone() for p in tr.module.parameters()]
    tdist.destroy_process_group()

    tr2 = _trainer(tmp_path / "stage", total=12)
    assert tr2.step == 10 and tr2.client_state["step"] == 10
    assert all(torch.equal(a, b) for a, b in zip(params, tr2.module.parameters()))
    st2 = tr2.optimizer.state_dict()["state"]
    for k, s in opt_state.items():
        for n, v in s.items():
            assert torch.equal(v, st2[k][n]), f"optimizer state {k}/{n} not restored"
    assert tr2.scheduler.last_epoch == 10


def test_resume_after_lost_checkpoint_purges_tb_steps(tmp_path):
    """A run 'killed' after step 8 (its step-8 checkpoint lost) resumes from step 5; TensorBoard
    then shows each step once although steps 6-8 were logged twice."""
    stage, tbdir = tmp_path / "stage", tmp_path / "tb"
    tr = _trainer(stage, total=8)
    tb = TBWriter(tbdir)
    L.fit(tr, _Regression(tr), tb=tb)
    tb.close()
    shutil.rmtree(stage / "ckpt" / "step00000008")
    tdist.destroy_process_group()
    # a real restart is seconds later; event files made in the same second sort by a per-process
    # counter ("...9" after "...10"), and TensorBoard reads them in name order
    time.sleep(1.1)

    tr2 = _trainer(stage, total=10)
    assert tr2.step == 5
    tb2 = TBWriter(tbdir, resume_step=tr2.step)
    L.fit(tr2, _Regression(tr2), tb=tb2)
    tb2.close()
    ea = EventAccumulator(str(tbdir))
    ea.Reload()
    steps = [e.step for e in ea.Scalars("loss/total")]
    assert steps == list(range(1, 11))


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    tr = _trainer(tmp_path / "stage", total=4, grad_accum=3)
    fn = _Regression(tr)
    res = L.fit(tr, fn, tb=TBWriter(None))
    assert res.steps == 4 and fn.calls == 12
    assert fn.trunk_calls == 24  # the gradient cache: each micro-batch's trunk without, then with grad
    assert tr.engine.global_steps == 4


def test_gradient_accumulation_equals_one_micro_batch_of_the_whole_step(tmp_path):
    """3 micro-batches of 32 rows step exactly like one batch of the 96 (the loss is the step's:
    here a mean over all 96 rows, which per-micro-batch accumulation would not give for MSE of a
    mean over unequal parts either)."""
    one, three = _trainer(tmp_path / "one", total=1), None
    obj = _Regression(one)
    micros = [obj.draw(0) for _ in range(3)]
    whole = L.Micro(x=torch.cat([m.x for m in micros]), data={"y": torch.cat([m.data["y"] for m in micros])})
    L.optimizer_step(one, obj, 0, [whole])
    after_one = [p.detach().clone() for p in one.module.parameters()]
    tdist.destroy_process_group()
    three = _trainer(tmp_path / "three", total=1, grad_accum=3)
    L.optimizer_step(three, _Regression(three), 0, micros)
    for a, b in zip(after_one, three.module.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(after_one[0], _model()[0].weight)  # the step moved the weights


def test_bf16_autocast_on_cpu(tmp_path):
    tr = _trainer(tmp_path / "stage", total=2, precision="bf16")
    out = tr.forward(torch.randn(4, 8))
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in tr.module.parameters())  # weights stay fp32
    res = L.fit(tr, _Regression(tr), tb=TBWriter(None))
    assert res.steps == 2 and all(torch.isfinite(p).all() for p in tr.module.parameters())


def test_checkpoints_of_other_work_are_moved_aside_not_resumed(tmp_path):
    tr = _trainer(tmp_path / "stage", total=10, stage_id="aaa")
    L.fit(tr, _Regression(tr), tb=TBWriter(None))
    tdist.destroy_process_group()
    same = _trainer(tmp_path / "stage", total=12, stage_id="aaa")
    assert same.step == 10  # same work: resumed
    tdist.destroy_process_group()
    other = _trainer(tmp_path / "stage", total=12, stage_id="bbb")  # e.g. loss.ms_alpha changed
    assert other.step == 0 and other.resume_info == {}
    aside = [p.name for p in (tmp_path / "stage").iterdir() if p.name.startswith("ckpt.stale-aaa-")]
    assert len(aside) == 1 and (tmp_path / "stage" / aside[0] / "step00000010" / E.META_FILE).exists()
    assert not (tmp_path / "stage" / "ckpt").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zero", [0, 1])
def test_a_planted_deepspeed_checkpoint_is_refused_without_running(tmp_path, zero):
    tr = _trainer(tmp_path / "stage", total=5, zero_stage=zero)
    L.fit(tr, _Regression(tr), tb=TBWriter(None))
    tdist.destroy_process_group()
    ckpt = tmp_path / "stage" / "ckpt" / "step00000005"
    real = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)
    marker = tmp_path / "PWNED"
    torch.save({**real, "planted": _Payload(marker)}, ckpt / "mp_rank_00_model_states.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"step00000005 refused.*could run code.*system"):
        _trainer(tmp_path / "stage", total=6, zero_stage=zero)
    assert not marker.exists()


def test_zero1_checkpoint_resumes_under_weights_only(tmp_path):
    tr = _trainer(tmp_path / "stage", total=5, zero_stage=1)
    L.fit(tr, _Regression(tr), tb=TBWriter(None))
    params = [p.detach().clone() for p in tr.module.parameters()]
    tdist.destroy_process_group()
    again = _trainer(tmp_path / "stage", total=6, zero_stage=1)
    assert again.step == 5 and all(torch.equal(a, b) for a, b in zip(params, again.module.parameters()))
