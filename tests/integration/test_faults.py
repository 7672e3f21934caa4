"""The fault suite: a run broken the way a careless or hostile user breaks it, with the real CLI
(`python -m slade_dist ...` in its own process), real shards, real checkpoints and real filesystems.

One test per fault, numbered as the trust issue lists them:
 1 a changed config retrains from step 0 (old checkpoints moved aside); --force starts over
 2 a changed input reruns its stage and everything downstream; downstream always reads the current teacher
 3 a planted pickle (pretrained weights, a stage's final.pt, a DeepSpeed checkpoint) never runs
 4 a shard listed in index.json but missing is an error naming it; restored, it is embedded
 5 every labeled image corrupt: the teacher stops at once with a clear error
 6 a pseudo-label file without some readable keys of its shard is refused
 7 what a truncated tar loses is counted; eval says how many test images it could not measure
 8 values that used to pass the load-time checks fail there, before anything runs
 9 a full disk / read-only run dir: one line naming the path and the cause
10 a second launch on a run dir in use is refused; a stale lock is reported and taken over
11 a shard dir named `pipe:...` is a directory, never a shell command
and a kill test: embed SIGKILLed mid-pass completes with consistent outputs (trainer kills:
tests/integration/test_resume.py; k-means killed mid-Lloyd: tests/integration/test_pseudo_multirank.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slade_dist.provenance import file_id
from slade_dist.stages import RunLayout

from . import _train_workers as W

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """One `python -m slade_dist` process, as a user runs it."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "slade_dist", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def done(run: Path, stage: str, round_: int | None = None) -> dict:
    return json.loads(RunLayout(run).done_file(stage, round_).read_text())


def ovr(data: dict, run: Path, *extra: str) -> list[str]:
    return W.overrides(
        data,
        run,
        "train.teacher_steps=6",
        "train.student_steps=6",
        "train.ckpt_every=3",
        "pretrain.steps=0",
        "pseudo.k=6",
        "run.rounds=1",
        *extra,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return W.make_data(tmp_path_factory.mktemp("faults"), n_classes=6, per_class=6, unl_per_class=4)


def test_1_changed_config_retrains_from_step_zero(tmp_path, data):
    run = tmp_path / "run"
    first = cli("teacher", *ovr(data, run))
    assert first.returncode == 0, first.stderr
    weights = file_id(RunLayout(run).stage_dir("teacher") / "final.pt")
    changed = cli("teacher", *ovr(data, run, "loss.ms_alpha=3.0"))
    assert changed.returncode == 0, changed.stderr
    res = done(run, "teacher")["result"]
    assert res["steps"] == 6 and res["resumed_from"] == 0  # trained again, not resumed at the end
    assert file_id(RunLayout(run).stage_dir("teacher") / "final.pt") != weights
    assert [p.name for p in (run / "teacher").glob("ckpt.stale-*")], "old checkpoints must be kept aside"
    forced = cli("teacher", "--force", *ovr(data, run, "loss.ms_alpha=3.0"))
    assert forced.returncode == 0, forced.stderr
    assert done(run, "teacher")["result"]["resumed_from"] == 0
    assert [p.name for p in (run / "teacher").glob("ckpt.forced-*")]
    # a new embedding width after a finished run: the stale checkpoints are not loaded into the new shape
    wider = cli("teacher", *ovr(data, run, "loss.ms_alpha=3.0", "model.embed_dim=16"))
    assert wider.returncode == 0, wider.stderr


def test_2_changed_input_reruns_everything_downstream(tmp_path, data):
    run = tmp_path / "run"
    train = tmp_path / "train"
    shutil.copytree(data["train"], train)
    args = [*ovr({**data, "train": train}, run)]
    first = cli("pipeline", *args, timeout=600)
    assert first.returncode == 0, first.stderr
    before = {
        s: done(run, s, r)["stage_id"]
        for s, r in [("teacher", None), ("embed", 1), ("cluster", 1), ("student", 1), ("eval", None)]
    }
    again = cli("pipeline", *args, timeout=600)  # nothing changed: everything skipped
    assert again.returncode == 0 and again.stderr.count("skipped") >= 5, again.stderr
    # the teacher's labeled data changes (one shard rewritten, same name and index): all of it reruns
    W.write_labeled(tmp_path / "other", 6, 6, seed=9)
    shutil.copy(tmp_path / "other" / "train-000000.tar", train / "train-000000.tar")
    third = cli("pipeline", *args, timeout=600)
    assert third.returncode == 0, third.stderr
    assert "inputs changed: data.train_shards" in third.stderr
    for (stage, r), old in zip(
        [("teacher", None), ("embed", 1), ("cluster", 1), ("student", 1), ("eval", None)], before.values()
    ):
        assert done(run, stage, r)["stage_id"] != old, f"{stage} was not rebuilt on the new inputs"
    # the case: teacher/ deleted and retrained; whatever bytes it gives, embed reads them
    shutil.rmtree(run / "teacher")
    fourth = cli("pipeline", *args, timeout=600)
    assert fourth.returncode == 0, fourth.stderr
    assert done(run, "embed", 1)["inputs"]["teacher"] == file_id(run / "teacher" / "final.pt")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path, base: dict | None = None) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(base or {}), "state_dict": {}, "planted": _Payload(marker)}, path)


