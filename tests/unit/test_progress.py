"""Tests of slade_dist/progress.py: progress on a real pseudo-terminal and in a job log, and the
progress its callers show: k-means per Lloyd iteration (pseudo/kmeans) and the embed bar's total
over img2dataset output indexed in place (pseudo/embed.py `_progress`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slade_dist import dist
from slade_dist.config import PseudoConfig, load_config
from slade_dist.data.shards import encode_jpeg, shard_paths, write_shard
from slade_dist.data.writers import index_img2dataset
from slade_dist.progress import progress, steps
from slade_dist.pseudo.embed import _progress
from slade_dist.pseudo.kmeans import train_centroids

REPO = Path(__file__).resolve().parents[2]


class _Lines(logging.Handler):
    """Collects the messages of slade_dist's logger (which does not propagate to the root)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    handler = _Lines()
    logger = dist.get_logger()
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def test_steps_log_a_line_per_step_in_a_job_log(log_lines):
    assert not sys.stderr.isatty()  # pytest captures stderr: this is the job-log case
    assert list(steps(range(3), "demo", log_every_s=0)) == [0, 1, 2]
    assert [m for m in log_lines if m.startswith("[demo]")] == ["[demo] 1/3", "[demo] 2/3", "[demo] 3/3"]
    list(steps(range(4), "rare", log_every_s=3600))
    assert [m for m in log_lines if m.startswith("[rare]")] == ["[rare] 1/4", "[rare] 4/4"]  # first and last
    assert progress(10, "eval").disable  # no bar in a job log: its redraws pile up on one line


def test_on_a_terminal_the_bar_is_redrawn_after_every_step(tmp_path):
    child = (
        "from slade_dist.progress import progress, steps\n"
        "for _ in steps(range(3), 'lloyd'):\n    pass\n"
        "with progress(4, 'eval', 'img') as bar:\n    bar.update(4)\n"
    )
    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a width to draw in
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=sub, stdout=sub, stderr=sub, cwd=REPO, env=env)
    os.close(sub)
    out = b""
    try:
        while chunk := _read(main):
            out += chunk
    finally:
        os.close(main)
        assert proc.wait(timeout=120) == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    for shown in ("lloyd", "1/3", "2/3", "3/3", "eval", "0/4"):
        assert shown in text, text


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the child closed the terminal
        return b""


def test_kmeans_reports_every_lloyd_iteration_in_a_job_log(log_lines):
    x = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    train_centroids({0: x}, PseudoConfig(spherical=False, k=4, niter=5, backend="torch"))
    ours = [m for m in log_lines if m.startswith("[k-means lloyd k=4]")]
    assert ours[0] == "[k-means lloyd k=4] 1/5" and ours[-1] == "[k-means lloyd k=4] 5/5", log_lines


def test_embed_bar_keeps_its_total_over_img2dataset_output_indexed_in_place(tmp_path):
    src, out = tmp_path / "img2dataset_out", tmp_path / "indexed"
    for i, n in enumerate((5, 3)):
        img = Image.new("RGB", (16, 16), (i * 90, 40, 200))
        write_shard(src / f"{i:05d}.tar", [{"__key__": f"{i}_{j}", "jpg": encode_jpeg(img)} for j in range(n)])
    index_img2dataset(src, out)
    cfg = load_config(None, [f"data.unlabeled_shards={out}"], check_paths=False)
    todo = shard_paths(out)
    assert [p.name for p in todo] == ["00000.tar", "00001.tar"] and todo[0].parent != out
    bar = _progress(todo, cfg)
    try:
        assert bar.total == 8
    finally:
        bar.close()
    bar = _progress(todo[1:], cfg)  # a rank's share: only its shards count
    try:
        assert bar.total == 3
    finally:
        bar.close()


def test_a_bar_costs_no_tensorboard_or_torchvision_import():
    """k-means used to import TensorBoard and torchvision (through tb.py) for its bar."""
    child = (
        "import sys\n"
        "import slade_dist.pseudo.kmeans, slade_dist.progress\n"
        "heavy = [m for m in ('tensorboard', 'torch.utils.tensorboard', 'torchvision') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
