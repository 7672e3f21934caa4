"""The distributed environment: the ONLY module that reads rank/world from the environment.

Owns how we were started (torchrun-style variables, which torchrun, DeepSpeed's launcher and
submitit's export in a Slurm job set, or one plain process; a bare multi-task srun is refused), the
rendezvous port of cluster jobs, torch.distributed's init (nccl with GPUs, gloo on CPU), rank-0
logging, and collectives that are no-ops in one process: those of the step's global batch
(`gather_rows`, `sum_over_ranks`) and those staged through the GPU under NCCL.
Tests: tests/unit/test_dist.py, tests/integration/test_dist_multiproc.py (2 real gloo processes),
tests/integration/test_slurm.py (2-node jobs, a failing rank ending its job).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

# The rendezvous port of a cluster job, when the user does not choose one. Every task derives it alone
# from the job id (there is no channel before the store exists). The range lies below Linux's default
# ephemeral range (32768-60999), which any outgoing connection on the master node may be holding: a
# port picked there (submitit's own choice is 20000-60000) failed a 2-node job with EADDRINUSE.
MASTER_PORT_MIN, MASTER_PORT_MAX = 20000, 32767
MASTER_PORT_ENV = "SLADE_DIST_MASTER_PORT"  # a fixed port for every cluster job (overrides the above)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. `source` says which launcher's variables were read."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "torchrun" (RANK/WORLD_SIZE: torchrun, submitit's export, DeepSpeed) | "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], key: str, default: int) -> int:
    value = environ.get(key)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError as e:
        raise RuntimeError(f"environment variable {key}={value!r} is not an integer") from e


def job_master_port(job_id: str | int, environ: Mapping[str, str] | None = None) -> int:
    """The port every task of job `job_id` rendezvouses on: $SLADE_DIST_MASTER_PORT, else one taken
    from the job id (consecutive jobs get different ports; array tasks "312_1" count as 3121)."""
    env = os.environ if environ is None else environ
    if env.get(MASTER_PORT_ENV):
        port = _int(env, MASTER_PORT_ENV, 0)
        if not 1 <= port <= 65535:
            raise RuntimeError(f"{MASTER_PORT_ENV}={port} is not a TCP port (1-65535)")
        return port
    number = int(re.sub(r"\D", "", str(job_id)) or 0)
    return MASTER_PORT_MIN + number % (MASTER_PORT_MAX - MASTER_PORT_MIN + 1)


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank/world from torchrun-style variables (in a Slurm job launch/job.py exports
    submitit's), else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", 1)
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        rank_ = _int(env, "RANK", 0)
        return DistEnv(
            rank=rank_,
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", rank_ // max(local_world, 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500),
            source="torchrun",
        )
    # a bare srun step of several tasks sets only SLURM_*: N unrelated single processes would write
    # one run directory
    if "SLURM_STEP_ID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        raise RuntimeError(
            f"task {env.get('SLURM_PROCID', '?')} of a {env['SLURM_NTASKS']}-task srun step without RANK/WORLD_SIZE: "
            "start stages through `python launch/submit.py` (submitit sets the ranks) or torchrun, not a bare srun"
        )
    return DistEnv()


_ENV: DistEnv = DistEnv()


def init_distributed(backend: str | None = None, env: DistEnv | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Initialise torch.distributed for this process (idempotent). A single process inits nothing.

    The variables torch (and DeepSpeed) read are written back so both agree with what we detected.
    """
    global _ENV
    env = env or detect_env()
    _ENV = env
    if not env.distributed or tdist.is_initialized():
        return env
    written = {
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    }
    before = {key: os.environ.get(key) for key in written}
    os.environ.update(written)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank % max(torch.cuda.device_count(), 1))
        tdist.init_process_group(
            backend=backend, rank=env.rank, world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
    except Exception as e:
        # leave nothing half-set: a later detect_env() in this process would read RANK/WORLD_SIZE and
        # wait for ranks that do not exist
        _restore_env(before)
        _ENV = DistEnv()
        if isinstance(e, tdist.DistNetworkError) and _address_in_use(e):
            raise RuntimeError(
                f"rank {env.rank}: the rendezvous port {env.master_addr}:{env.master_port} is already in "
                f"use on this node, so the process group cannot start. A cluster job takes its port from its "
                f"job id: resubmit (a new id gives a new port), or set {MASTER_PORT_ENV} to a port free on "
                f"every node; a torchrun-style start reads MASTER_PORT."
            ) from e
        raise
    return env


def _address_in_use(error: Exception) -> bool:
    return "EADDRINUSE" in str(error) or "address already in use" in str(error).lower()


def _restore_env(saved: Mapping[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def shutdown() -> None:
    global _ENV
    if tdist.is_initialized():
        tdist.destroy_process_group()
    _ENV = DistEnv()


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return _ENV.local_rank if is_dist() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """cuda:<local rank> when GPUs are visible, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def faiss_gpu_count() -> int:
    """GPUs FAISS can use here (0 with faiss-cpu, or without faiss at all)."""
    try:
        import faiss  # lazily: importing slade_dist must not require faiss
    except ImportError:
        return 0
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across ranks in place (returned for chaining); identity in one process."""
    if is_dist():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (rank order); sizes may differ.

    No gradient flows through the result (use it for candidates, not for the local anchors).
    """
    if not is_dist():
        return t.detach()
    n = world_size()
    t = t.detach().contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(n)]
    tdist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long, device=t.device))
    max_n = int(max(s.item() for s in sizes))
    padded = torch.zeros((max_n, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(n)]
    tdist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)], dim=0)


def all_gather_object(obj: Any) -> list[Any]:
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


# ------------------------------------------------------------------ the step's global batch
# Differentiable collectives: why the engine's gradient AVERAGE over ranks then gives exactly the
# one-process gradient is docs/METHOD.md "Any world size".


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.detach().clone()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)  # each rank's use of the sum reaches each part
        return out


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over ranks, differentiable (the gradient is summed back too). Collective:
    every rank calls it, also in backward. Identity in one process."""
    return _SumOverRanks.apply(t) if world_size() > 1 else t


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t` in rank order, differentiable: the gradient of each copy of a row,
    on every rank, is summed into the row's owner (torch.distributed.nn's all_gather: a
    reduce-scatter in backward). Every rank must hold the same number of rows (a P x K share).
    Collective; identity in one process."""
    if world_size() == 1:
        return t
    import torch.distributed.nn.functional as dnn  # torch.distributed.nn imports RPC pieces: only when used

    return torch.cat(dnn.all_gather(t.contiguous()))


def row_offset(n_local: int) -> int:
    """Index of this rank's first row in a gather_rows result of equal shares of `n_local` rows."""
    return rank() * int(n_local)


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only (flushes, so Slurm logs show progress promptly)."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = rank()  # for the format's %(rank)s
        return is_main() or record.levelno >= logging.WARNING


def get_logger(name: str = "slade_dist") -> logging.Logger:
    """A logger that prints INFO on rank 0 and WARNING+ on every rank (prefixed with the rank)."""
    logger = logging.getLogger(name)
    if not getattr(logger, "_slade_configured", False):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s r%(rank)s] %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(_RankZeroFilter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger._slade_configured = True  # type: ignore[attr-defined]
    return logger


def set_default_accelerator() -> None:
    """DeepSpeed must be told to use the CPU when no GPU is visible (it would try CUDA otherwise).

    Call before deepspeed is imported; an explicit DS_ACCELERATOR always wins.
    """
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def find_free_port() -> int:
    """A TCP port free on this host right now (for local multi-process runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shard_slice(items: Sequence[Any], rank_: int | None = None, world: int | None = None) -> list[Any]:
    """This rank's disjoint, deterministic share of `items` (round-robin; may be empty)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(items[r::w])


def _local_worker(
    rank_: int, fn: Callable[..., Any], world: int, port: int, args: tuple, extra_env: dict[str, str]
) -> None:
    os.environ.update(extra_env)
    os.environ.update(
        {
            "RANK": str(rank_),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank_),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    fn(*args)


def run_local_processes(
    fn: Callable[..., Any], world: int, args: tuple = (), extra_env: Mapping[str, str] | None = None
) -> None:
    """Run fn(*args) in `world` fresh processes on this machine with torchrun-style env set.

    `fn` must be importable (module level). Raises if any process fails. Used by tests and by the
    launcher's local mode; each process calls init_distributed() itself.
    """
    import torch.multiprocessing as mp

    port = find_free_port()
    mp.start_processes(
        _local_worker,
        args=(fn, world, port, tuple(args), dict(extra_env or {})),
        nprocs=world,
        join=True,
        start_method="spawn",
    )


# ------------------------------------------- collectives of tensors that may live in host memory
def _staged(t: torch.Tensor) -> bool:
    """NCCL cannot send host memory, yet a CPU tensor reaches a collective under NCCL on GPU nodes
    (FAISS backends keep the k-means sample on the host; counters are kept on the CPU): such a
    tensor goes through this rank's GPU and comes back."""
    return is_dist() and t.device.type == "cpu" and tdist.get_backend() == "nccl"


def staged_all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over ranks on `t`'s device, whatever the backend (in place unless staged)."""
    if _staged(t):
        return all_reduce_sum(t.to(device())).cpu()
    return all_reduce_sum(t)


def staged_broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s tensor on every rank, on `t`'s device (same shape and dtype everywhere)."""
    if not is_dist():
        return t
    buf = t.to(device()) if _staged(t) else t.contiguous()
    tdist.broadcast(buf, src=src)
    return buf.to(t.device)


def all_to_all_rows(t: torch.Tensor, send: Sequence[int], recv: Sequence[int]) -> torch.Tensor:
    """Rows [sum(send[:j]), sum(send[:j+1])) of `t` go to rank j; returns the rows received, by
    source rank (recv[j] from rank j), on `t`'s device. Collective: call on every rank."""
    buf = t.to(device()) if _staged(t) else t.contiguous()
    out = torch.empty((int(sum(recv)), *t.shape[1:]), dtype=t.dtype, device=buf.device)
    tdist.all_to_all_single(
        out, buf, output_split_sizes=[int(v) for v in recv], input_split_sizes=[int(v) for v in send]
    )
    return out.to(t.device)


def all_to_all_records(rows: np.ndarray, dest: np.ndarray) -> np.ndarray:
    """Structured numpy rows to their ranks (row i to rank dest[i]; raw bytes on the wire through
    all_to_all_rows); returns the rows this rank received, by source rank. Collective; in one
    process the rows themselves."""
    if not is_dist():
        return rows
    rows = np.ascontiguousarray(rows[np.argsort(dest, kind="stable")])
    send = np.bincount(dest, minlength=world_size())
    recv = np.array(all_gather_object(send.tolist()))[:, rank()]
    wire = torch.from_numpy(rows.view(np.uint8).reshape(len(rows), rows.dtype.itemsize))
    return all_to_all_rows(wire, send, recv).numpy().reshape(-1).view(rows.dtype)
