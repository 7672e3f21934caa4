"""A web crawl cannot crash the product, blow its memory or lose images silently: the hazard corpus
(tests/_hazards.py: 16-bit RGB / gray PNGs, RGBA, EXIF-rotated JPEGs, aspect-ratio bombs
200000x1 and 1000000x1, pixel bombs, an animated GIF named .jpg, damaged and empty files, names
that are not UTF-8 or hold a newline, gif/avif/heic/txt files, a sub-folder and a `loop -> .`
symlink) goes through the converters and converter -> pretrain -> teacher -> embed -> cluster ->
student -> eval (tiny_cnn, a few steps, 2 loader workers), every command under a 6 GB address-space
cap (tests/integration/_hazard_chain.py), with the real CLI. Asserted: nothing crashes, every file
is written, rejected or skipped, every sample read, counted corrupt or lost to the cut tar, the
counts agree from stage to stage, and the peak RSS of any process stays under PEAK_RSS_MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slade_dist.data.rejects import read_rejects
from slade_dist.data.shards import read_index
from slade_dist.stages import RunLayout

from . import _train_workers as W

REPO = Path(__file__).resolve().parents[2]
CAP_GB = 6
PEAK_RSS_MB = 2500  # the largest process (the chain) measured 0.93 GB (2026-12-07); a full decode of a bomb is 1-12 GB
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hazards")
    shards = root / "shards"
    data = {"train": shards / "train", "test": shards / "test", "unlabeled": shards / "unl"}
    overrides = W.overrides(
        data,
        root / "run",
        "data.num_workers=2",
        "pretrain.steps=4",
        "pretrain.local_crops=2",
        "train.teacher_steps=6",
        "train.student_steps=6",
        "train.ckpt_every=3",
        "pseudo.k=6",
        "run.rounds=1",
    )
    plan = root / "plan.json"
    plan.write_text(json.dumps({"root": str(root), "cap_gb": CAP_GB, "overrides": overrides}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "tests.integration._hazard_chain", str(plan)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return {**json.loads(r.stdout.splitlines()[-1]), "root": root, "shards": shards, "run": root / "run"}


def _done(chain: dict, stage: str, round_: int | None = None) -> dict:
    return json.loads(RunLayout(chain["run"]).done_file(stage, round_).read_text())["result"]


def _accounted(out: Path) -> dict[str, set[str]]:
    from slade_dist.data.readers import iter_shard
    from slade_dist.data.shards import shard_paths

    recs = read_rejects(out)
    return {
        "written": {m["source"] for p in shard_paths(out) for _, _, _, m in iter_shard(p)},
        "rejected": {r["path"] for r in recs if r["action"] == "rejected"},
        "skipped": {r["path"] for r in recs if r["action"] == "skipped"},
    }


def test_nothing_crashes_under_the_cap(chain):
    steps = chain["steps"]
    assert steps["flat_refused"]["rc"] == 2 and "--split unlabeled" in steps["flat_refused"]["stderr"]
    for name in ("flat", "train", "test", "unlabeled", "pipeline"):
        assert steps[name]["rc"] == 0, (name, steps[name]["stderr"])
    assert "Traceback" not in steps["pipeline"]["stderr"]


def test_every_file_is_written_rejected_or_skipped(chain):
    for split, out in (("flat", "flat"), ("train", "train"), ("test", "test")):
        want = chain["corpus"][split]
        got = _accounted(chain["shards"] / out)
        assert got["written"] == set(want["written"]), split
        assert got["rejected"] == set(want["rejected"]), split
        assert got["skipped"] == set(want["skipped"]) | {"loop"}, split  # the symlink back up, not followed
    assert read_index(chain["shards"] / "train")["num_classes"] == 6  # `loop` is no class


def test_counts_add_up_from_the_validator_to_the_cluster_stage(chain):
    unl = read_index(chain["shards"] / "unl")
    refused_listed = {r["path"].split(":")[1] for r in read_rejects(chain["shards"] / "unl") if ":" in r["path"]}
    refused = set(chain["corpus"]["unlabeled"]["refused"])
    assert refused_listed <= refused and unl["corrupt"] == len(refused_listed)  # the cut lost the rest
    assert unl["truncated"] and unl["truncated"][0].endswith(chain["corpus"]["unlabeled"]["cut"])
    embed = _done(chain, "embed", 1)
    # every complete sample of every tar is embedded or counted corrupt (the validator's count);
    # the cut tar counts a loss
    assert embed["images"] + embed["skipped_corrupt"] == unl["total"]
    assert embed["skipped_corrupt"] == unl["corrupt"] and embed["lost_to_truncation"] == 1
    cluster_dir = RunLayout(chain["run"]).stage_dir("cluster", 1)
    summary = json.loads((cluster_dir / "clusters.json").read_text())
    assert summary["n"] == embed["images"] and summary["lost_to_truncation"] == 0
    assert _done(chain, "student", 1)["steps"] == 6
    assert _done(chain, "pretrain")["steps"] == 4


def test_eval_measures_what_it_can_and_says_what_it_could_not(chain):
    metrics = json.loads((chain["run"] / "eval" / "metrics.json").read_text())
    assert "teacher" in json.dumps(metrics) and "student r1" in json.dumps(metrics)
    bombs = chain["corpus"]["test_bombs"]
    assert bombs == 3 and f"{bombs} of {20 + bombs} images of" in chain["steps"]["pipeline"]["stderr"]


def test_peak_rss_stays_under_the_bound(chain):
    print(f"hazard chain: peak RSS of its largest process {chain['peak_rss_mb']:.0f} MB (bound {PEAK_RSS_MB})")
    assert 0 < chain["peak_rss_mb"] < PEAK_RSS_MB, chain["peak_rss_mb"]
