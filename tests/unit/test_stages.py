"""Stage registry, run layout, DONE markers: skip when the hash matches, rerun on change or --force."""
from __future__ import annotations

import json

import pytest

from slade_dist.config import ConfigError, load_config
from slade_dist.stages import STAGES, RunLayout, Stage, pipeline_plan, run_stage, stage_hash

from . import _stage_fixtures


@pytest.fixture
def counter_stage():
    STAGES["unit_counter"] = Stage("unit_counter", "tests.unit._stage_fixtures:counting_stage",
                                   ("data", "model", "train"), False, (), "test stage")
    _stage_fixtures.CALLS.clear()
    yield
    del STAGES["unit_counter"]


def test_registry_names_and_plan():
    assert list(STAGES)[:6] == ["pretrain", "teacher", "embed", "cluster", "student", "eval"]
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
    assert run_stage(cfg, "unit_counter") is None                     # skipped: marker matches
    assert run_stage(cfg, "unit_counter", force=True) == {"steps": 5}  # --force reruns
    unrelated = load_config(None, [f"run.dir={tmp_path}", "train.teacher_steps=5", "eval.nmi=false"])
    assert run_stage(unrelated, "unit_counter") is None                # eval is not this stage's business
    changed = load_config(None, [f"run.dir={tmp_path}", "train.teacher_steps=6"])
    assert run_stage(changed, "unit_counter") == {"steps": 6}          # its own section changed: rerun
    assert _stage_fixtures.CALLS == [5, 5, 6]


def test_stage_hash_chain():
    a = load_config(None, ["pseudo.k=10"])
    b = load_config(None, ["pseudo.k=20"])
    assert stage_hash(a, "teacher") == stage_hash(b, "teacher")        # upstream ignores downstream knobs
    assert stage_hash(a, "cluster") != stage_hash(b, "cluster")
    assert stage_hash(a, "student") != stage_hash(b, "student")        # downstream sees upstream changes
    r2 = load_config(None, ["pseudo.k=10", "run.round=2"])
    assert stage_hash(a, "embed") != stage_hash(r2, "embed") and stage_hash(a, "teacher") == stage_hash(r2, "teacher")


def test_missing_inputs_fail_before_running(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    if not STAGES["teacher"].available():
        pytest.skip("teacher stage not importable in this checkout")
    with pytest.raises(ConfigError, match="data.train_shards must be set"):
        run_stage(cfg, "teacher")
    assert not (tmp_path / "teacher" / "DONE.json").exists()


def test_unknown_stage():
    with pytest.raises(KeyError, match="stages: pretrain"):
        run_stage(load_config(), "nope")
