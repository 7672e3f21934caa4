"""`--cluster local`: the launcher runs the chain on this machine through submitit's LocalExecutor
(real processes, one per task, torch.distributed over gloo between them).

Mechanics run now on the `probe` test stage (2 processes, each job's progress streamed to the
terminal), an embed shard subset (`--shards`) on the real embed stage; the tiny demo chain end to
end waits on the stages (conftest.require_stages).
"""

from __future__ import annotations

import functools
import json
import time

import pytest
import yaml

from slade_dist.launch import cli
from slade_dist.pseudo import embed
from slade_dist.stages import RunLayout
from tests.integration._pseudo_workers import make_cfg, make_demo, make_teacher
from tests.integration.conftest import REPO_ROOT, launch, require_stages, tiny_config
from tests.integration.launch_probe import ProbeJob, probe_dir


def probe_config(tmp_path, steps: int = 6):
    path = tmp_path / "probe.yaml"
    path.write_text(
        yaml.safe_dump({"run": {"dir": str(tmp_path / "run")}, "train": {"teacher_steps": steps, "ckpt_every": 2}})
    )
    return path


def test_local_job_runs_one_process_per_task(probe_stage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)  # the task processes import the probe module from here
    cfg = probe_config(tmp_path)
    rc = cli.main(
        ["--stage", "probe", "--config", str(cfg), "--cluster", "local", "launch.shapes.probe.tasks_per_node=2"],
        job_cls=ProbeJob,
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    done = json.loads((probe_dir(tmp_path / "run") / "DONE.json").read_text())
    assert done["world_size"] == 2 and done["result"]["total"] == 2 * 6  # 2 processes, one gloo group
    record = json.loads((tmp_path / "run" / "logs" / "submitted.json").read_text())
    assert record["cluster"] == "local"
    assert "finished in" in out and record["jobs"][0]["stdout"] in out
    # the job's own progress lines reach the terminal while it runs, prefixed with the job's name
    streamed = [line for line in out.splitlines() if line.startswith("  [probe] ")]
    assert any("[probe] start" in line for line in streamed) and any("[probe] done in" in line for line in streamed)
    assert not any("submitit INFO" in line for line in streamed), streamed
    assert out.index("[probe] done in") < out.index("finished in")


def test_local_failure_names_the_error_and_the_log(probe_stage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    cfg = probe_config(tmp_path)
    rc = cli.main(
        ["--stage", "probe", "--config", str(cfg), "--cluster", "local"],
        job_cls=functools.partial(ProbeJob, env={"PROBE_FAIL": "1"}),
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "job probe" in err and "RuntimeError: probe asked to fail" in err and "_log.err" in err
    assert not (probe_dir(tmp_path / "run") / "DONE.json").exists()


def test_embed_shard_subset_through_the_real_command(tmp_path):
    """`python launch/submit.py --stage embed --shards ...` in a LocalExecutor process: the shard ids
    travel with the pickled job and only those shards are embedded (the stage is not marked done)."""
    unlabeled = make_demo(tmp_path, unlabeled_per_class=10, shard_size=30)  # 3 shards: ids 0, 1, 2
    run = tmp_path / "run"
    make_teacher(run)
    run_file = tmp_path / "run.yaml"
    run_file.write_text(make_cfg(run, unlabeled).dump_yaml())
    proc = launch("--stage", "embed", "--config", str(run_file), "--shards", "0,2", "--cluster", "local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round1-embed-shards" in proc.stdout and "shards 0,2" in proc.stdout
    out = RunLayout(run).stage_dir("embed", 1)
    assert [embed.is_embedded(out, i) for i in range(3)] == [True, False, True]
    assert not (out / "DONE.json").exists()


@pytest.mark.slow
def test_demo_chain_runs_locally_to_metrics(tiny_demo, tmp_path):
    require_stages("pretrain", "teacher", "embed", "cluster", "student", "eval")
    cfg = tiny_config(tmp_path / "tiny.yaml", tiny_demo, tmp_path / "run", pretrain={"steps": 2})
    t0 = time.time()
    proc = launch("--stage", "all", "--config", str(cfg), "--cluster", "local", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"demo chain with --cluster local: {time.time() - t0:.1f}s")
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["models"], metrics
    for stage_dir in ["pretrain", "teacher", "round1/embed", "round1/cluster", "round1/student", "eval"]:
        assert (tmp_path / "run" / stage_dir / "DONE.json").exists(), stage_dir
    record = json.loads((tmp_path / "run" / "logs" / "submitted.json").read_text())
    assert [j["name"] for j in record["jobs"]] == [
        "pretrain",
        "teacher",
        "round1-embed",
        "round1-cluster",
        "round1-student",
        "eval",
    ]
    # the same command again is a no-op: every stage's DONE.json matches, nothing is started
    again = launch("--stage", "all", "--config", str(cfg), "--cluster", "local", timeout=900)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already done (DONE.json matches the config): not submitted") == 6
    assert json.loads((tmp_path / "run" / "logs" / "submitted.json").read_text())["jobs"] == []
