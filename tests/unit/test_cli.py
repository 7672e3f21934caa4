"""The command line, slade_dist/__main__.py: help (global and per stage), config errors (exit 2, one
clear line), show-config, demo-data, refusing raw img2dataset shards, the result line printed once
by two ranks, the closing summary (a pretrain stage that handed on its input weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from slade_dist.__main__ import main, print_summary
from slade_dist.config import load_config
from slade_dist.stages import RunLayout

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def test_stage_help_lists_the_keys_that_stage_reads():
    """`teacher --help` printed the global help; it now lists run, data and the sections the
    teacher's result depends on, each key with its help text and default."""
    proc = subprocess.run(
        [sys.executable, "-m", "slade_dist", "teacher", "--help", "--config", "configs/cub.yaml", "train.lr=0.5"],
        capture_output=True,
        text=True,
        check=True,
    )
    out = proc.stdout
    assert out.startswith("usage: python -m slade_dist teacher ") and "inputs (must exist): data.train_shards" in out
    sections = [ln.strip().split(":")[0] for ln in out.splitlines() if ln.startswith("  ") and not ln.startswith("   ")]
    assert sections == ["run", "data", "model", "pretrain", "train", "loss"], sections
    assert "    train.lr                         0.5 (default 0.0001)\n        head learning rate" in out
    assert "    train.teacher_steps              6000 (default 1000)" in out  # from cub.yaml
    assert "samples_per_class" in out and "K of the labeled P x K batch" in out
    for other in ("basis.", "mining.", "pseudo.", "stages (each is also a command)"):
        assert other not in out, other  # not what the teacher reads; not the global help
    student = subprocess.run(
        [sys.executable, "-m", "slade_dist", "student", "-h"], capture_output=True, text=True, check=True
    ).stdout
    assert "basis.margin" in student and "mining.enabled" in student and "(per round" in student


def test_raw_img2dataset_shards_are_refused_with_the_validating_command(tmp_path, capsys):
    raw = tmp_path / "laion"
    raw.mkdir()
    (raw / "00000.tar").write_bytes(b"")  # img2dataset's naming; never opened by the refusal
    assert main(["embed", f"run.dir={tmp_path / 'run'}", f"data.unlabeled_shards={raw}"]) == 2
    err = capsys.readouterr().err
    assert f"python -m slade_dist.data write --format img2dataset --root {raw} --out {raw}" in err, err
    assert not (raw / "index.json").exists()  # nothing indexed unchecked


RANK_WORKER = """
import sys
from tests.integration.launch_probe import register_probe
register_probe()
from slade_dist.__main__ import main, print_summary
from slade_dist.config import load_config
from slade_dist.stages import RunLayout
sys.exit(main(sys.argv[1:]))
"""


def test_two_processes_print_the_result_once(tmp_path):
    """Two ranks of one command (torchrun's variables, gloo): only rank 0 prints the result line."""
    from slade_dist import dist

    run_dir = tmp_path / "run"
    port = str(dist.find_free_port())
    args = ["probe", f"run.dir={run_dir}", "train.teacher_steps=3", "train.ckpt_every=1"]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "DS_ACCELERATOR": "cpu",
            "CUDA_VISIBLE_DEVICES": "",
        }
        cmd = [sys.executable, "-c", RANK_WORKER, *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [[ln for ln in out.splitlines() if ln.startswith('{"stage": "probe"')] for out in outs]
    assert len(results[0]) == 1 and results[1] == [], outs
    assert json.loads(results[0][0])["result"]["world"] == 2  # one run over both ranks, reported once


def test_summary_says_when_pretrain_handed_on_its_input_weights(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config(None, [f"run.dir={run}"], check_paths=False)
    print_summary(cfg)
    assert "WARNING" not in capsys.readouterr().out
    done = RunLayout(run).done_file("pretrain")
    done.parent.mkdir(parents=True)
    warning = "pretrain handed on its INPUT weights: ... its 12 s of SwAV were spent for nothing"
    done.write_text(json.dumps({"stage": "pretrain", "result": {"steps": 3, "warning": warning}}))
    (run / "eval").mkdir()
    (run / "eval" / "retrieval_teacher.png").write_bytes(b"")
    print_summary(cfg)
    out = capsys.readouterr().out
    assert f"WARNING: {warning}" in out and f"retrieval grids: {run / 'eval' / 'retrieval_teacher.png'}" in out
