"""What a user sees in TensorBoard after a real (tiny) chain, asked of a real `tensorboard` server.

The chain runs through the CLI (`python -m slade_dist pipeline`: pretrain -> teacher -> embed ->
cluster -> student -> eval) on the tiny shards of tests/integration/_train_workers.py, then
`eval --force` reruns the eval stage (the rerun that used to append a second curve). The venv's
`tensorboard` then serves <run>/tb on 127.0.0.1; its HTTP API is polled (bounded requests, a
deadline) until every plugin has loaded, and the scalars, images, projector and hparams plugins
must list our runs and tags. Covers slade_dist/tb.py and its callers (train/, pseudo/cluster.py,
eval/stage.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from slade_dist.dist import find_free_port

from . import _train_workers as W

REPO = Path(__file__).resolve().parents[2]
TENSORBOARD = Path(sys.executable).with_name("tensorboard")
CHAIN = ("pretrain.steps=2", "train.teacher_steps=6", "train.student_steps=6", "student.basis_warmup_steps=2")
CHAIN += ("pseudo.k=6", "pseudo.niter=4", "run.rounds=1")
ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "slade_dist", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=900
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tb_chain")
    ovr = W.overrides(W.make_data(root / "data"), root / "run", *CHAIN)
    for args in (("pipeline", *ovr), ("eval", "--force", *ovr)):
        done = cli(*args)
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stderr[-4000:]}"
    return root / "run"


@pytest.fixture(scope="module")
def server(run_dir) -> Iterator[Callable[..., Any]]:
    """GET <base>/data/<path> as JSON, from a real server on <run>/tb."""
    port = find_free_port()
    log = open(run_dir / "tensorboard.log", "w")  # closed below, after the server
    cmd = [str(TENSORBOARD), "--logdir", str(run_dir / "tb"), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def get(path: str, **query: Any) -> Any:
        q = "?" + urllib.parse.urlencode(query) if query else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/{path}{q}", timeout=10) as r:
            return json.loads(r.read())

    try:
        yield get
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def poll(get: Callable[..., Any], ready: Callable[[Any], bool], path: str, **query: Any) -> Any:
    """The answer of `path` once `ready` holds: at most 120 requests within 120 s (the server
    starts, then loads the event files in the background)."""
    deadline, last = time.monotonic() + 120, None
    for _ in range(120):
        try:
            last = get(path, **query)
            if ready(last):
                return last
        except OSError:  # not listening yet / still starting
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    pytest.fail(f"tensorboard: /data/{path} never became ready; last answer: {last}")


STAGE_RUNS = {"pretrain", "teacher", "round1-cluster", "round1-student", "eval"}


@pytest.mark.slow
def test_tensorboard_shows_scalars_images_projector_and_hparams_of_the_chain(run_dir, server):
    plugins = poll(server, lambda d: all(d[p]["enabled"] for p in PLUGINS), "plugins_listing")
    assert all(plugins[p]["enabled"] for p in PLUGINS)

    scalars = poll(server, lambda d: STAGE_RUNS <= set(d), "plugin/scalars/tags")
    assert {"loss/total", "lr/head", "perf/images_per_s"} <= set(scalars["teacher"])
    assert {"loss/swav", "loss/total"} <= set(scalars["pretrain"])
    assert {"loss/rank_labeled", "loss/ce", "loss/sd", "lr/basis"} <= set(scalars["round1-student"])
    assert {"cluster/imbalance", "cluster/inertia"} <= set(scalars["round1-cluster"])
    assert {"eval/map_at_r", "eval/precision_at_1", "final/map_at_r"} <= set(scalars["eval"])

    images = poll(
        server, lambda d: {"pretrain", "teacher", "round1-student", "round1-cluster"} <= set(d), "plugin/images/tags"
    )
    assert set(images["pretrain"]) == {"batch/two_views"}
    assert set(images["teacher"]) == {"batch/labeled"}
    assert set(images["round1-student"]) == {"batch/labeled", "batch/pseudo_labeled"}
    groups = set(images["round1-cluster"])
    assert 1 <= len(groups) <= 8 and all(t.startswith("pseudo_class/") for t in groups), groups

    assert poll(server, lambda d: "eval" in d, "plugin/projector/runs") == ["eval"]
    (emb,) = server("plugin/projector/info", run="eval")["embeddings"]
    assert emb["tensorShape"] == [20, 32]  # the 20 test images, embed_dim 32
    assert emb["sprite"]["singleImageDim"] == [32, 32] and emb["metadataPath"].endswith("metadata.tsv")

    exp = server("plugin/hparams/experiment", request=json.dumps({"experimentName": ""}))
    hp_names = {h["name"] for h in exp["hparamInfos"]}
    assert {"train.lr", "model.backbone", "pseudo.k", "student.ablation"} <= hp_names
    assert "run.dir" not in hp_names and "train.log_every" not in hp_names
    assert "final/map_at_r" in {m["name"]["tag"] for m in exp["metricInfos"]}
    (session,) = _session_groups(server)
    assert session["name"] == "eval" and session["hparams"]["pseudo.k"] == 6
    print(_tag_report(scalars, images, server))


@pytest.mark.slow
def test_eval_rerun_replaces_its_curve_instead_of_zig_zagging(run_dir, server):
    assert len(list((run_dir / "tb" / "eval").glob("events.out.tfevents.*"))) == 2  # pipeline + eval --force
    poll(server, lambda d: "eval" in d, "plugin/scalars/tags")
    points = server("plugin/scalars/scalars", run="eval", tag="eval/map_at_r")
    assert [step for _, step, _ in points] == [0, 1]  # teacher, student r1: once each
    (session,) = _session_groups(server)  # the rerun's hparams only, not one per eval run
    assert session["sessions"][0]["metricValues"]


PLUGINS = ("scalars", "images", "projector", "hparams", "histograms", "text")


def _session_groups(get: Callable[..., Any]) -> list[dict[str, Any]]:
    req = {
        "experimentName": "",
        "startIndex": 0,
        "sliceSize": 10,
        "allowedStatuses": ALL_STATUSES,
        "colParams": [{"metric": {"tag": "final/map_at_r"}}, {"hparam": "pseudo.k"}],
    }
    return get("plugin/hparams/session_groups", request=json.dumps(req))["sessionGroups"]


def _tag_report(scalars: dict[str, Any], images: dict[str, Any], get: Callable[..., Any]) -> str:
    """The tags per plugin and run, as the server lists them (printed with -s)."""
    lines = ["scalars:"] + [f"  {r}: {', '.join(sorted(t))}" for r, t in sorted(scalars.items())]
    lines += ["images:"] + [f"  {r}: {', '.join(sorted(t))}" for r, t in sorted(images.items())]
    lines += [f"projector: {get('plugin/projector/runs')}"]
    exp = get("plugin/hparams/experiment", request=json.dumps({"experimentName": ""}))
    lines += [f"hparams: {len(exp['hparamInfos'])} hparams; metrics {[m['name']['tag'] for m in exp['metricInfos']]}"]
    lines += [f"histograms: {sorted((r, sorted(t)) for r, t in get('plugin/histograms/tags').items())}"]
    return "\n".join(lines)
