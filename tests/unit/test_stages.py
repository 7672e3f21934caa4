"""Stage registry, run layout, DONE markers and provenance (slade_dist/stages.py) and running stages
(slade_dist/runner.py): skip when config and inputs match, rerun on change or --force, the run-dir lock."""

from __future__ import annotations

import json

import pytest

from slade_dist.config import ConfigError, load_config
from slade_dist.fileio import DirInUse, DirLock
from slade_dist.runner import run_stage
from slade_dist.stages import (
    STAGES,
    RunLayout,
    Stage,
    is_done,
    pipeline_plan,
    stage_hash,
    stage_id,
    stage_inputs,
    why_not_done,
    write_done,
)

from . import _stage_fixtures


@pytest.fixture
def counter_stage():
    STAGES["unit_counter"] = Stage(
        "unit_counter", "tests.unit._stage_fixtures:counting_stage", ("data", "model", "train"), False, (), "test stage"
    )
    _stage_fixtures.CALLS.clear()
    yield
    del STAGES["unit_counter"]


def test_registry_names_and_plan():
    assert list(STAGES)[:7] == ["curate", "pretrain", "teacher", "embed", "cluster", "student", "eval"]
    assert pipeline_plan(1, ("curate.enabled",))[:2] == [("curate", 1), ("pretrain", 1)]  # a switched stage
    plan = pipeline_plan(2)
    assert plan[:2] == [("pretrain", 1), ("teacher", 1)] and plan[-1] == ("eval", 1)
    assert plan[2:8] == [("embed", 1), ("cluster", 1), ("student", 1), ("embed", 2), ("cluster", 2), ("student", 2)]


def test_layout(tmp_path):
    lay = RunLayout(tmp_path)
    assert lay.stage_dir("teacher") == tmp_path / "teacher"
    assert lay.stage_dir("cluster", 2) == tmp_path / "round2" / "cluster"
    assert lay.tb_dir("student", 1) == tmp_path / "tb" / "round1-student"
    assert lay.teacher_weights(1) == tmp_path / "teacher" / "final.pt"
    assert lay.teacher_weights(3) == tmp_path / "round2" / "student" / "final.pt"
    with pytest.raises(ValueError):
        lay.stage_dir("embed")
    assert lay.final_weights(2) == tmp_path / "teacher" / "final.pt"
    (tmp_path / "round1" / "student").mkdir(parents=True)
    (tmp_path / "round1" / "student" / "final.pt").write_bytes(b"x")
    assert lay.final_weights(2) == tmp_path / "round1" / "student" / "final.pt"


def test_skip_when_done_rerun_on_change_or_force(tmp_path, counter_stage):
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.teacher_steps=5"])
    assert run_stage(cfg, "unit_counter") == {"steps": 5}
    done = json.loads((tmp_path / "unit_counter" / "DONE.json").read_text())
    assert done["config_hash"] == stage_hash(cfg, "unit_counter") and done["result"] == {"steps": 5}
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "unit_counter" / "config.yaml").exists()
    assert run_stage(cfg, "unit_counter") is None  # skipped: marker matches
    assert run_stage(cfg, "unit_counter", force=True) == {"steps": 5}  # --force reruns
    unrelated = load_config(None, [f"run.dir={tmp_path}", "train.teacher_steps=5", "eval.nmi=false"])
    assert run_stage(unrelated, "unit_counter") is None  # eval is not this stage's business
    changed = load_config(None, [f"run.dir={tmp_path}", "train.teacher_steps=6"])
    assert run_stage(changed, "unit_counter") == {"steps": 6}  # its own section changed: rerun
    assert _stage_fixtures.CALLS == [5, 5, 6]


def test_stage_hash_covers_what_the_stage_declares_it_reads():
    a = load_config(None, ["pseudo.k=10"])
    b = load_config(None, ["pseudo.k=20"])
    assert stage_hash(a, "cluster") != stage_hash(b, "cluster")
    for stage in ("pretrain", "teacher", "embed", "student", "eval"):  # none of them reads pseudo.k
        assert stage_hash(a, stage) == stage_hash(b, stage), stage
    r2 = load_config(None, ["pseudo.k=10", "run.round=2"])
    assert stage_hash(a, "embed") != stage_hash(r2, "embed") and stage_hash(a, "teacher") == stage_hash(r2, "teacher")
    moved = load_config(None, ["pseudo.k=10", "run.dir=elsewhere", "train.log_every=3", "eval.nmi=false"])
    for stage in ("pretrain", "teacher", "embed", "cluster", "student"):  # where, logging, periodic-eval reports
        assert stage_hash(a, stage) == stage_hash(moved, stage), stage
    assert stage_hash(a, "eval") != stage_hash(moved, "eval")


