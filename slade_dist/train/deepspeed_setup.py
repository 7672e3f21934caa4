"""DeepSpeed on any machine, and the DeepSpeed config of a trainer.

Owns importing DeepSpeed ready for this machine (CPU accelerator, no shared-memory op build), a
world-1 process group for one plain process, train.precision ('auto': bf16 on GPU, fp32 on CPU)
and `ds_config`. The engine that uses them is engine.py. Tests: tests/unit/test_engine.py.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
import torch.distributed as tdist

from .. import dist
from ..config import TrainConfig


def setup_deepspeed() -> Any:
    """Import DeepSpeed ready for this machine (CPU accelerator + no JIT shm op without CUDA)."""
    dist.set_default_accelerator()
    import deepspeed

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # The shm op is JIT-compiled at every CPU start (~30 s) and training never uses it.
        # Patch the attribute on the real module (the `import ... as` form binds
        # the torch module instead).
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def ensure_process_group() -> None:
    """DeepSpeed needs a process group; give a plain single process a world-1 group itself.

    Without it DeepSpeed looks for launcher variables and then MPI (mpi4py), and fails.
    """
    # DeepSpeed asserts LOCAL_RANK is in the environment (dist.init_distributed writes it for
    # multi-process runs; a plain process is local rank 0)
    os.environ.setdefault("LOCAL_RANK", str(dist.local_rank()))
    if dist.is_dist():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(0)
    tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{dist.find_free_port()}", rank=0, world_size=1)
    _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals; after a previous group was destroyed
    (several trainers in one process, e.g. tests) those would point at the dead group."""
    groups = importlib.import_module("deepspeed.utils.groups")
    for name, value in vars(groups).items():
        if not (name.startswith("_") and name.isupper()):
            continue
        if isinstance(value, dict):
            value.clear()
        elif isinstance(value, tdist.ProcessGroup):
            setattr(groups, name, None)


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 on GPU, fp32 on CPU; explicit values pass through."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return precision


def ds_config(tcfg: TrainConfig, micro_batch: int, *, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config for one trainer."""
    bf16 = resolve_precision(tcfg.precision) == "bf16"
    return {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(tcfg.grad_accum),
        # the loop owns the accumulation (one backward per gradient-cache pass, a step per
        # optimizer step: train/loop.py); DeepSpeed then reduces the gradients at each step()
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(tcfg.grad_clip),
        "zero_optimization": {"stage": int(tcfg.zero_stage)},
        # bf16 mode would cast BatchNorm buffers too ("expected BFloat16 but found Float");
        # autocast keeps fp32 weights
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": bool(load_universal)},
    }