def test_3_planted_checkpoints_never_run(tmp_path, data):
    import torch

    marker = tmp_path / "PWNED"
    evil = tmp_path / "swav.pt"
    _plant(evil, marker)
    r = cli("teacher", *ovr(data, tmp_path / "a", f"model.pretrained_path={evil}"))
    assert r.returncode != 0 and "refused" in r.stderr and "would import code" in r.stderr, r.stderr
    run = tmp_path / "b"
    assert cli("teacher", *ovr(data, run)).returncode == 0
    final = run / "teacher" / "final.pt"
    _plant(final, marker, torch.load(final, weights_only=True))
    r = cli("embed", *ovr(data, run))
    assert r.returncode != 0 and "refused" in r.stderr, r.stderr
    ckpt = sorted((run / "teacher" / "ckpt").glob("step*"))[-1] / "mp_rank_00_model_states.pt"
    _plant(ckpt, marker, torch.load(ckpt, weights_only=True))
    (run / "teacher" / "DONE.json").unlink()  # the same work again: the trainer resumes that checkpoint
    r = cli("teacher", *ovr(data, run))
    assert r.returncode != 0 and "refused" in r.stderr and "could run code" in r.stderr, r.stderr
    assert not marker.exists(), "a planted checkpoint ran code"


def test_4_missing_shard_is_an_error_then_restored(tmp_path, data):
    run, unl = tmp_path / "run", tmp_path / "unl"
    shutil.copytree(data["unlabeled"], unl)
    d = {**data, "unlabeled": unl}
    assert cli("teacher", *ovr(d, run)).returncode == 0
    (unl / "unlabeled-000001.tar").rename(tmp_path / "away.tar")
    r = cli("embed", *ovr(d, run))
    assert r.returncode != 0 and "missing on disk (first: unlabeled-000001.tar)" in r.stderr, r.stderr
    assert not list((run / "round1" / "embed").glob("emb-000001*"))  # no 0-row file that looks done
    (tmp_path / "away.tar").rename(unl / "unlabeled-000001.tar")
    r = cli("embed", *ovr(d, run))
    assert r.returncode == 0, r.stderr
    assert done(run, "embed", 1)["result"]["images"] == 24


def test_5_all_labeled_images_corrupt_fails_fast(tmp_path, data):
    bad = tmp_path / "bad"
    from slade_dist.data.shards import write_classes, write_index, write_shard

    write_shard(
        bad / "train-000000.tar",
        ({"__key__": f"{i:04d}", "jpg": b"garbage", "cls": str(i % 6).encode()} for i in range(300)),
    )
    write_index(bad, [{"name": "train-000000.tar", "count": 300}], "labeled")
    write_classes(bad, [f"c{i}" for i in range(6)])
    t0 = time.time()
    r = cli("teacher", *ovr({**data, "train": bad}, tmp_path / "run"), timeout=120)
    assert r.returncode == 2 and "could be decoded" in r.stderr, r.stderr  # errors.UnusableInput: exit 2
    assert "Traceback" not in r.stderr, r.stderr
    assert time.time() - t0 < 120


def test_6_partial_pseudo_labels_are_refused(tmp_path, data):
    """A label file without some readable keys of its shard is refused where the cluster stage
    indexes its labels for the student, naming both files; the student never starts on it."""
    from slade_dist.data.pseudo_index import build_index
    from slade_dist.data.pseudo_labels import PseudoLabelMismatch, read_pseudo_labels, write_pseudo_labels

    run = tmp_path / "run"
    pl = RunLayout(run).stage_dir("cluster", 1)
    W.write_pseudo(data["unlabeled"], pl, data["truth"])
    keys, cls, dist = read_pseudo_labels(pl / "pl-000000.npz")
    write_pseudo_labels(pl / "pl-000000.npz", keys[:-4], cls[:-4], dist[:-4])  # 4 readable images dropped
    with pytest.raises(
        PseudoLabelMismatch, match=r"pl-000000.npz.*unlabeled-000000.tar|unlabeled-000000.tar.*pl-000000"
    ):
        build_index(data["unlabeled"], pl)
    assert cli("teacher", *ovr(data, run)).returncode == 0
    r = cli("student", *ovr(data, run, "train.student_steps=40"))  # the index was cleared: no student on it
    assert r.returncode != 0 and "cluster stage" in r.stderr, r.stderr


