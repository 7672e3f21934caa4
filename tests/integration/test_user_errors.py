"""Every error a user can cause ends the command with ONE line `<prog>: error: ...` on stderr, exit
code 2 and no traceback (slade_dist/errors.py and the entry points that run through it:
`python -m slade_dist`, `launch/submit.py`, `python -m slade_dist.data`). Each case is a real
process, as a user runs it: a bad config, a planted pickle and mismatching weights as the
pretrained file, hub weights not cached while offline, missing data, a shard the index lists but
the disk lacks, more classes per batch than the data has, a run directory in use, a full disk,
a dataset in the wrong layout; `--debug` brings the traceback back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slade_dist.fileio import DirLock

from . import _train_workers as W

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # ~20 processes, each importing torch
SLADE, SUBMIT, DATA = "python -m slade_dist", "launch/submit.py", "python -m slade_dist.data"
COMMANDS = {
    SLADE: [sys.executable, "-m", "slade_dist"],
    SUBMIT: [sys.executable, str(REPO / "launch" / "submit.py")],
    DATA: [sys.executable, "-m", "slade_dist.data"],
}


class Planted:
    """Unpickling this would import this module: a file holding it must be refused, never run."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ.get("PLANTED_MARKER", "/nonexistent/x")),))


def run(prog: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*COMMANDS[prog], *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)


def assert_user_error(r: subprocess.CompletedProcess, prog: str, *says: str) -> str:
    """Exit 2, no traceback anywhere, exactly one error line on stderr, naming what it must."""
    assert r.returncode == 2, f"rc {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    for word in says:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return W.make_data(tmp_path_factory.mktemp("user_errors"))


def ovr(data: dict, run_dir: Path, *extra: str) -> list[str]:
    return [*W.overrides(data, run_dir), "train.teacher_steps=2", "pretrain.steps=1", *extra]


def test_config_errors(tmp_path, data):
    r = run(SLADE, "teacher", *ovr(data, tmp_path / "run", "train.lr=-1"))
    assert_user_error(r, SLADE, "train.lr", "below the minimum")
    r = run(SLADE, "teacher", *ovr(data, tmp_path / "run", "model.bakbone=resnet18"))
    assert_user_error(r, SLADE, "model.bakbone", "did you mean 'model.backbone'")  # a two-line message, one line
    weights = tmp_path / "w.pt"
    torch.save({"state_dict": {}}, weights)
    r = run(SLADE, "pretrain", *ovr(data, tmp_path / "run", "model.pretrained=hub", f"model.pretrained_path={weights}"))
    assert_user_error(r, SLADE, "both set", "model.pretrained_path=''")
    r = run(SLADE, "pretrain", *ovr(data, tmp_path / "run", "model.pretrained=hub"))  # tiny_cnn: no hub
    assert_user_error(r, SLADE, "model.backbone=timm:<name>")
    assert not (tmp_path / "run").exists()


def test_refused_and_mismatching_weights_files(tmp_path, data):
    marker = tmp_path / "PLANTED_RAN"
    evil = tmp_path / "swav.pth"
    torch.save({"state_dict": {}, "payload": Planted()}, evil)
    env = {"PLANTED_MARKER": str(marker)}
    r = run(SLADE, "teacher", *ovr(data, tmp_path / "a", f"model.pretrained={evil}"), env=env)
    assert_user_error(r, SLADE, str(evil), "refused", "would import code")
    r = run(SLADE, "teacher", *ovr(data, tmp_path / "a", f"model.pretrained_path={evil}"), env=env)
    assert_user_error(r, SLADE, "refused")  # the older spelling: the same refusal
    assert not marker.exists()
    other = tmp_path / "resnet18.pth"
    torch.save(__import__("torchvision").models.resnet18().state_dict(), other)
    r = run(SLADE, "teacher", *ovr(data, tmp_path / "b", f"model.pretrained={other}"))
    assert_user_error(r, SLADE, "does not match TinyCNN", "missing keys")
    # --debug: the same failure with its traceback (and not exit 2)
    r = run(SLADE, "teacher", "--debug", *ovr(data, tmp_path / "a", f"model.pretrained={evil}"), env=env)
    assert r.returncode == 1 and "Traceback" in r.stderr and "UnsafeCheckpointError" in r.stderr, r.stderr[-2000:]
    assert not marker.exists()


def test_hub_weights_not_cached_while_offline(tmp_path, data):
    cache = tmp_path / "empty_hub_cache"
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = ovr(data, tmp_path / "run", "model.backbone=timm:test_vit", "model.pretrained=hub")
    line = assert_user_error(run(SLADE, "pretrain", *args, env=env), SLADE, "'test_vit'", str(cache))
    assert "HF_HUB_OFFLINE=1" in line and "timm.create_model('test_vit', pretrained=True)" in line, line


def test_missing_and_mismatched_data(tmp_path, data):
    r = run(SLADE, "teacher", *ovr(data, tmp_path / "run", f"data.train_shards={tmp_path / 'nowhere'}"))
    assert_user_error(r, SLADE, "data.train_shards", "does not exist")
    broken = tmp_path / "train"
    shutil.copytree(data["train"], broken)
    next(broken.glob("*.tar")).unlink()  # index.json still lists it
    r = run(SLADE, "teacher", *ovr(data, tmp_path / "run", f"data.train_shards={broken}"))
    assert_user_error(r, SLADE, "missing on disk", "python -m slade_dist.data index")
    r = run(SLADE, "teacher", *ovr(data, tmp_path / "run", "train.classes_per_batch=7"))
    assert_user_error(r, SLADE, "train.classes_per_batch", "lists only 6 classes")


def test_run_directory_in_use(tmp_path, data):
    lock = DirLock(tmp_path / "run").acquire()  # a live holder: this process
    try:
        r = run(SLADE, "teacher", *ovr(data, tmp_path / "run"))
        assert_user_error(r, SLADE, "is in use by", f"pid {os.getpid()}")
    finally:
        lock.release()


def test_full_disk(tmp_path, data):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(full)]).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        r = run(SLADE, "teacher", *ovr(data, full / "run"))
        assert_user_error(r, SLADE, "the disk is full", str(full))
    finally:
        subprocess.run(["umount", "-l", str(full)])


def test_launcher_errors(tmp_path, data):
    base = ["--stage", "teacher", "--cluster", "local"]
    r = run(SUBMIT, *base, *ovr(data, tmp_path / "run", "train.lr=-1"))
    assert_user_error(r, SUBMIT, "train.lr", "below the minimum")
    r = run(SUBMIT, *base, *ovr(data, tmp_path / "run", f"data.train_shards={tmp_path / 'nowhere'}"))
    assert_user_error(r, SUBMIT, "data.train_shards", "does not exist")
    r = run(SUBMIT, *base, *ovr(data, tmp_path / "run", "model.pretrained=hub"))
    assert_user_error(r, SUBMIT, "model.backbone=timm:<name>")


def test_shard_tool_errors(tmp_path):
    (tmp_path / "cub").mkdir()
    r = run(DATA, "write", "--format", "cub", "--root", str(tmp_path / "cub"), "--out", str(tmp_path / "out"))
    assert_user_error(r, DATA, str(tmp_path / "cub"))
    r = run(DATA, "index", str(tmp_path / "nowhere"))
    assert_user_error(r, DATA, "does not exist")
