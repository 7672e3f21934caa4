"""Unit tests of the launcher, slade_dist/launch/ (planning, checks, Slurm parameters, dry run,
errors, --shards, the job wrapper) and its commands launch/submit.py and `python -m slade_dist.launch`.

No cluster needed: Slurm parameters are checked through the #SBATCH lines submitit itself renders,
and the execution tests run the `probe` test stage and the real embed stage in this process
(--cluster debug). Real Slurm / LocalExecutor runs: tests/integration/test_slurm.py and
test_launch_local.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import yaml

from slade_dist import stages
from slade_dist.config import load_config
from slade_dist.launch import cli, local, slurm
from slade_dist.launch import plan as planning
from slade_dist.launch.job import StageJob, array_part
from slade_dist.pseudo import embed
from slade_dist.stages import RunLayout
from tests.integration._pseudo_workers import make_cfg, make_demo, make_teacher
from tests.integration.launch_probe import PROBE, ProbeJob, probe_dir

REPO_ROOT = Path(__file__).resolve().parents[2]


def flags(**kw) -> argparse.Namespace:
    base = dict(
        nodes=None,
        gpus_per_node=None,
        tasks_per_node=None,
        cpus_per_task=None,
        mem=None,
        time=None,
        array=0,
        shards=None,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def config(tmp_path: Path, *overrides: str, **sections: dict):
    body = {"run": {"dir": str(tmp_path / "run")}, **sections}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_config(path, list(overrides)), path


# ----------------------------------------------------------------------------------- planning
def test_all_is_the_whole_chain_linked_in_order(tmp_path):
    cfg, _ = config(tmp_path, "run.rounds=2")
    plan = planning.plan_jobs(cfg, "all", flags())
    assert [(j.name, j.stage, j.round) for j in plan] == [
        ("pretrain", "pretrain", 1),
        ("teacher", "teacher", 1),
        ("round1-embed", "embed", 1),
        ("round1-cluster", "cluster", 1),
        ("round1-student", "student", 1),
        ("round2-embed", "embed", 2),
        ("round2-cluster", "cluster", 2),
        ("round2-student", "student", 2),
        ("eval", "eval", 1),
    ]
    assert [j.after for j in plan] == [None] + [j.name for j in plan[:-1]]


def test_each_stage_gets_its_own_shape_and_flags_override_all(tmp_path):
    cfg, _ = config(
        tmp_path,
        "run.rounds=1",
        "launch.student.nodes=4",
        "launch.student.gpus_per_node=8",
        "launch.cluster_job.nodes=2",
        "launch.cluster_job.tasks_per_node=3",
    )
    plan = {j.name: j.shape for j in planning.plan_jobs(cfg, "all", flags())}
    assert (plan["round1-student"].nodes, plan["round1-student"].tasks_per_node) == (4, 8)  # one task per GPU
    assert (plan["round1-cluster"].nodes, plan["round1-cluster"].tasks_per_node) == (2, 3)  # launch.cluster_job
    assert (plan["teacher"].nodes, plan["teacher"].tasks_per_node) == (1, 1)  # CPU: one task
    forced = planning.plan_jobs(cfg, "all", flags(nodes=3, cpus_per_task=5, time=7, mem=9))
    assert {(s.shape.nodes, s.shape.cpus_per_task, s.shape.time_min, s.shape.mem_gb) for s in forced} == {(3, 5, 7, 9)}


def test_single_round_stage_uses_run_round(tmp_path):
    cfg, _ = config(tmp_path, "run.round=2")
    (job,) = planning.plan_jobs(cfg, "student", flags())
    assert (job.name, job.round, job.after) == ("round2-student", 2, None)


def test_embed_array_is_followed_by_the_embed_job_that_marks_it_done(tmp_path):
    cfg, _ = config(tmp_path, "run.rounds=1")
    plan = planning.plan_jobs(cfg, "all", flags(array=4))
    names = [j.name for j in plan]
    assert names[2:4] == ["round1-embed-array", "round1-embed"]
    assert plan[2].array == 4 and plan[3].array == 0 and plan[3].after == "round1-embed-array"


def test_finished_stages_are_not_submitted_and_the_chain_relinks(tmp_path):
    cfg, _ = config(tmp_path, "run.rounds=1")
    stages.write_done(cfg, "pretrain", {}, 0.0)
    stages.write_done(cfg, "teacher", {}, 0.0)
    kept, dropped = planning.drop_done(cfg, planning.plan_jobs(cfg, "all", flags()))
    assert [j.name for j in dropped] == ["pretrain", "teacher"]
    assert [(j.name, j.after) for j in kept] == [
        ("round1-embed", None),
        ("round1-cluster", "round1-embed"),
        ("round1-student", "round1-cluster"),
        ("eval", "round1-student"),
    ]
    # a finished stage after one that reruns is submitted too: it will read the new outputs
    stages.RunLayout(cfg.run.dir).done_file("pretrain").unlink()
    kept, dropped = planning.drop_done(cfg, planning.plan_jobs(cfg, "all", flags()))
    assert dropped == [] and [j.name for j in kept][:2] == ["pretrain", "teacher"]
    cfg2, _ = config(tmp_path, "run.rounds=1", "loss.ms_alpha=3.0")  # another teacher config: not done
    assert planning.drop_done(cfg2, planning.plan_jobs(cfg2, "teacher", flags()))[1] == []


def test_shard_lists_parse_and_format_back():
    assert planning.parse_shard_ids("0-2, 5,7-7") == [0, 1, 2, 5, 7]
    assert planning.parse_shard_ids("12,0-9,3") == [*range(10), 12]  # sorted, without repeats
    assert planning.format_shard_ids([12, *range(10)]) == "0-9,12"
    assert planning.format_shard_ids([]) == ""
    for bad in ["9-3", "a-b", "1,x"]:
        with pytest.raises(ValueError):
            planning.parse_shard_ids(bad)


def test_shards_make_one_embed_job_over_those_shards(tmp_path):
    cfg, _ = config(tmp_path, "run.round=2")
    (job,) = planning.plan_jobs(cfg, "embed", flags(shards=[3, 1]))
    assert (job.name, job.stage, job.round, job.shard_ids, job.array) == ("round2-embed-shards", "embed", 2, (3, 1), 0)
    assert planning.describe_shape(job).endswith(", shards 1,3")
    made = planning.make_job(cfg, job, force=False)
    assert isinstance(made, StageJob) and made.shard_ids == [1, 3] and made.round == 2
    (whole,) = planning.plan_jobs(cfg, "embed", flags())
    assert whole.shard_ids is None and planning.make_job(cfg, whole, force=False).shard_ids is None


def test_array_parts_cover_every_shard_once():
    ids = list(range(10))
    parts = [array_part(ids, i, 4) for i in range(4)]
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]  # contiguous ranges
    assert [array_part([1, 2], i, 3) for i in range(3)] == [[1], [2], []]
    with pytest.raises(ValueError):
        array_part(ids, 4, 4)


# --------------------------------------------------------------------------------- parameters
def test_sbatch_lines_carry_shape_dependency_and_requeue(tmp_path):
    cfg, _ = config(
        tmp_path,
        "launch.partition=gpu",
        "launch.account=proj",
        "launch.qos=high",
        "launch.constraint=a100",
        "launch.student.nodes=8",
        "launch.student.gpus_per_node=8",
        "launch.student.mem_gb=400",
        "launch.student.cpus_per_task=10",
        "launch.student.time_min=240",
    )
    (job,) = planning.plan_jobs(cfg, "student", flags())
    lines = slurm.sbatch_lines(slurm.slurm_params(job, cfg, "afterok:41"), tmp_path / "logs")
    for expected in [
        "--nodes=8",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=10",
        "--mem=400GB",
        "--time=240",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--constraint=a100",
        "--dependency=afterok:41",
        "--kill-on-invalid-dep=yes",
        "--requeue",
        "--signal=USR2@90",
        "--job-name=slade-round1-student",
    ]:
        assert f"#SBATCH {expected}" in lines, (expected, lines)


def test_no_requeue_no_dependency_and_arrays(tmp_path):
    cfg, _ = config(tmp_path, "launch.requeue=false", "launch.embed.time_min=2")
    (job,) = planning.plan_jobs(cfg, "embed", flags(array=3))[:1]
    lines = slurm.sbatch_lines(slurm.slurm_params(job, cfg, None), tmp_path / "logs", job.array)
    assert not any(ln.startswith(("#SBATCH --requeue", "#SBATCH --dependency")) for ln in lines)
    assert "#SBATCH --array=0-2%3" in lines
    assert "#SBATCH --signal=USR2@12" in lines  # short jobs get the signal early enough to requeue


def test_gres_gpu_counts():
    assert slurm._gres_gpus("gpu:4") == 4
    assert slurm._gres_gpus("gpu:a100:8(S:0-1)") == 8
    assert slurm._gres_gpus("(null)") == 0


def test_local_when_no_sbatch(monkeypatch, tmp_path):
    cfg, _ = config(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.pick_cluster(None, cfg) == "local"
    assert cli.pick_cluster("debug", cfg) == "debug"
    cfg.launch.cluster = "slurm"
    assert cli.pick_cluster(None, cfg) == "slurm"


def test_job_error_line_finds_the_exception():
    err = RuntimeError(
        "Job (task=0) failed during processing with trace:\n----\nTraceback (most recent call "
        'last):\n  File "x.py", line 3, in f\nValueError: boom\n\n----\nYou can check full logs'
    )
    assert local.job_error_line(err) == "ValueError: boom"


# ---------------------------------------------------------------------------- dry run / errors
def test_dry_run_local_prints_config_and_plan_and_writes_nothing(tmp_path, capsys):
    _, path = config(tmp_path)
    assert (
        cli.main(
            [
                "--stage",
                "all",
                "train.lr=0.25",
                "--config",
                str(path),
                "--cluster",
                "local",
                "--rounds",
                "1",
                "--dry-run",
                "model.embed_dim=8",
            ]
        )
        == 0
    )  # overrides between flags
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("\n# ", 1)[0].split("\n", 1)[1])
    assert resolved["train"]["lr"] == 0.25 and resolved["model"]["embed_dim"] == 8 and resolved["run"]["rounds"] == 1
    assert "## job round1-cluster: stage cluster round 1" in out
    assert "local executor: tasks_per_node=1" in out and "(starts after round1-embed succeeded)" in out
    assert "WARNING: a real submission would stop here" in out  # no data configured
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stage", "teacher", "--nodes", "2", "--cluster", "local"], "runs on this one machine"),
        (["--stage", "teacher", "--nodes", "0", "--cluster", "local"], "--nodes must be >= 1"),
        (["--stage", "teacher", "--array", "2", "--cluster", "local"], "--array applies to the embed stage"),
        (["--stage", "teacher", "--shards", "1", "--cluster", "local"], "--shards applies to the embed stage"),
        (["--stage", "all", "--shards", "1", "--cluster", "local"], "--shards applies to the embed stage, not 'all'"),
        (["--stage", "embed", "--shards", "1", "--array", "2", "--cluster", "local"], "pass one of them"),
        (["--stage", "teacher", "--cluster", "local"], "data.train_shards must be set"),
        (["--stage", "teacher", "--cluster", "local", "launch.qos=7"], None),  # int -> str is accepted
        (["--stage", "teacher", "--cluster", "local", "train.lr=fast"], "train.lr"),
    ],
)
def test_errors_are_one_clear_line_before_anything_runs(tmp_path, capsys, args, message):
    _, path = config(tmp_path)
    rc = cli.main([*args, "--config", str(path)])
    err = capsys.readouterr().err
    if message is None:
        assert rc == 2 and "data.train_shards must be set" in err  # got past the config, stopped at inputs
        return
    assert rc == 2 and message in err, err
    assert err.startswith("launch/submit.py: error: ")
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path, capsys):
    assert cli.main(["--stage", "eval", "--config", str(tmp_path / "nope.yaml"), "--cluster", "local"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_shard_lists_are_argument_errors(tmp_path, capsys):
    _, path = config(tmp_path)
    for text, message in [("3-1", "runs backwards"), ("x", "expected shard ids like 0-9,12"), (",", "names no shard")]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["--stage", "embed", "--shards", text, "--config", str(path), "--cluster", "local"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "argument --shards" in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_dry_run_shows_the_shard_subset_job(tmp_path, capsys):
    _, path = config(tmp_path)
    assert (
        cli.main(["--stage", "embed", "--shards", "0-9,12", "--config", str(path), "--cluster", "slurm", "--dry-run"])
        == 0
    )
    out = capsys.readouterr().out
    (header,) = [line for line in out.splitlines() if line.startswith("## job ")]
    assert header.startswith("## job round1-embed-shards: stage embed round 1, 1 node(s) x 1 task(s)"), header
    assert header.endswith(", shards 0-9,12") and "#SBATCH --job-name=slade-round1-embed-shards" in out


def test_module_entry_point_is_the_same_cli(tmp_path):
    _, path = config(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slade_dist.launch",
            "--stage",
            "teacher",
            "--nodes",
            "0",
            "--config",
            str(path),
            "--cluster",
            "local",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr == "python -m slade_dist.launch: error: --nodes must be >= 1, got 0\n", proc.stderr


def test_the_launcher_never_loads_models_or_the_job_wrapper():
    code = (
        "import sys; from slade_dist.launch import cli; "
        "print(sorted(m for m in sys.modules if m.startswith(('slade_dist.models', 'slade_dist.train', "
        "'slade_dist.launch.job', 'deepspeed'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT).stdout
    assert out.strip() == "[]", out


def test_help_explains_every_option():
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "submit.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for opt in [
        "--stage",
        "--config",
        "--nodes",
        "--gpus-per-node",
        "--cpus-per-task",
        "--mem",
        "--time",
        "--partition",
        "--account",
        "--qos",
        "--constraint",
        "--cluster",
        "--rounds",
        "--force",
        "--dry-run",
        "--array",
        "--shards",
        "cluster_job",
        "teacher_steps",
    ]:  # ... and the config keys
        assert opt in out, opt


# ---------------------------------------------------------------------------------- job.py
def test_probe_stage_does_not_leak_into_the_registry(tmp_path):
    assert "probe" not in stages.STAGES  # importing the test stage registers nothing
    cfg, _ = config(tmp_path, train={"teacher_steps": 2, "ckpt_every": 1})
    with pytest.raises(KeyError):
        ProbeJob(cfg, "probe")


def test_stage_job_checks_its_arguments(tmp_path):
    cfg, _ = config(tmp_path)
    with pytest.raises(KeyError, match="unknown stage"):
        StageJob(cfg, "nosuch")
    with pytest.raises(ValueError, match="only the embed stage"):
        StageJob(cfg, "teacher", array_parts=2)
    with pytest.raises(ValueError, match="only the embed stage runs on a shard subset"):
        StageJob(cfg, "teacher", shard_ids=[1])
    with pytest.raises(ValueError, match="not both"):
        StageJob(cfg, "embed", array_parts=2, shard_ids=[1])


def test_checkpoint_only_resubmits_the_same_call(tmp_path):
    cfg, _ = config(tmp_path)
    job = StageJob(cfg, "teacher", force=True)
    delayed = job.checkpoint(3)
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is job and delayed.args == (3,)
    assert not (tmp_path / "run").exists()  # no save, no files: the stage resumes from its own checkpoint


def test_debug_cluster_runs_the_stage_in_process_then_skips_it_when_done(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(stages.STAGES, "probe", PROBE)  # the launcher test stage, for this test only
    _, path = config(tmp_path, train={"teacher_steps": 4, "ckpt_every": 2})
    args = ["--stage", "probe", "--config", str(path), "--cluster", "debug"]
    env_before = dict(os.environ)
    assert cli.main(args, job_cls=ProbeJob) == 0
    done = json.loads((probe_dir(tmp_path / "run") / "DONE.json").read_text())
    assert done["result"]["steps"] == 4 and done["world_size"] == 1
    assert dict(os.environ) == env_before  # the job's RANK/MASTER_* do not leak into the launcher
    record = json.loads((tmp_path / "run" / "logs" / "submitted.json").read_text())
    assert record["cluster"] == "debug" and record["jobs"][0]["name"] == "probe"
    assert "tensorboard --logdir" in capsys.readouterr().out
    assert cli.main(args, job_cls=ProbeJob) == 0  # DONE.json matches: not even started
    assert "probe                  already done" in capsys.readouterr().out
    assert ProbeJob(load_config(path), "probe")() is None  # a job started anyway exits at once
    assert cli.main([*args, "--force"], job_cls=ProbeJob) == 0  # --force reruns it (it resumes at step 4)
    assert (probe_dir(tmp_path / "run") / "starts.txt").read_text().split() == ["0", "4"]
    assert stages.is_done(load_config(path), "probe")


# ------------------------------------------------------- embed shard subsets (the real stage)
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # 8 classes x 10 images in shards of 30 -> 3 unlabeled shards (ids 0, 1, 2)
    return make_demo(tmp_path_factory.mktemp("launch_demo"), unlabeled_per_class=10, shard_size=30)


def test_shards_and_array_tasks_embed_their_subsets_only(demo, tmp_path, capsys):
    """What `python -m slade_dist.pseudo.embed RUN.yaml --shards 1` / `--array-task 0 --array-chunk 2`
    did, now `launch/submit.py --stage embed --shards 1` and the embed array's task 0 of 2."""
    run = tmp_path / "run"
    cfg = make_cfg(run, demo)
    make_teacher(run)
    run_file = tmp_path / "run.yaml"
    run_file.write_text(cfg.dump_yaml())
    out = RunLayout(run).stage_dir("embed", 1)
    args = ["--stage", "embed", "--config", str(run_file), "--cluster", "debug"]
    assert cli.main([*args, "--shards", "1"]) == 0
    assert [embed.is_embedded(out, i) for i in range(3)] == [False, True, False]
    assert not stages.is_done(cfg, "embed")  # a subset never marks the stage done
    record = json.loads((run / "logs" / "submitted.json").read_text())
    assert [(j["name"], j["shard_ids"]) for j in record["jobs"]] == [("round1-embed-shards", [1])]
    assert StageJob(cfg, "embed", array_parts=2)(0)["written"] == 1  # ids [0, 1]: 1 was there already
    assert [embed.is_embedded(out, i) for i in range(3)] == [True, True, False]
    capsys.readouterr()
    assert cli.main([*args, "--shards", "2,7-8"]) == 2  # checked before anything runs
    assert "--shards: shard ids 7-8 are not in data.unlabeled_shards" in capsys.readouterr().err
    assert not embed.is_embedded(out, 2)
