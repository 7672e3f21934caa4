"""Every config key a stage's code reads is in its declaration (slade_dist/stages.py `Stage.reads` /
`reports`), recorded during a real run of the tiny chain, so a stage's identity cannot drift from
its code. Reads that write the whole config down (the resolved config.yaml, TensorBoard's config
text and hparams) or hash the declaration itself are not reads of a stage's inputs."""

from __future__ import annotations

import pytest
import torch.distributed as tdist

from slade_dist import runner, stages, tb
from slade_dist.config import Config, load_config

from ._config_reads import ConfigReads
from .conftest import tiny_config


@pytest.fixture
def recorded(tmp_path, tiny_demo, monkeypatch):
    """{stage: keys its function read} over one run of the tiny chain (periodic eval and curate on)."""
    run_file = tiny_config(  # curate on: every registered stage runs
        tmp_path / "tiny.yaml", tiny_demo, tmp_path / "run", eval={"grid_queries": 2}, curate={"enabled": True}
    )
    cfg = load_config(run_file, ["train.eval_every=3"])
    reads: dict[str, set[str]] = {}
    current: list[ConfigReads] = []
    load = stages.Stage.load

    def recording_load(stage: stages.Stage):
        fn = load(stage)

        def run(c: Config, run_dir, **kwargs):
            with ConfigReads(c) as rec:
                current[:] = [rec]
                try:
                    return fn(c, run_dir, **kwargs)
                finally:
                    reads[stage.name] = rec.keys
                    current.clear()

        return run

    def paused(fn):
        def call(*args, **kwargs):
            if not current:
                return fn(*args, **kwargs)
            with current[0].paused():
                return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(stages.Stage, "load", recording_load)
    for owner, name in [(Config, "to_dict"), (Config, "section_hash"), (tb, "config_hparams")]:
        monkeypatch.setattr(owner, name, paused(getattr(owner, name)))
    try:
        runner.run_pipeline(cfg)
    finally:  # the trainers gave this process a world-1 group: later tests must not inherit it
        if tdist.is_initialized():
            tdist.destroy_process_group()
    return reads


def test_every_key_a_stage_reads_is_declared(recorded):
    assert set(recorded) == set(stages.STAGES)
    for name, keys in recorded.items():
        undeclared = sorted(k for k in keys if not stages.STAGES[name].declares(k))
        assert not undeclared, f"stage {name} reads {undeclared}: add them to its reads in slade_dist/stages.py"
    assert "train.warmup_steps" in recorded["pretrain"]  # through the copied TrainConfig of SwAV
    assert "pseudo.k" in recorded["cluster"] and "pseudo.k" not in recorded["embed"]
    assert "eval.recall_k" in recorded["teacher"]  # the periodic evaluator: reported, not hashed
