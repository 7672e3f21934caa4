"""Unit tests of the launcher, slade_dist/launch/ (planning, checks, Slurm parameters, dry run,
errors, --shards, the job wrapper) and its commands launch/submit.py and `python -m slade_dist launch`.

No cluster needed: Slurm parameters are checked through the #SBATCH lines the dry run renders (held
against the scripts submitit really submits in tests/integration/test_slurm.py),
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
from slade_dist.launch import checks, cli, local, resolve, slurm, status
from slade_dist.launch import plan as planning
from slade_dist.launch.job import StageJob, array_part
from slade_dist.pseudo import embed
from slade_dist.stages import RunLayout
from tests.integration._pseudo_workers import make_cfg, make_demo, make_teacher
from tests.integration.launch_probe import PROBE, ProbeJob, probe_dir

REPO_ROOT = Path(__file__).resolve().parents[2]


def flags(**kw) -> argparse.Namespace:
    base = dict(nodes=None, array=0, shards=None)
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


def test_each_stage_gets_its_own_shape_and_nodes_overrides_all(tmp_path):
    cfg, _ = config(
        tmp_path,
        "run.rounds=1",
        "launch.shapes.student.nodes=4",
        "launch.shapes.student.gpus_per_node=8",
        "launch.shapes.cluster.nodes=2",
        "launch.shapes.cluster.tasks_per_node=3",
    )
    plan = {j.name: j.shape for j in planning.plan_jobs(cfg, "all", flags())}
    assert (plan["round1-student"].nodes, plan["round1-student"].tasks_per_node) == (4, 8)  # one task per GPU
    assert (plan["round1-cluster"].nodes, plan["round1-cluster"].tasks_per_node) == (2, 3)  # launch.shapes.cluster
    assert (plan["teacher"].nodes, plan["teacher"].tasks_per_node) == (1, 1)  # CPU: one task
    forced = planning.plan_jobs(cfg, "all", flags(nodes=3))  # --nodes: every job
    assert {s.shape.nodes for s in forced} == {3} and plan["round1-student"].tasks_per_node == 8


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
        "launch.shapes.student.nodes=8",
        "launch.shapes.student.gpus_per_node=8",
        "launch.shapes.student.mem_gb=400",
        "launch.shapes.student.cpus_per_task=10",
        "launch.shapes.student.time_min=240",
    )
    (job,) = planning.plan_jobs(cfg, "student", flags())
    lines = slurm.script_lines(slurm.slurm_params(job, cfg, "afterok:41"), tmp_path / "logs")
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
        "--job-name=slade-run-round1-student",  # slade-<run name>-<job>: run.dir is <tmp>/run
    ]:
        assert f"#SBATCH {expected}" in lines, (expected, lines)


def test_no_requeue_no_dependency_and_arrays(tmp_path):
    cfg, _ = config(tmp_path, "launch.requeue=false", "launch.shapes.embed.time_min=2")
    (job,) = planning.plan_jobs(cfg, "embed", flags(array=3))[:1]
    lines = slurm.script_lines(slurm.slurm_params(job, cfg, None), tmp_path / "logs", job.array)
    assert not any(ln.startswith(("#SBATCH --requeue", "#SBATCH --dependency")) for ln in lines)
    assert "#SBATCH --array=0-2%3" in lines
    assert "#SBATCH --signal=USR2@12" in lines  # short jobs get the signal early enough to requeue


def test_gres_gpu_counts():
    assert slurm._gres_gpus("gpu:4") == 4
    assert slurm._gres_gpus("gpu:a100:8(S:0-1)") == 8
    assert slurm._gres_gpus("(null)") == 0


def test_local_when_no_sbatch_unless_a_job_spans_nodes(monkeypatch, tmp_path):
    cfg, _ = config(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    one_node = planning.plan_jobs(cfg, "teacher", flags())
    assert resolve.pick_cluster(None, cfg, one_node) == "local"
    assert resolve.pick_cluster(None, cfg, planning.plan_jobs(cfg, "teacher", flags(nodes=8))) == "slurm"
    assert resolve.pick_cluster("debug", cfg, one_node) == "debug"
    cfg.launch.cluster = "slurm"
    assert resolve.pick_cluster(None, cfg, one_node) == "slurm"


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
                "run.rounds=1",
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
        (["--stage", "teacher", "--cluster", "local", "launch.shapes.teachr.nodes=2"], "there is no stage 'teachr'"),
        (["--stage", "teacher", "launch.shape.teacher.nodes=2"], "did you mean 'launch.shapes.teacher.nodes'"),
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
    assert header.endswith(", shards 0-9,12") and "#SBATCH --job-name=slade-run-round1-embed-shards" in out


def test_module_entry_point_is_the_same_cli(tmp_path):
    _, path = config(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slade_dist",
            "launch",
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
    assert proc.stderr == "python -m slade_dist launch: error: --nodes must be >= 1, got 0\n", proc.stderr


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
        "--cluster",
        "--force",
        "--dry-run",
        "--array",
        "--shards",
        "--status",
        "--cancel",
        "slade-<run name>-<job>",
        "sbatch_extra",
        "launch.partition",
        "launch.shapes.<stage>",
        "launch.setup",
    ]:  # ... and the config keys that shape jobs
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


# ------------------------------------------------------------- dry run on any machine (issue 16)
def no_sbatch(monkeypatch, tmp_path) -> None:
    """PATH without Slurm's commands (a laptop, a CI runner)."""
    empty = tmp_path / "empty_bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))


