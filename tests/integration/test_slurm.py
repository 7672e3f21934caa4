"""The launcher on a REAL two-node Slurm cluster (tests/integration/slurm_cluster.sh).

Mechanics (run now, on the `probe` test stage from launch_probe.py, through real sbatch/srun and
submitit jobs running slade_dist.launch.job.StageJob): a 2-node gloo job, afterok chains, a failed job
cancelling its dependants, real preemption -> requeue -> resume from the checkpoint, DONE skip on
resubmission, `--status` / `--cancel` over every launch of a run (submitit's job objects: sacct,
scancel), the dry run's script lines against the script submitit submitted, an sbatch option
passed through launch.sbatch_extra and a launch.setup line (scontrol show job, the job's log), and
every pre-submission error against the real `sinfo`.
The real chain (teacher on 2 nodes, `--stage all` to metrics, preempting the real teacher) waits on
the stages: see conftest.require_stages.
"""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from slade_dist import dist
from slade_dist.config import JobShape, load_config
from slade_dist.launch import cli, slurm
from slade_dist.launch.plan import JobSpec, log_folder
from slade_dist.launch.slurm import submit_slurm
from slade_dist.launch.status import write_record
from tests.integration.conftest import REPO_ROOT, launch, require_stages, tiny_config
from tests.integration.launch_probe import ProbeJob, probe_dir

pytestmark = [pytest.mark.slurm]

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True, timeout=30
    ).stdout.splitlines()
    return out[-1].split()[0] if out else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED


def wait_states(job_ids: list[str], timeout_s: float = 240) -> dict[str, str]:
    """Poll sacct (not submitit's cached states) until every job ended; returns the final states."""
    deadline = time.time() + timeout_s
    while True:
        states = {j: sacct_state(j) for j in job_ids}
        if all(s in TERMINAL for s in states.values()):
            return states
        if time.time() > deadline:
            raise AssertionError(f"jobs did not finish in {timeout_s}s: {states}")
        time.sleep(0.5)