def test_warmup_reruns_pretrain_and_pseudo_k_does_not_rerun_embed(tmp_path):
    base = [f"run.dir={tmp_path}"]
    cfg = load_config(None, base)
    for stage in ("pretrain", "embed"):
        write_done(cfg, stage, {}, 1.0)
        assert is_done(cfg, stage)
    warmup = load_config(None, [*base, "train.warmup_steps=7"])  # SwAV's optimiser reads it
    assert why_not_done(warmup, "pretrain").startswith("config changed")
    assert is_done(load_config(None, [*base, "pseudo.k=11"]), "embed")  # only cluster reads pseudo.k


def test_the_chain_follows_the_registry_order():
    STAGES["unit_round"] = Stage("unit_round", "x:y", (), True, (), "test stage")
    try:
        plan = pipeline_plan(2)
        assert plan[2:6] == [("embed", 1), ("cluster", 1), ("student", 1), ("unit_round", 1)]
        assert plan[-2:] == [("unit_round", 2), ("eval", 1)]
    finally:
        del STAGES["unit_round"]


def test_missing_inputs_fail_before_running(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    if not STAGES["teacher"].available():
        pytest.skip("teacher stage not importable in this checkout")
    with pytest.raises(ConfigError, match="data.train_shards must be set"):
        run_stage(cfg, "teacher")
    assert not (tmp_path / "teacher" / "DONE.json").exists()


def test_unknown_stage():
    with pytest.raises(KeyError, match="stages: curate, pretrain"):
        run_stage(load_config(), "nope")


def test_provenance_follows_the_files_each_stage_reads(tmp_path):
    """A retrained teacher (new final.pt bytes) makes embed, then cluster, student and eval stale;
    the same bytes keep them done; a changed shard index makes its readers stale."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "index.json").write_text('{"shards": []}')
    cfg = load_config(
        None, [f"run.dir={tmp_path / 'run'}", f"data.unlabeled_shards={tmp_path / 'data'}"], check_paths=False
    )
    lay = RunLayout(cfg.run.dir)
    teacher = lay.stage_dir("teacher") / "final.pt"
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(b"weights v1")
    assert why_not_done(cfg, "embed") == "no DONE.json"
    write_done(cfg, "embed", {}, 1.0)
    write_done(cfg, "cluster", {}, 1.0)
    assert is_done(cfg, "embed") and is_done(cfg, "cluster")
    teacher.write_bytes(b"weights v1")  # rewritten, same content: still done
    assert is_done(cfg, "embed")
    teacher.write_bytes(b"weights v2")  # retrained
    assert why_not_done(cfg, "embed") == "inputs changed: teacher"
    assert is_done(cfg, "cluster")  # until embed reruns and gets a new id
    write_done(cfg, "embed", {}, 1.0)
    assert why_not_done(cfg, "cluster") == "inputs changed: embed"
    (tmp_path / "data" / "index.json").write_text('{"shards": [{"name": "a.tar", "count": 1}]}')
    assert why_not_done(cfg, "embed") == "inputs changed: data.unlabeled_shards"
    assert stage_inputs(cfg, "student")["cluster"] == stage_id(
        cfg, "cluster", json.loads(lay.done_file("cluster", 1).read_text())["inputs"]
    )


def test_force_moves_a_trainers_checkpoints_aside(tmp_path, counter_stage):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    ckpt = tmp_path / "unit_counter" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "step00000005").mkdir()
    run_stage(cfg, "unit_counter", force=True)
    aside = [p for p in (tmp_path / "unit_counter").iterdir() if p.name.startswith("ckpt.forced-")]
    assert not ckpt.exists() and len(aside) == 1 and (aside[0] / "step00000005").is_dir()


def test_a_run_dir_in_use_is_refused(tmp_path, counter_stage):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    held = DirLock(tmp_path).acquire()  # another live launch holds it (same process is fine for flock)
    try:
        with pytest.raises(DirInUse, match="is in use by pid"):
            run_stage(cfg, "unit_counter")
    finally:
        held.release()
    assert run_stage(cfg, "unit_counter") == {"steps": cfg.train.teacher_steps}