def jobs_of(out: str) -> dict[str, list[str]]:
    """Dry-run output -> {job name: its script lines (#SBATCH, setup, srun)}."""
    jobs: dict[str, list[str]] = {}
    for block in out.split("\n## job ")[1:]:
        header, *lines = block.splitlines()
        jobs[header.split(":", 1)[0]] = [ln for ln in lines if ln]
    return jobs


def sbatch_options(lines: list[str]) -> dict[str, str]:
    """#SBATCH --key=value / --flag lines -> {key: value ('' for a bare flag)}."""
    options = {}
    for line in lines:
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --") :].partition("=")
            options[key] = value.strip("'")
    return options


def test_a_job_whose_ranks_do_not_divide_the_step_is_refused_before_queueing(monkeypatch, tmp_path, capsys):
    """8 nodes x 8 GPUs = 64 ranks for cub.yaml's P = 8: refused in the dry run too (such a job
    could never start), naming the job, its ranks and the fix."""
    no_sbatch(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = [
        "--stage",
        "student",
        "--nodes",
        "8",
        "launch.shapes.student.gpus_per_node=8",
        "--config",
        str(REPO_ROOT / "configs/cub.yaml"),
    ]
    assert cli.main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "job round1-student runs 8 node(s) x 8 task(s) = 64 ranks" in err, err
    assert "set train.classes_per_batch=64" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    # SwAV's batch is the step's too: 512 over 3 x 8 = 24 ranks does not divide
    assert (
        cli.main(["--stage", "pretrain", "--nodes", "3", "--config", str(REPO_ROOT / "configs/cub.yaml"), "--dry-run"])
        == 2
    )
    assert "set pretrain.batch_size=504 or pretrain.batch_size=528" in capsys.readouterr().err


def test_dry_run_of_cub_without_sbatch_or_data_shows_the_slurm_script(monkeypatch, tmp_path, capsys):
    """The issue's command: it used to exit 2 (input path check), or run "local" and refuse --nodes 8."""
    no_sbatch(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)  # none of cub.yaml's relative data paths exist here
    rc = cli.main(["--stage", "student", "--nodes", "8", "--config", str(REPO_ROOT / "configs/cub.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "# 1 job(s) on cluster=slurm" in out  # more than one node: Slurm, sbatch or not
    for missing in ("data.train_shards", "data.unlabeled_shards", "model.pretrained_path"):
        assert f"# WARNING: a real submission would stop here: {missing} (from " in out, missing
    assert "sbatch is not on PATH here" in out
    (script,) = jobs_of(out).values()
    options = sbatch_options(script)
    assert (
        options["nodes"] == "8"
        and options["gpus-per-node"] == "1"  # cub.yaml's student: the paper's step is one GPU's work
        and options["job-name"] == "slade-cub-round1-student"
    )
    # what 8 ranks imply for the step's batch: one class and one pseudo-class per rank
    assert "# per GPU and step: 4 labeled images + 4 pseudo-labeled images (of 32 + 32 over 8 rank(s))" in out
    (srun,) = [ln for ln in script if ln.startswith("srun ")]
    assert "--kill-on-bad-exit=1" in srun and srun.endswith(str(tmp_path / "runs/cub/logs/round1-student"))
    assert not (tmp_path / "runs").exists()
    # a real submission there stops with the reason, not with "--cluster local runs on one machine"
    rc = cli.main(["--stage", "student", "--nodes", "8", "--config", str(REPO_ROOT / "configs/cub.yaml")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err  # the data first
    _, path = config(tmp_path)
    assert cli.main(["--stage", "eval", "--nodes", "2", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "asks for 2 node(s)) but `sbatch` is not on PATH" in err and "--cluster local --nodes 1" in err, err


def test_config_defaults_to_the_run_dirs_saved_config_else_the_demo(monkeypatch, tmp_path, capsys):
    no_sbatch(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "myrun"
    assert cli.main(["--stage", "teacher", "--dry-run", f"run.dir={run}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"slade_dist: no --config given and no {run / 'config.yaml'}: using ")
    assert "backbone: tiny_cnn" in out and str(REPO_ROOT / "configs/demo.yaml") in out.splitlines()[0]
    saved = load_config(REPO_ROOT / "configs/demo.yaml", [f"run.dir={run}", "train.lr=0.125"], check_paths=False)
    saved.save(run / "config.yaml")
    assert cli.main(["--stage", "teacher", "--dry-run", f"run.dir={run}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"slade_dist: no --config given: using {run / 'config.yaml'}, the config run dir")
    assert "lr: 0.125" in out


SHIPPED = ["cub", "cars", "inshop", "web", "cub_dinov2"]
MODEL_JOBS = ["pretrain", "teacher", "round1-embed", "round1-cluster", "round1-student", "eval"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_give_every_model_stage_and_the_cluster_stage_gpus(name, monkeypatch, tmp_path, capsys):
    no_sbatch(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    rc = cli.main(
        ["--stage", "all", "--config", str(REPO_ROOT / f"configs/{name}.yaml"), "--cluster", "slurm", "--dry-run"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    jobs = jobs_of(out)
    for job in MODEL_JOBS:
        options = sbatch_options(jobs[job])
        gpus = int(options.get("gpus-per-node", "0"))
        assert gpus >= 1, (name, job, options)
        assert int(options["ntasks-per-node"]) == gpus, (name, job)  # one task per GPU
        assert options["job-name"] == f"slade-{name}-{job}"


# --------------------------------------------------------------- job names, sbatch pass-through
@pytest.mark.parametrize(
    "run_dir, name", [("runs/cub", "cub"), ("runs/my run!", "my-run"), ("/x/a.b_c-d/", "a.b_c-d"), ("runs/!!", "run")]
)
def test_run_name_is_the_sanitized_basename_of_run_dir(tmp_path, run_dir, name):
    cfg, _ = config(tmp_path, f"run.dir={run_dir}")
    assert planning.run_name(cfg) == name
    (job,) = planning.plan_jobs(cfg, "teacher", flags())
    assert planning.slurm_job_name(cfg, job) == f"slade-{name}-teacher"


def test_sbatch_extra_and_setup_reach_the_script(tmp_path):
    cfg, _ = config(
        tmp_path,
        "launch.sbatch_extra.exclusive=true",
        "launch.sbatch_extra.reservation=r1",
        "launch.sbatch_extra.mem_per_gpu=80G",
        "launch.sbatch_extra.comment=run 7",
        "launch.shapes.eval.sbatch_extra.exclusive=false",  # a stage opting out of a global option
        "launch.shapes.eval.sbatch_extra.gres=gpu:1",
        'launch.setup=["module load cuda/12.1", "source /opt/env/bin/activate"]',
    )
    plan = {j.name: j for j in planning.plan_jobs(cfg, "all", flags())}
    checks.check_sbatch_extra(cfg, list(plan.values()))
    teacher = slurm.script_lines(slurm.slurm_params(plan["teacher"], cfg, None), tmp_path / "logs")
    options = sbatch_options(teacher)
    assert options["exclusive"] == "" and options["reservation"] == "r1" and options["mem-per-gpu"] == "80G"
    assert "#SBATCH --comment='run 7'" in teacher and "gres" not in options
    srun = next(i for i, ln in enumerate(teacher) if ln.startswith("srun "))
    assert teacher.index("module load cuda/12.1") < teacher.index("source /opt/env/bin/activate") < srun
    evals = sbatch_options(slurm.script_lines(slurm.slurm_params(plan["eval"], cfg, None), tmp_path / "logs"))
    assert "exclusive" not in evals and evals["gres"] == "gpu:1" and evals["reservation"] == "r1"


@pytest.mark.parametrize(
    "override, message",
    [
        ("launch.sbatch_extra.job_name=x", "the launcher sets --job-name itself"),
        ("launch.shapes.student.sbatch_extra.nodes=3", "use launch.shapes.<stage>.nodes or --nodes"),
        ("launch.sbatch_extra=exclusive", "must be a mapping of sbatch option -> value"),
        ("launch.sbatch_extra.gres=[1,2]", "expected a string, number or true/false"),
    ],
)
def test_bad_sbatch_extra_is_one_clear_line(tmp_path, capsys, override, message):
    _, path = config(tmp_path)
    assert cli.main(["--stage", "all", "--config", str(path), "--cluster", "slurm", "--dry-run", override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------------------ --status / --cancel
def test_status_and_cancel_before_anything_was_submitted(tmp_path, capsys):
    _, path = config(tmp_path)
    for flag in ("--status", "--cancel"):
        assert cli.main([flag, "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"nothing was submitted for run dir {tmp_path / 'run'}" in err and "--stage all" in err, err


def test_status_of_a_local_launch_and_cancel_refusing_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(stages.STAGES, "probe", PROBE)
    _, path = config(tmp_path, train={"teacher_steps": 2, "ckpt_every": 1})
    assert cli.main(["--stage", "probe", "--config", str(path), "--cluster", "debug"], job_cls=ProbeJob) == 0
    capsys.readouterr()
    assert cli.main(["--status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 job(s) on cluster=debug" in out and "probe" in out and "ran here, finished" in out
    assert cli.main(["--cancel", "--config", str(path)]) == 2
    assert "ran on cluster=debug" in capsys.readouterr().err
    assert cli.main(["--stage", "probe", "--config", str(path), "--cluster", "debug"], job_cls=ProbeJob) == 0
    capsys.readouterr()  # the second launch found the stage done: its record lists no job ...
    assert cli.main(["--status", "--config", str(path)]) == 0
    out = capsys.readouterr().out  # ... and hides nothing of the first
    assert "2 launch(es)" in out and "ran here, finished" in out, out
    assert "launch 2 at" in out and "nothing submitted: every stage was already done" in out, out
    assert [
        j["name"] for j in json.loads((tmp_path / "run" / "logs" / "submitted.json").read_text())["earlier"][0]["jobs"]
    ] == ["probe"]
    (tmp_path / "b").mkdir()
    cfg, other = config(tmp_path / "b")
    status.write_record(cfg, "debug", [])  # a run whose only launch found everything done
    assert cli.main(["--status", "--config", str(other)]) == 2
    assert "submitted no job: every stage was already done" in capsys.readouterr().err


def test_stage_is_required_unless_status_or_cancel(tmp_path, capsys):
    _, path = config(tmp_path)
    for args, message in [
        (["--config", str(path)], "--stage is required (or --status / --cancel"),
        (["--status", "--cancel", "--config", str(path)], "pass one of them"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(args)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------- img2dataset output, log tails
def test_raw_img2dataset_output_is_refused_with_the_command_that_validates_it(tmp_path, capsys):
    from slade_dist import provenance
    from slade_dist.data import __main__ as data_cli
    from slade_dist.data import writers
    from tests.unit.test_writers import make_img2dataset

    raw = make_img2dataset(tmp_path / "laion")
    _, path = config(tmp_path, data={"unlabeled_shards": str(raw)})
    assert cli.main(["--stage", "embed", "--config", str(path), "--cluster", "local"]) == 2
    err = capsys.readouterr().err
    command = f"python -m slade_dist.data write --format img2dataset --root {raw} --out {raw}"
    assert f"data.unlabeled_shards: {raw} holds img2dataset output that was never validated" in err
    assert f"run `{command}` once" in err and not (raw / "index.json").exists()
    assert cli.main(["--stage", "embed", "--config", str(path), "--cluster", "local", "--dry-run"]) == 0
    assert command in capsys.readouterr().out  # a dry run warns
    assert data_cli.main(command.split()[3:] + ["--no-progress"]) == 0  # the suggested command, as is
    assert provenance.unvalidated_img2dataset(raw) is None  # its index.json says it validated the tars
    assert data_cli.FORMATS == writers.FORMATS  # the data CLI's copy (it keeps writers out of the launcher)


def test_log_tail_returns_complete_lines_and_the_last_one_at_the_end(tmp_path):
    log = tmp_path / "x.out"
    tail = local.LogTail(log)
    assert tail.new_lines() == []  # not written yet
    log.write_bytes(b"step 1\nstep 2\r\nhalf")
    assert tail.new_lines() == ["step 1", "step 2"]
    with open(log, "ab") as f:
        f.write(b" a line\nlast")
    assert tail.new_lines() == ["half a line"]
    assert tail.new_lines(final=True) == ["last"] and tail.new_lines(final=True) == []