def test_7_truncation_losses_are_counted_and_eval_warns(tmp_path, data):
    run, unl, test = tmp_path / "run", tmp_path / "unl", tmp_path / "test"
    shutil.copytree(data["unlabeled"], unl)
    shutil.copytree(data["test"], test)
    for tar in (unl / "unlabeled-000000.tar", test / "test-000000.tar"):
        raw = tar.read_bytes()
        tar.write_bytes(raw[: len(raw) // 2])  # half a shard
    d = {**data, "unlabeled": unl, "test": test}
    assert cli("teacher", *ovr(d, run)).returncode == 0
    r = cli("embed", *ovr(d, run))
    assert r.returncode == 0, r.stderr
    res = done(run, "embed", 1)["result"]
    assert res["lost_to_truncation"] >= 4 and res["images"] + res["lost_to_truncation"] == 24, res
    r = cli("eval", *ovr(d, run))
    assert r.returncode == 0, r.stderr
    assert "of 20 images of" in r.stderr and "lost to truncated tars" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "bad, says",
    [
        ("train.lr=.nan", "train.lr (from command line): nan is not a finite number"),
        ("eval.recall_k=[0,-1]", "eval.recall_k (from command line): 0 is below the minimum 1"),
        ("run.dir=", "run.dir (from command line) must not be empty"),
        ("model.backbone=resnet9000", "unknown backbone 'resnet9000'"),
        ("train.classes_per_batch=7", "lists only 6 classes"),
    ],
)
def test_8_bad_values_fail_at_load(tmp_path, data, bad, says):
    r = cli("teacher", *ovr(data, tmp_path / "run"), bad, timeout=120)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()  # nothing ran, nothing written


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")


def test_9_full_disk_and_read_only_run_dir(tmp_path, data):
    full, ro = tmp_path / "full", tmp_path / "ro"
    _tmpfs(full, "300k")
    _tmpfs(ro, "1m")
    try:
        r = cli("teacher", *ovr(data, full / "run"))
        assert r.returncode != 0 and "the disk is full" in r.stderr and str(full) in r.stderr, r.stderr[-2000:]
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        r = cli("teacher", *ovr(data, ro / "run"))
        assert r.returncode != 0 and "the filesystem is read-only" in r.stderr, r.stderr[-2000:]
    finally:
        subprocess.run(["umount", "-l", str(full)])
        subprocess.run(["umount", "-l", str(ro)])


def test_10_run_dir_in_use_and_stale_lock(tmp_path, data):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from slade_dist.fileio import DirLock; "
            "DirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
            str(run),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        r = cli("teacher", *ovr(data, run))
        assert r.returncode != 0 and f"is in use by pid {holder.pid}" in r.stderr, r.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = cli("teacher", *ovr(data, run))  # the killed holder left its note: stale, reported, taken over
    assert r.returncode == 0 and f"stale lock in {run} (pid {holder.pid}" in r.stderr, r.stderr


def test_11_pipe_named_shard_dir_never_runs_a_command(tmp_path, data):
    marker = tmp_path / "PIPED"
    weird = Path("pipe:touch " + str(marker) + " ;")
    target = tmp_path / "cwd" / weird
    shutil.copytree(data["unlabeled"], target)
    args = ovr({**data, "unlabeled": weird}, tmp_path / "run", "pretrain.steps=2")
    env = {"PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "slade_dist", "pretrain", *args],
        cwd=tmp_path / "cwd",
        env={**os.environ, "DS_ACCELERATOR": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), "a shard path was run as a shell command"


def test_killed_embed_completes_with_consistent_outputs(tmp_path, data):
    """SIGKILL mid-pass (several shards written, others not): the rerun embeds only what is
    missing, and every shard ends with keys in tar order and one row per readable image."""
    from slade_dist.data.readers import iter_shard
    from slade_dist.data.shards import shard_paths
    from slade_dist.pseudo import embed

    run, unl = tmp_path / "run", tmp_path / "unl"
    W.write_unlabeled(unl, 6, 20, n_shards=12)
    d = {**data, "unlabeled": unl}
    assert cli("teacher", *ovr(d, run)).returncode == 0
    out = RunLayout(run).stage_dir("embed", 1)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "slade_dist", "embed", *ovr(d, run, "pseudo.embed_batch_size=4")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("emb-*.npy"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written_before = len(list(out.glob("emb-*.npy")))
    assert not (out / "DONE.json").exists()
    r = cli("embed", *ovr(d, run))
    assert r.returncode == 0, r.stderr
    res = done(run, "embed", 1)["result"]
    assert res["already_done"] == written_before and res["written"] == 12 - written_before
    for shard in shard_paths(unl):
        keys = [k for k, *_ in iter_shard(shard)]
        assert embed.read_keys(out, shard) == keys and embed.load_embeddings(out, shard).shape[0] == len(keys)
    # a kill mid-write can leave a hidden temp file (".emb-...tmp<pid>"): never one readers see
    assert not [p for p in out.iterdir() if ".tmp" in p.name and not p.name.startswith(".")]