def wait_for(predicate, what: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def log_tails(folder: Path, job_id: str, lines: int = 15) -> str:
    """The last lines of every task log of one job (what a failure message should show)."""
    parts = []
    for path in sorted(folder.glob(f"{job_id}_*_log.*")):
        parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(parts) or f"(no logs of job {job_id} in {folder})"


def submit_preempting_job(slurm_cluster: dict[str, str], tmp_path: Path) -> str:
    """A 2-node job on the high-priority partition: it preempts (requeues) whatever holds the nodes."""
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            slurm_cluster["high_partition"],
            "-N",
            "2",
            "--ntasks-per-node",
            "2",
            "-o",
            str(tmp_path / "high-%j.out"),
            "--wrap",
            "sleep 1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def probe_config(tmp_path: Path, steps: int = 12, ckpt_every: int = 3) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "probe.yaml"
    path.write_text(
        yaml.safe_dump(
            {"run": {"dir": str(tmp_path / "run")}, "train": {"teacher_steps": steps, "ckpt_every": ckpt_every}}
        )
    )
    return path


def submitted(tmp_path: Path) -> dict[str, dict]:
    body = json.loads((tmp_path / "run" / "logs" / "submitted.json").read_text())
    return {j["name"]: j for j in body["jobs"]}


def run_probe(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> dict[str, dict]:
    """Submit the probe stage through the launcher's main() (the job runs on Slurm)."""
    rc = cli.main(
        [
            "--stage",
            "probe",
            "--config",
            str(tmp_path / "probe.yaml"),
            "--cluster",
            "slurm",
            "--cpus-per-task",
            "1",
            *flags,
        ],
        job_cls=functools.partial(ProbeJob, env=env or {}),
    )
    assert rc == 0
    return submitted(tmp_path)


@pytest.fixture
def at_repo_root(monkeypatch):
    # jobs start in the submission directory: the probe module must be importable from there
    monkeypatch.chdir(REPO_ROOT)


def test_two_node_job_runs_one_gloo_group(slurm_cluster, probe_stage, tmp_path, at_repo_root):
    probe_config(tmp_path)
    jobs = run_probe(tmp_path, "--nodes", "2", "--mem", "1", "--time", "5")
    assert wait_states([jobs["probe"]["job_id"]]) == {jobs["probe"]["job_id"]: "COMPLETED"}
    done = json.loads((probe_dir(tmp_path / "run") / "DONE.json").read_text())
    assert done["world_size"] == 2
    assert done["result"]["hosts"] == ["node1", "node2"]  # one task on each virtual node
    assert done["result"]["total"] == 2 * 12  # every step's all_reduce saw both ranks
    assert Path(jobs["probe"]["stdout"]).exists()


def test_a_failing_rank_ends_its_two_node_job(slurm_cluster, probe_stage, tmp_path, at_repo_root):
    """Rank 0 cannot open the rendezvous port (held here): it fails with a clear error, and srun's
    --kill-on-bad-exit ends rank 1 too, which would otherwise wait for the store until its timeout."""
    probe_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.time()
        jobs = run_probe(tmp_path, "--nodes", "2", "--time", "5", env={dist.MASTER_PORT_ENV: str(port)})
        job_id = jobs["probe"]["job_id"]
        assert wait_states([job_id], timeout_s=120) == {job_id: "FAILED"}
    print(f"2-node job with a taken port failed after {time.time() - t0:.1f}s")
    err = Path(jobs["probe"]["stdout"]).with_suffix(".err").read_text()
    assert f"rendezvous port node1:{port} is already in use" in err, err[-2000:]
    assert not (probe_dir(tmp_path / "run") / "DONE.json").exists()


def test_afterok_chains_done_markers_and_kill_on_invalid_dep(slurm_cluster, probe_stage, tmp_path, at_repo_root):
    """Two chains at once: first -> second succeeds (second skips: DONE.json), a failing first
    cancels its dependant."""
    shape = JobShape(cpus_per_task=1, tasks_per_node=1)
    plan = [JobSpec("first", "probe", 1, shape), JobSpec("second", "probe", 1, shape, after="first")]
    ok_cfg = load_config(probe_config(tmp_path / "ok"))
    bad_cfg = load_config(probe_config(tmp_path / "bad"))
    ok = submit_slurm(ok_cfg, plan, force=False, job_cls=ProbeJob)
    bad = submit_slurm(bad_cfg, plan, force=False, job_cls=functools.partial(ProbeJob, env={"PROBE_FAIL": "1"}))
    ids = [s.job_id for s in ok + bad]
    states = wait_states(ids)
    assert [states[i] for i in ids] == ["COMPLETED", "COMPLETED", "FAILED", "CANCELLED"]
    times = {}
    for j in ids[:2]:
        times[j] = (
            subprocess.run(["sacct", "-n", "-X", "-P", "-j", j, "-o", "Start,End"], capture_output=True, text=True)
            .stdout.split()[-1]
            .split("|")
        )
    assert times[ids[1]][0] >= times[ids[0]][1], f"second started before first ended: {times}"
    # the second job found the first's DONE.json: submitit stores its result (None = skipped)
    assert ok[0].jobs[0].results()[0]["steps"] == 12
    assert ok[1].jobs[0].results() == [None]
    assert (probe_dir(tmp_path / "ok" / "run") / "starts.txt").read_text().split() == ["0"]
    assert not (probe_dir(tmp_path / "bad" / "run") / "DONE.json").exists()


def test_preempted_job_resumes_from_its_checkpoint(slurm_cluster, probe_stage, tmp_path, at_repo_root):
    probe_config(tmp_path, steps=30, ckpt_every=5)
    # 2 CPUs: the job fills node1, so a job on all nodes of the `high` partition must preempt it
    rc = cli.main(
        ["--stage", "probe", "--config", str(tmp_path / "probe.yaml"), "--cluster", "slurm", "--cpus-per-task", "2"],
        job_cls=functools.partial(ProbeJob, env={"PROBE_SLEEP_S": "0.2"}),
    )
    assert rc == 0
    job_id = submitted(tmp_path)["probe"]["job_id"]
    ckpt = probe_dir(tmp_path / "run") / "ckpt.json"
    wait_for(lambda: ckpt.exists() and json.loads(ckpt.read_text())["step"] >= 10, "a checkpoint at step >= 10")
    high_id = submit_preempting_job(slurm_cluster, tmp_path)
    states = wait_states([job_id, high_id])
    assert states == {job_id: "COMPLETED", high_id: "COMPLETED"}
    info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in info, info
    starts = [int(s) for s in (probe_dir(tmp_path / "run") / "starts.txt").read_text().split()]
    assert starts[0] == 0 and len(starts) == 2 and 10 <= starts[1] < 30, starts  # resumed, not from step 0
    done = json.loads((probe_dir(tmp_path / "run") / "DONE.json").read_text())
    assert done["result"]["steps"] == 30 and done["result"]["total"] == 30.0
    log = Path(submitted(tmp_path)["probe"]["stdout"]).read_text()
    assert "preempted" in log or "timed-out" in log  # submitit's own account of the USR2


# ----------------------------------------------------- --status, --cancel, sbatch pass-through
def test_status_cancel_and_pass_through_options_on_real_jobs(slurm_cluster, probe_stage, tmp_path, at_repo_root):
    """A two-job chain named after its run, with an sbatch option passed through (--comment) and a
    setup line, then a second launch for the same run (one job held by --begin); the dry run's
    script lines are the scripts submitit submitted; `--status` shows the jobs of BOTH launches,
    `--cancel` cancels all three, `--status` then shows them CANCELLED and a second `--cancel`
    finds nothing left."""
    cfg_file = probe_config(tmp_path / "chain7", steps=2000, ckpt_every=100)  # ~17 min: cancelled long before
    cfg = load_config(
        cfg_file,
        ["launch.sbatch_extra.comment=slade test chain 7", 'launch.setup=["echo setup line ran on $(hostname)"]'],
    )
    shape = JobShape(cpus_per_task=1, tasks_per_node=1)
    plan = [JobSpec("first", "probe", 1, shape), JobSpec("second", "probe", 1, shape, after="first")]
    subs = submit_slurm(cfg, plan, force=False, job_cls=functools.partial(ProbeJob, env={"PROBE_SLEEP_S": "0.5"}))
    write_record(cfg, "slurm", subs)
    first, second = (sub.job_id for sub in subs)
    # a later launch for the same run (as `--stage student` after `--stage all`); --begin holds its
    # job in the queue, where it cannot meet the first job's run-directory lock
    later_cfg = load_config(cfg_file, ["launch.sbatch_extra.begin=now+3600"])
    later = submit_slurm(later_cfg, [JobSpec("third", "probe", 1, shape)], force=False, job_cls=ProbeJob)
    write_record(later_cfg, "slurm", later)
    third = later[0].job_id
    wait_for(lambda: sacct_state(first) == "RUNNING", "the first job to start")

    # the dry run renders each job's script itself (anywhere, no private submitit import): here it
    # must be, line for line, the script submitit wrote and sbatch ran
    for sub, dep in ((subs[0], None), (subs[1], f"afterok:{first}")):
        real = sub.jobs[0].paths.submission_file.read_text().splitlines()
        real = [ln for ln in real if ln.strip() and not ln.startswith(("#!", "# "))]
        assert slurm.script_lines(slurm.slurm_params(sub.spec, cfg, dep), log_folder(cfg, sub.spec)) == real

    info = subprocess.run(["scontrol", "show", "job", "-o", first], capture_output=True, text=True).stdout
    assert "Comment=slade test chain 7" in info and "JobName=slade-run-first" in info, info
    stdout = Path(subs[0].stdout)
    wait_for(lambda: stdout.exists() and "setup line ran on" in stdout.read_text(), "the setup line in the job log")

    status = launch("--status", "--config", str(cfg_file))
    assert status.returncode == 0, status.stderr
    print(status.stdout)
    rows = {line.split()[0]: line.split()[1:] for line in status.stdout.splitlines() if "slade-run-" in line}
    assert rows["slade-run-first"][:2] == [first, "RUNNING"], status.stdout
    assert rows["slade-run-second"][:2] == [second, "PENDING"], status.stdout
    assert rows["slade-run-third"][:2] == [third, "PENDING"], status.stdout  # the later launch hides nothing
    assert "2 launch(es)" in status.stdout and rows["slade-run-first"][2] in ("node1", "node2"), status.stdout

    cancel = launch("--cancel", "--config", str(cfg_file))
    assert cancel.returncode == 0, cancel.stderr
    print(cancel.stdout)
    assert f"scancel {first} {second} {third}" in cancel.stdout
    for name in ("first", "second", "third"):
        assert f"cancelling slade-run-{name}" in cancel.stdout
    assert wait_states([first, second, third]) == {first: "CANCELLED", second: "CANCELLED", third: "CANCELLED"}

    after = launch("--status", "--config", str(cfg_file))
    assert [line.split()[2] for line in after.stdout.splitlines() if "slade-run-" in line] == ["CANCELLED"] * 3
    again = launch("--cancel", "--config", str(cfg_file))
    assert again.returncode == 0 and "nothing to cancel: every job launched for run dir" in again.stdout


# ------------------------------------------------------------------ errors before submitting
def _squeue_count() -> int:
    return len(subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.splitlines())


BAD_ARGUMENTS = [
    # 6 classes split over 3 ranks: the batch is fine, the partition is what refuses
    (["--stage", "teacher", "--nodes", "3", "train.classes_per_batch=6"], "asks for 3 nodes but partition 'debug' has 2"),
    (["--stage", "teacher", "--partition", "nosuch"], "partition 'nosuch' does not exist"),
    (["--stage", "teacher", "--cpus-per-task", "8"], "nodes of partition 'debug' have 2 CPUs"),
    (["--stage", "teacher", "train.lrr=0.1"], "unknown config key 'train.lrr'"),
    (["--stage", "teachr"], "invalid choice: 'teachr'"),
]


def test_bad_arguments_fail_before_anything_is_submitted(slurm_cluster, tmp_path, capsys):
    cfg = probe_config(tmp_path)
    before = _squeue_count()
    for args, message in BAD_ARGUMENTS:  # in process: one interpreter start for all cases
        try:
            rc = cli.main([*args, "--config", str(cfg), "--cluster", "slurm"])
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err
    proc = launch(*BAD_ARGUMENTS[0][0], "--config", str(cfg))  # the real CLI once
    assert proc.returncode == 2 and BAD_ARGUMENTS[0][1] in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    assert _squeue_count() == before
    assert not (tmp_path / "run" / "logs").exists()


def test_dry_run_prints_config_and_exact_sbatch_lines(slurm_cluster, tmp_path, capsys):
    cfg = probe_config(tmp_path)
    rc = cli.main(
        [
            "--stage",
            "all",
            "--config",
            str(cfg),
            "--rounds",
            "2",
            "--dry-run",
            "--array",
            "2",
            "--cluster",
            "slurm",
            "launch.student.nodes=2",
            "train.lr=0.5",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    resolved = yaml.safe_load(out.split("\n# ", 1)[0].split("\n", 1)[1])  # the YAML after the hash line
    assert resolved["train"]["lr"] == 0.5 and resolved["run"]["rounds"] == 2
    jobs = [line.split()[2].rstrip(":") for line in out.splitlines() if line.startswith("## job ")]
    assert jobs == [
        "pretrain",
        "teacher",
        "round1-embed-array",
        "round1-embed",
        "round1-cluster",
        "round1-student",
        "round2-embed-array",
        "round2-embed",
        "round2-cluster",
        "round2-student",
        "eval",
    ]
    student = out.split("## job round1-student")[1].split("## job")[0]
    assert "#SBATCH --nodes=2" in student
    assert "#SBATCH --dependency='afterok:<job id of round1-cluster>'" in student
    assert "#SBATCH --kill-on-invalid-dep=yes" in student and "#SBATCH --requeue" in student
    assert "#SBATCH --array=0-1%2" in out.split("## job round1-embed-array")[1]
    assert not (tmp_path / "run").exists()  # nothing submitted, nothing written


# ------------------------------------------------------- the real chain (waits on the stages)
@pytest.mark.slow
def test_demo_chain_through_slurm_with_a_preempted_two_node_teacher(slurm_cluster, tiny_demo, tmp_path):
    """One chain covers three promises (each real chain costs minutes on 2 cores): the teacher trains
    as a 2-node job (one task per node, gloo) and checkpoints; preempted mid-run it is requeued and
    resumes from its checkpoint, while the jobs after it keep waiting; `--stage all` ends with metrics."""
    require_stages("pretrain", "teacher", "embed", "cluster", "student", "eval")
    cfg = tiny_config(
        tmp_path / "tiny.yaml",
        tiny_demo,
        tmp_path / "run",
        pretrain={"steps": 2},
        train={"teacher_steps": 16, "ckpt_every": 4},
    )
    t0 = time.time()
    # the teacher fills both nodes (2 CPUs each), so a job on all of `high` must preempt it
    proc = launch(
        "--stage",
        "all",
        "--config",
        str(cfg),
        "--cluster",
        "slurm",
        "--array",
        "2",
        "launch.teacher.nodes=2",
        "launch.teacher.cpus_per_task=2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "tensorboard --logdir" in proc.stdout
    jobs = submitted(tmp_path)
    assert list(jobs) == [
        "pretrain",
        "teacher",
        "round1-embed-array",
        "round1-embed",
        "round1-cluster",
        "round1-student",
        "eval",
    ]
    ckpt_dir = tmp_path / "run" / "teacher" / "ckpt"
    teacher_id = jobs["teacher"]["job_id"]
    wait_for(
        lambda: bool(list(ckpt_dir.glob("step*/slade_meta.json"))) or sacct_state(teacher_id) in TERMINAL,
        "the teacher's first checkpoint",
        400,
    )
    assert list(ckpt_dir.glob("step*/slade_meta.json")), (
        f"teacher job {teacher_id} ended ({sacct_state(teacher_id)}) before its first checkpoint:\n"
        + log_tails(Path(jobs["teacher"]["stdout"]).parent, teacher_id)
    )
    high_id = submit_preempting_job(slurm_cluster, tmp_path)
    ids = [j["job_id"] for j in jobs.values() if not j["array"]]
    ids += [f"{jobs['round1-embed-array']['job_id']}_{i}" for i in range(2)]
    states = wait_states(ids + [high_id], timeout_s=900)
    assert set(states.values()) == {"COMPLETED"}, states
    print(f"demo chain through Slurm (with one preemption): {time.time() - t0:.1f}s")
    teacher = json.loads((tmp_path / "run" / "teacher" / "DONE.json").read_text())
    assert teacher["world_size"] == 2 and teacher["result"]["steps"] == 16
    assert teacher["result"]["resumed_from"] > 0, teacher  # from its checkpoint, not from step 0
    assert (tmp_path / "run" / "teacher" / "final.pt").exists()
    info = subprocess.run(
        ["scontrol", "show", "job", "-o", jobs["teacher"]["job_id"]], capture_output=True, text=True
    ).stdout
    assert "Restarts=1" in info, info
    embed = json.loads((tmp_path / "run" / "round1" / "embed" / "DONE.json").read_text())["result"]
    # the 2 array tasks embedded the 3 unlabeled shards; the embed job after them found them done
    assert (embed["shards"], embed["already_done"], embed["written"]) == (3, 3, 0), embed
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["models"], metrics
