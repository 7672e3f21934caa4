"""The step loop: optimizer steps over infinite streams, logging, periodic eval, checkpoints.

Owns `fit(trainer, objective, ...)`: optimizer steps from the trainer's (resumed) step to its total,
counted in optimizer steps so every rank runs the same micro-batches and no collective can hang.
A stage hands in a `StepObjective` (draw a micro-batch, the trunk of one micro-batch, the loss of
the WHOLE step from every micro-batch's trunk outputs), so every statistic a loss uses is the
optimizer step's whatever train.grad_accum is (`optimizer_step`: the gradient cache, docs/METHOD.md
"Any world size"). Also the scalars averaged over ranks every train.log_every steps (TensorBoard,
a plain line in job logs), the rank-0 bar, periodic eval and checkpoints, and the stream helpers
an objective uses (`timed_next`, `SkipDelta`).
Tests: tests/unit/test_engine.py, tests/integration/test_world_invariance.py (grad_accum 2 = one
micro-batch), tests/integration/test_train_multirank.py, tests/integration/test_resume.py.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from .. import dist
from ..progress import progress
from ..tb import TBWriter
from .engine import Trainer, average_bn_buffers, param_digest


@dataclass
class Micro:
    """One micro-batch drawn for a step: the trunk's input, what the loss reads, and counts."""

    x: Any  # the trunk's input, on the device
    data: dict[str, Any] = field(default_factory=dict)  # what the step's loss reads (labels, ...)
    images: int = 0
    skipped: int = 0  # samples left out as corrupt or lost to truncated tars since the last draw
    wait_s: float = 0.0  # seconds spent waiting for data


class StepObjective:
    """What a trainer stage hands to `fit`: draw(step) -> Micro, trunk(x) -> outputs of one
    micro-batch (one engine forward), loss(step, outs, micros) -> (loss, scalars) of the whole
    step from every micro-batch's outputs (in draw order). Collectives belong in `loss`: it runs
    once per step on every rank."""

    trainer: Trainer

    def draw(self, step: int) -> Micro:
        raise NotImplementedError

    def trunk(self, x: Any) -> torch.Tensor:
        return self.trainer.forward(x)

    def trunk_trains(self, step: int) -> bool:
        """False: the trunk gets no gradient at this step (it then runs once, without grad)."""
        return True

    def loss(self, step: int, outs: list[torch.Tensor], micros: list[Micro]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1]:
        torch.cuda.set_rng_state_all(state[1])


def optimizer_step(trainer: Trainer, objective: StepObjective, step: int, micros: list[Micro]) -> tuple[float, dict]:
    """One optimizer step of `objective` over `micros`; returns the step's loss value and scalars.

    Several micro-batches: the gradient cache. Every trunk runs without grad first, the step's loss
    is computed once on those outputs as leaves and back-propagated (the parameters outside the
    trunk get their gradient there: heads, W_a), then each trunk runs again with grad under the
    same RNG state and back-propagates its leaf's gradient: exact, at one extra trunk forward per
    micro-batch, memory one micro-batch's. The engine accumulates and steps once."""
    trains = objective.trunk_trains(step)
    if len(micros) == 1:
        with torch.set_grad_enabled(trains):
            out = objective.trunk(micros[0].x)
        loss, scalars = objective.loss(step, [out], micros)
        trainer.backward(loss)
    else:
        states, outs = [], []
        with torch.no_grad():
            for m in micros:
                states.append(_rng_state())  # dropout & co. must draw the same in the second pass
                outs.append(objective.trunk(m.x))
        leaves = [o.detach().requires_grad_(trains) for o in outs]
        loss, scalars = objective.loss(step, leaves, micros)
        trainer.backward(loss)  # the parameters outside the trunk, and each leaf's .grad
        if trains:
            after = _rng_state()
            for m, state, leaf in zip(micros, states, leaves):
                if leaf.grad is None:  # an output the loss did not use (the same on every rank)
                    continue
                _set_rng_state(state)
                out = objective.trunk(m.x)
                trainer.backward((out.float() * leaf.grad.float()).sum())
            _set_rng_state(after)
    trainer.step_optimizer()
    return float(loss.detach()), scalars


