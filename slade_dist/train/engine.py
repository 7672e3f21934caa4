"""The DeepSpeed engine every trainer (pretrain, teacher, student) runs on: `Trainer`.

Owns the client optimizer (AdamW or SGD) over named lr groups with a warmup + cosine schedule (a
group can start late: lr 0 until its start step, which is how the student's basis warm-up and
SwAV's frozen prototypes are done without touching grads), checkpoints and resume (stage ids,
weights_only loads, the universal conversion: docs/ARCHITECTURE.md "Trainer checkpoints"; the run
directory must be on a filesystem every rank sees), BatchNorm running statistics averaged over
ranks and an exact parameter fingerprint. DeepSpeed's setup and config: deepspeed_setup.py; the
step loop: loop.py.
Tests: tests/unit/test_engine.py, tests/integration/test_train_multirank.py,
tests/integration/test_resume.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import pkgutil
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import dist
from ..config import TrainConfig
from ..fileio import atomic_write_json, explained_writes, set_aside
from ..models import UnsafeCheckpointError, read_checkpoint, unsafe_global
from .deepspeed_setup import ds_config, ensure_process_group, resolve_precision, setup_deepspeed
from .sync_bn import sync_batchnorm

META_FILE = "slade_meta.json"  # written last: a checkpoint without it (a killed save) does not count
KEEP_CHECKPOINTS = 2


# ------------------------------------------------------------------------------- optimiser
class WarmupCosine:
    """lr factor of one parameter group: 0 before `start`, linear warmup, cosine decay to 0.

    A class (not a lambda) so LambdaLR can checkpoint it.
    """

    def __init__(self, total_steps: int, warmup_steps: int, start: int = 0):
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.start = int(start)

    def __call__(self, step: int) -> float:
        s = step - self.start
        if s < 0:
            return 0.0
        span = max(self.total_steps - self.start, 1)
        warm = min(self.warmup_steps, span)
        if s < warm:
            return (s + 1) / warm  # the first step already moves
        progress = min((s - warm) / max(span - warm, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class ParamGroup:
    """Named parameters with their own peak lr; `start`: first optimizer step it trains."""

    name: str
    params: list[torch.nn.Parameter]
    lr: float
    start: int = 0
    weight_decay: float | None = None


def build_optimizer(groups: Sequence[ParamGroup], tcfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (default) or SGD over the named groups; empty groups are dropped."""
    torch_groups = []
    for g in groups:
        params = [p for p in g.params if p.requires_grad]
        if not params:
            continue
        wd = tcfg.weight_decay if g.weight_decay is None else g.weight_decay
        torch_groups.append({"params": params, "lr": g.lr, "weight_decay": wd, "name": g.name})
    if not torch_groups:
        raise ValueError("no trainable parameters in any group")
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(torch_groups, lr=torch_groups[0]["lr"])
    return torch.optim.SGD(torch_groups, lr=torch_groups[0]["lr"], momentum=tcfg.momentum)


