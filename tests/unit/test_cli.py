"""The command line: help, config errors (exit 2, one clear line), show-config, demo-data."""

from __future__ import annotations

import subprocess
import sys

from slade_dist.__main__ import main


def test_help_lists_stages_and_sections():
    out = subprocess.run(
        [sys.executable, "-m", "slade_dist", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for word in (
        "pretrain",
        "teacher",
        "embed",
        "cluster",
        "student",
        "eval",
        "demo-data",
        "pipeline",
        "teacher_steps",
        "launch",
    ):
        assert word in out


def test_config_error_exit_code(capsys):
    assert main(["show-config", "trian.lr=1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err


def test_show_config(capsys):
    assert main(["show-config", "--config", "configs/demo.yaml", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# hash ") and "lr: 0.5" in out and "backbone: tiny_cnn" in out


def test_demo_data_command(tmp_path, capsys):
    args = [
        "demo-data",
        f"demo.out={tmp_path}/d",
        "demo.train_classes=2",
        "demo.test_classes=2",
        "demo.extra_classes=0",
        "demo.labeled_per_class=2",
        "demo.test_per_class=2",
        "demo.unlabeled_per_class=2",
        "demo.image_size=16",
        "demo.workers=1",
    ]
    assert main(args) == 0
    assert "images/min" in capsys.readouterr().out
    assert main(args) == 0
    assert "already in" in capsys.readouterr().out