@dataclass
class FitResult:
    steps: int
    start_step: int
    final_loss: float | None
    first_loss: float | None
    history: list[tuple[int, float]]
    seconds: float
    param_digest: str = ""  # sha256 of this rank's parameters + buffers (equal on every rank)
    images: int = 0  # images trained on in this run, all ranks
    skipped: int = 0  # samples left out as corrupt or lost to truncated tars, all ranks


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average each key over the ranks that have it (keys may differ, e.g. optional stats)."""
    if dist.world_size() == 1:
        return dict(values)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for part in dist.all_gather_object(dict(values)):
        for k, v in part.items():
            sums[k] += float(v)
            counts[k] += 1
    return {k: sums[k] / counts[k] for k in sums}


def fit(
    trainer: Trainer,
    objective: StepObjective,
    *,
    tb: TBWriter,
    state_fn: Callable[[], dict[str, Any]] | None = None,
    eval_fn: Callable[[int], dict[str, float]] | None = None,
    after_step: Callable[[int], dict[str, float] | None] | None = None,
    desc: str = "train",
) -> FitResult:
    """Run optimizer steps from trainer.step to trainer.total_steps.

    Each step draws train.grad_accum micro-batches from `objective` and runs `optimizer_step`;
    `after_step(step)` runs after each optimizer step (extra scalars to log); `state_fn()` adds
    stage state to each checkpoint; `eval_fn(step)` runs every train.eval_every steps on all ranks
    and returns metrics to log.
    """
    tcfg = trainer.tcfg
    total = trainer.total_steps
    start = trainer.step
    history: list[tuple[int, float]] = []
    window: dict[str, float] = defaultdict(float)
    totals = torch.zeros(2, dtype=torch.float64)  # images, skipped (this rank)
    n_steps = 0
    t_window = time.perf_counter()
    t_start = time.perf_counter()
    # a job log is not a terminal: no carriage-return redraws there, a plain line per log window
    tty = sys.stderr.isatty()
    bar = progress(total, desc, initial=start, leave=True)
    try:
        while trainer.step < total:
            micros = [objective.draw(trainer.step) for _ in range(tcfg.grad_accum)]
            loss, scalars = optimizer_step(trainer, objective, trainer.step, micros)
            window["loss/total"] += loss
            for k, v in scalars.items():
                window[k] += float(v)
            for m in micros:
                window["_images"] += m.images
                window["_skipped"] += m.skipped
                window["_wait"] += m.wait_s
                totals += torch.tensor([m.images, m.skipped], dtype=torch.float64)
            n_steps += 1
            step = trainer.step
            extra = (after_step(step) or {}) if after_step is not None else {}
            bar.update(1)
            if step % tcfg.log_every == 0 or step == total:
                elapsed = time.perf_counter() - t_window
                logged = _log_window(trainer, window, n_steps, elapsed, extra, tb, step)
                history.append((step, logged["loss/total"]))
                bar.set_postfix(loss=f"{logged['loss/total']:.4f}")
                if not tty:
                    _log_line(desc, step, total, start, logged, time.perf_counter() - t_start)
                window.clear()
                n_steps = 0
                t_window = time.perf_counter()
            if eval_fn is not None and tcfg.eval_every > 0 and step % tcfg.eval_every == 0:
                tb.scalars({f"eval/{k}": v for k, v in eval_fn(step).items()}, step)
            if step % tcfg.ckpt_every == 0 or step == total:
                average_bn_buffers(trainer.module)
                trainer.save(state_fn() if state_fn else None)
                tb.flush()
    finally:
        bar.close()
    average_bn_buffers(trainer.module)  # also when nothing ran (resumed at the last step)
    images, skipped = (int(v) for v in dist.staged_all_reduce_sum(totals).tolist())
    return FitResult(
        steps=trainer.step,
        start_step=start,
        final_loss=history[-1][1] if history else None,
        first_loss=history[0][1] if history else None,
        history=history,
        seconds=time.perf_counter() - t_start,
        param_digest=param_digest(trainer.module),
        images=images,
        skipped=skipped,
    )


def _log_line(desc: str, step: int, total: int, start: int, logged: Mapping[str, float], elapsed: float) -> None:
    """One readable line for job logs: step, each loss term, lr, images/s, data wait, ETA."""
    losses = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in logged.items() if k.startswith("loss/"))
    lrs = " ".join(f"{k}={v:.2e}" for k, v in logged.items() if k.startswith("lr/"))
    rate = (step - start) / max(elapsed, 1e-9)
    eta = tqdm.format_interval((total - step) / rate) if rate > 0 else "?"
    dist.get_logger().info(
        f"[{desc}] step {step}/{total} {losses} {lrs} "
        f"images/s={logged.get('perf/images_per_s', 0.0):.1f} "
        f"data_wait={logged.get('perf/data_wait_pct', 0.0):.0f}% eta={eta}"
    )


def _log_window(
    trainer: Trainer,
    window: Mapping[str, float],
    n_steps: int,
    elapsed: float,
    extra: Mapping[str, float],
    tb: TBWriter,
    step: int,
) -> dict[str, float]:
    """Average the window's sums over steps and ranks, add throughput, write scalars."""
    means = {k: v / max(n_steps, 1) for k, v in window.items() if not k.startswith("_")}
    means.update(extra)
    means["_wait_frac"] = window.get("_wait", 0.0) / max(elapsed, 1e-9)
    means["_images"] = window.get("_images", 0.0)
    means["_skipped"] = window.get("_skipped", 0.0)
    g = _mean_across_ranks(means)
    w = dist.world_size()
    out = {k: v for k, v in g.items() if not k.startswith("_")}
    out["perf/images_per_s"] = g["_images"] * w / max(elapsed, 1e-9)
    out["perf/data_wait_pct"] = 100.0 * g["_wait_frac"]
    out["data/skipped_samples"] = g["_skipped"] * w
    out.update({f"lr/{n}": v for n, v in trainer.lrs().items()})
    tb.scalars(out, step)
    return out


def timed_next(it: Any) -> tuple[Any, float]:
    """next(it) and the seconds spent waiting for it (the data-wait figure)."""
    t0 = time.perf_counter()
    item = next(it)
    return item, time.perf_counter() - t0


class SkipDelta:
    """The readers report skipped samples as a running total; logging wants per-batch counts."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def __call__(self, stream_name: str, total: int) -> int:
        d = int(total) - self._last.get(stream_name, 0)
        self._last[stream_name] = int(total)
        return max(d, 0)