# ------------------------------------------------------------------------------ checkpoints
# DeepSpeed's own classes in its ZeRO optimizer state (plain data; the only non-container types
# a checkpoint needs). Found by loading real ZeRO-0/1 checkpoints with weights_only=True.
_DEEPSPEED_STATE_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside runs with weights_only=True, DeepSpeed's included (whose own
    loads opt out; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that), with only
    DeepSpeed's state classes allow-listed. A checkpoint can then never run code."""
    allowed = [pkgutil.resolve_name(name) for name in _DEEPSPEED_STATE_TYPES]
    saved = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if saved is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = saved


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """(step, tag, meta) of every checkpoint whose save finished on all ranks, oldest first."""
    out = []
    if not ckpt_dir.is_dir():
        return out
    for meta_path in ckpt_dir.glob(f"step*/{META_FILE}"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a meta file being written by a killed rank 0: ignore that checkpoint
        out.append((int(meta["step"]), meta_path.parent.name, meta))
    return sorted(out)


def convert_to_universal(ckpt_dir: Path, tag: str) -> str:
    """Run DeepSpeed's ds_to_universal on <ckpt_dir>/<tag> once (rank 0); returns the new tag."""
    from deepspeed.checkpoint import ds_to_universal

    out_tag = f"{tag}_universal"
    out = ckpt_dir / out_tag
    done = out / "CONVERTED"
    if dist.is_main() and not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        args = ["--input_folder", str(ckpt_dir / tag), "--output_folder", str(out)]
        args += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
        saved = sys.argv
        sys.argv = ["ds_to_universal", *args]  # it reads its options from sys.argv only
        try:
            parsed = ds_to_universal.parse_arguments()
        finally:
            sys.argv = saved
        with weights_only_loads():
            ds_to_universal.main(parsed)
        done.write_text("ok\n")
    dist.barrier()
    return out_tag


class Trainer:
    """A DeepSpeed engine over `module` with named lr groups, schedule and checkpoint/resume.

    After construction `step` is the number of optimizer steps already done (0, or the resumed
    checkpoint's) and `client_state` holds what the stage saved with that checkpoint.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        groups: Sequence[ParamGroup],
        tcfg: TrainConfig,
        *,
        stage_dir: str | os.PathLike[str],
        total_steps: int,
        micro_batch: int,
        stage_id: str = "",
        sync_bn: bool = True,
    ):
        deepspeed = setup_deepspeed()
        ensure_process_group()
        self.tcfg = tcfg
        self.stage_id = stage_id
        self.total_steps = int(total_steps)
        self.stage_dir = Path(stage_dir)
        self.ckpt_dir = self.stage_dir / "ckpt"
        self.precision = resolve_precision(tcfg.precision)
        self.log = dist.get_logger()
        resume_tag, universal = self._plan_resume()

        module = module.to(dist.device())
        if sync_bn and dist.world_size() > 1 and (n_bn := sync_batchnorm(module.train())):
            self.log.info(f"{n_bn} BatchNorm layers normalise the global batch of all ranks (model.sync_bn)")
        optimizer = build_optimizer(groups, tcfg)
        self.group_names = [g["name"] for g in optimizer.param_groups]
        starts = {g.name: g.start for g in groups}
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [WarmupCosine(total_steps, tcfg.warmup_steps, starts[n]) for n in self.group_names]
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config(tcfg, micro_batch, load_universal=universal),
        )
        # train() explicitly: modules apply their own train-mode rules here (the Embedder keeps
        # frozen BatchNorm in eval mode), which a freshly built module has not done yet
        self.engine.train()
        if dist.world_size() == 1 and int(tcfg.zero_stage) == 0:
            # one rank: DeepSpeed's gradient all-reduce is a flatten/copy round trip for nothing
            # (~10% of a ResNet-18 CPU step, bench/trainer.py)
            self.engine.enable_backward_allreduce = False
        self.step = 0
        self.client_state: dict[str, Any] = {}
        self.resume_info: dict[str, Any] = {}  # what was restored (for logs, DONE.json and tests)
        if resume_tag is not None:
            self._load(resume_tag)

    # -- properties
    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def lrs(self) -> dict[str, float]:
        return {n: float(g["lr"]) for n, g in zip(self.group_names, self.optimizer.param_groups)}

    # -- training
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """engine(...): runs under bf16 autocast when enabled."""
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate `loss` into the accumulated gradients (unscaled: fit's gradient-cache
        passes add up to the step's gradient). Call step_optimizer once per step."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step_optimizer(self) -> None:
        """Average the accumulated gradients over ranks and step the optimizer and the schedule."""
        self.engine.step()
        self.step += 1

    # -- checkpoints
    def _plan_resume(self) -> tuple[str | None, bool]:
        ckpts = complete_checkpoints(self.ckpt_dir)
        if ckpts and ckpts[-1][2].get("stage_id", "") != self.stage_id:
            self._set_aside_other_work(ckpts[-1][2].get("stage_id", "unknown"))
            ckpts = []
        if not ckpts:
            return None, False
        step, tag, meta = ckpts[-1]
        world = dist.world_size()
        # ZeRO-0 loads at any world size; ZeRO-1/2 at another one only through the universal conversion
        if int(meta.get("world_size", world)) != world and int(meta.get("zero_stage", 0)) > 0:
            self.log.info(
                f"checkpoint {tag} was written by {meta['world_size']} ranks with ZeRO-"
                f"{meta['zero_stage']}; converting to a universal checkpoint for {world}"
            )
            return convert_to_universal(self.ckpt_dir, tag), True
        return tag, False

    def _set_aside_other_work(self, old_id: str) -> None:
        """Checkpoints of another config or other inputs: moved aside (never resumed, never
        deleted), and training starts from step 0."""
        if dist.is_main():
            dest = set_aside(self.ckpt_dir, f"stale-{old_id}")
            self.log.warning(
                f"{self.ckpt_dir} holds checkpoints of other work (stage id {old_id}, this run is "
                f"{self.stage_id}): moved to {dest}; training starts from step 0"
            )
        dist.barrier()

    def _load(self, tag: str) -> None:
        try:
            with weights_only_loads():
                path, client_state = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"checkpoint {self.ckpt_dir / tag} refused: it needs more than tensors, plain containers and "
                f"DeepSpeed's own state classes to load (weights_only=True), so it could run code; move "
                f"{self.ckpt_dir} away to restart the stage from scratch ({unsafe_global(e) or type(e).__name__})"
            ) from e
        if path is None:
            raise RuntimeError(
                f"DeepSpeed could not load checkpoint {self.ckpt_dir / tag}; delete it "
                f"to restart the stage from scratch"
            )
        if tag.endswith("_universal"):
            self._restore_buffers(self.ckpt_dir / tag)
        self.client_state = dict(client_state or {})
        self.step = int(self.client_state.get("step", 0))
        base = getattr(self.optimizer, "optimizer", self.optimizer)  # ZeRO wraps the torch optimizer
        opt_steps = [
            int(torch.as_tensor(st["step"]).item())
            for st in base.state.values()
            if isinstance(st, dict) and "step" in st
        ]
        self.resume_info = {
            "step": self.step,
            "tag": tag,
            "written_by_world_size": self.client_state.get("world_size"),
            "optimizer_step": max(opt_steps) if opt_steps else None,
            "scheduler_step": int(getattr(self.scheduler, "last_epoch", -1)),
            "param_digest": param_digest(self.module),
        }
        self.log.info(
            f"resumed from {self.ckpt_dir / tag} at step {self.step} (written by "
            f"{self.resume_info['written_by_world_size']} ranks)"
        )

    @torch.no_grad()
    def _restore_buffers(self, folder: Path) -> None:
        """A universal load restores parameters only; buffers (BatchNorm statistics, the basis
        Gaussians) come from the module state the conversion copied beside them."""
        files = sorted(folder.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise RuntimeError(f"universal checkpoint {folder} has no mp_rank_*_model_states.pt")
        saved = read_checkpoint(files[0]).get("module") or {}
        for name, buf in self.module.named_buffers():
            if name in saved:
                buf.copy_(saved[name].to(buf.device, buf.dtype))

    def save(self, extra: Mapping[str, Any] | None = None) -> Path:
        """Collective: every rank calls it. Writes ckpt/step%08d + its meta, prunes old ones."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        tag = f"step{self.step:08d}"
        state = {
            "step": self.step,
            "world_size": dist.world_size(),
            **(extra or {}),
            # what ds_to_universal needs to convert this checkpoint later
            "iteration": self.step,
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        }
        with explained_writes(self.ckpt_dir / tag):
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=state)
        dist.barrier()  # every rank's files are on disk before the checkpoint counts
        if dist.is_main():
            meta = {
                "step": self.step,
                "world_size": dist.world_size(),
                "zero_stage": int(self.tcfg.zero_stage),
                "stage_id": self.stage_id,
                "time": time.time(),
            }
            atomic_write_json(self.ckpt_dir / tag / META_FILE, meta, indent=None)
            self._prune()
        dist.barrier()
        return self.ckpt_dir / tag

    def _prune(self) -> None:
        keep = {t for _, t, _ in complete_checkpoints(self.ckpt_dir)[-KEEP_CHECKPOINTS:]}
        for d in self.ckpt_dir.iterdir():
            if not d.is_dir():
                continue
            base = d.name.removesuffix("_universal")
            if base.startswith("step") and base not in keep:
                shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------- replica state
@torch.no_grad()
def average_bn_buffers(module: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks (DeepSpeed syncs only gradients).

    Each rank's BN layers see only its own batches; averaging before a checkpoint or export makes
    the replicas identical again, so rank 0's file stands for all of them.
    """
    if dist.world_size() == 1:
        return
    for m in module.modules():
        if (
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats
            and m.running_mean is not None
        ):
            for buf in (m.running_mean, m.running_var):
                buf.copy_(dist.all_reduce_sum(buf.detach().clone()) / dist.world_size())


def param_digest(module: torch.nn.Module) -> str:
    """Exact fingerprint of a module's parameters and buffers (compare replicas across ranks)."""
    h = hashlib.sha256()
    for name, t in sorted([*module.named_parameters(), *module.named_buffers()], key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
