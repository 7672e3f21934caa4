"""Fixtures of the integration tests: the local Slurm cluster, a tiny demo dataset and config, and
the rule for tests waiting on stages that are not implemented yet.

`slurm_cluster` runs tests/integration/slurm_cluster.sh once per session (installs and starts a real
two-node Slurm cluster on this machine; ~40 s on a fresh machine, ~1 s when it runs already). With
CI=true these tests never skip: a cluster that cannot start fails them loudly. Outside CI, a non-root
user (who cannot start system daemons) gets a skip that says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = Path(__file__).with_name("slurm_cluster.sh")
PYTHON = sys.executable


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """A running local Slurm cluster: nodes node1/node2, partitions debug (default) and high."""
    if os.geteuid() != 0 and not in_ci():
        pytest.skip("the local Slurm cluster needs root to install and start its daemons")
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(
            f"local Slurm cluster did not start (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False
        )
    assert shutil.which("sbatch"), "slurm_cluster.sh succeeded but sbatch is not on PATH"
    before = set(_queued_job_ids())
    yield {"partition": "debug", "high_partition": "high", "nodes": "2", "log": proc.stdout}
    # a failed test can leave its jobs queued or running: they would hold the nodes for the next session
    left = [j for j in _queued_job_ids() if j not in before]
    if left:
        subprocess.run(["scancel", *left], capture_output=True, timeout=60)


def _queued_job_ids() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True, timeout=60).stdout
    return sorted(set(out.split()))


@pytest.fixture
def probe_stage(monkeypatch):
    """The `probe` test stage (launch_probe.py) in the registry for one test only."""
    from slade_dist import stages
    from tests.integration.launch_probe import PROBE

    monkeypatch.setitem(stages.STAGES, "probe", PROBE)
    return PROBE


def require_stages(*names: str) -> None:
    """Tests of the real chain wait for its stages: skip (outside CI) or fail (CI) with the reason."""
    from slade_dist.stages import STAGES

    missing = [n for n in names if not STAGES[n].available()]
    demo = REPO_ROOT / "slade_dist" / "data" / "demo.py"
    if not demo.exists():
        missing.append("demo-data generator (slade_dist/data/demo.py)")
    if missing:
        msg = f"WAITING ON STAGES: {', '.join(missing)} not implemented yet"
        if in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


# A chain small enough for tests (tiny CNN, 32 px, a few steps per trainer, 1 round).
TINY_DEMO = [
    "demo.image_size=32",
    "demo.train_classes=8",
    "demo.test_classes=8",
    "demo.extra_classes=4",
    "demo.labeled_per_class=8",
    "demo.test_per_class=6",
    "demo.unlabeled_per_class=6",
    "demo.shard_size=40",
    "demo.workers=1",
]


def tiny_config(path: Path, demo_dir: Path, run_dir: Path, **sections: dict) -> Path:
    """Write a run file for the tiny demo chain; `sections` override / add keys per section."""
    body: dict[str, dict] = {
        "run": {"dir": str(run_dir), "rounds": 1},
        "data": {
            "train_shards": str(demo_dir / "train"),
            "test_shards": str(demo_dir / "test"),
            "unlabeled_shards": str(demo_dir / "unlabeled"),
            "image_size": 32,
            "resize_size": 32,
            "crop_scale_min": 0.5,
            "num_workers": 0,
            "shuffle_buffer": 50,
            "max_buffered": 500,
        },
        "model": {"backbone": "tiny_cnn", "embed_dim": 16, "freeze_bn": False},
        "pretrain": {"steps": 4, "batch_size": 16, "prototypes": 10, "freeze_prototypes_steps": 1},
        "train": {
            "teacher_steps": 6,
            "student_steps": 6,
            "classes_per_batch": 4,
            "samples_per_class": 2,
            "warmup_steps": 1,
            "ckpt_every": 3,
            "log_every": 2,
        },
        "student": {"basis_warmup_steps": 2, "unlabeled_classes_per_batch": 4, "unlabeled_samples_per_class": 2},
        "pseudo": {"k": 8, "niter": 4, "embed_batch_size": 32},
        "eval": {"batch_size": 64},
        # 1 CPU per task: the test cluster's virtual nodes have 2 CPUs each
        "launch": {
            "shapes": {k: {"cpus_per_task": 1} for k in ("pretrain", "teacher", "embed", "cluster", "student", "eval")}
        },
    }
    for name, keys in sections.items():
        body.setdefault(name, {}).update(keys)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """The demo generator's shards at test size (8+8 classes, 32 px): ~4 s."""
    require_stages()
    out = tmp_path_factory.mktemp("tiny_demo")
    subprocess.run(
        [
            PYTHON,
            "-m",
            "slade_dist",
            "demo-data",
            "--config",
            str(REPO_ROOT / "configs" / "demo.yaml"),
            f"demo.out={out}",
            *TINY_DEMO,
        ],
        check=True,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=300,
    )
    return out


def launch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real launcher CLI from the repo root."""
    return subprocess.run(
        [PYTHON, str(REPO_ROOT / "launch" / "submit.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=timeout,
    )
