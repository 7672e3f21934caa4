"""Environment detection of slade_dist.dist from real env dicts, and single-process no-ops."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from slade_dist import dist


def test_single_process_defaults():
    env = dist.detect_env({"HOME": "/root", "PATH": "/usr/bin"})
    assert env == dist.DistEnv() and env.source == "single" and not env.distributed


def test_torchrun_env():
    env = dist.detect_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node7",
            "MASTER_PORT": "29123",
            "GROUP_RANK": "1",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (3, 8, 1, 2, 1)
    assert (env.master_addr, env.master_port, env.source) == ("node7", 29123, "torchrun")


def test_a_bare_multi_task_srun_step_is_refused_naming_the_launchers():
    """srun alone sets only SLURM_*: N unrelated single processes would write one run directory."""
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}
    with pytest.raises(RuntimeError, match=r"task 5 of a 8-task srun step .*launch/submit\.py.*torchrun"):
        dist.detect_env(slurm)
    assert dist.detect_env({**slurm, "SLURM_NTASKS": "1"}).source == "single"  # a one-task step is one process


def test_job_master_port_stays_below_the_ephemeral_range():
    """Outgoing connections take ports from 32768-60999 on Linux; a rendezvous port there can be taken."""
    ports = [dist.job_master_port(j, {}) for j in range(0, 40_000)]
    assert min(ports) == dist.MASTER_PORT_MIN and max(ports) == dist.MASTER_PORT_MAX < 32768
    assert len({dist.job_master_port(j, {}) for j in range(311, 311 + 1000)}) == 1000  # neighbours differ
    assert dist.job_master_port("312_1", {}) == dist.job_master_port(3121, {})  # array task ids
    assert dist.job_master_port(311, {dist.MASTER_PORT_ENV: "29001"}) == 29001
    with pytest.raises(RuntimeError, match="not a TCP port"):
        dist.job_master_port(311, {dist.MASTER_PORT_ENV: "70000"})


def test_port_in_use_is_a_clear_error(monkeypatch):
    """Rank 0 cannot open the rendezvous port: say which port and what to do (torch says EADDRINUSE)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_PORT", "12345")  # restored, not left pointing at the taken port
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dist.DistEnv(rank=0, world_size=2, master_port=port, source="torchrun")
        with pytest.raises(RuntimeError, match=f"rendezvous port 127.0.0.1:{port} is already in use") as e:
            dist.init_distributed("gloo", env, timeout_s=20)
    assert dist.MASTER_PORT_ENV in str(e.value)
    assert not dist.is_dist()
    # nothing half-set is left: the next detect_env() in this process must not wait for rank 1
    assert "WORLD_SIZE" not in os.environ and os.environ.get("MASTER_PORT") == "12345"
    assert dist.detect_env().world_size == 1 and dist.world_size() == 1


def test_torchrun_vars_win_over_slurm():
    """submitit exports RANK/WORLD_SIZE inside Slurm jobs: those are the ones to use."""
    env = dist.detect_env(
        {
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_STEP_ID": "0",
            "RANK": "1",
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "node1",
            "MASTER_PORT": "31000",
        }
    )
    assert env.source == "torchrun" and env.master_port == 31000


def test_slurm_batch_script_without_step_is_single():
    """sbatch's own shell (no srun step) is one process, not rank k of the job."""
    env = dist.detect_env({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})
    assert env.source == "single" and env.world_size == 1


def test_bad_integer_is_named():
    try:
        dist.detect_env({"RANK": "x", "WORLD_SIZE": "2"})
    except RuntimeError as e:
        assert "RANK" in str(e)
    else:
        raise AssertionError("expected an error")


def test_single_process_collectives_are_noops(capsys):
    assert not dist.is_dist() and dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    t = torch.arange(4.0)
    assert torch.equal(dist.all_reduce_sum(t.clone()), t)
    assert torch.equal(dist.all_gather_cat(t), t)
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(5) == 5
    dist.barrier()
    dist.print0("hello rank0")
    assert "hello rank0" in capsys.readouterr().out
    env = dist.init_distributed(env=dist.DistEnv())
    assert not env.distributed and not dist.is_dist()


def test_shard_slice_is_disjoint_and_complete():
    items = list(range(7))
    parts = [dist.shard_slice(items, r, 3) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items
    assert dist.shard_slice(items[:2], 3, 4) == []


def test_free_port_is_bindable():
    import socket

    port = dist.find_free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
