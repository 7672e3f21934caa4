"""Every config key a stage's code reads is in its declaration (slade_dist/stages.py `Stage.reads` /
`reports`), recorded during a real run of the tiny chain, so a stage's identity cannot drift from
its code. Reads that write the whole config down (the resolved config.yaml, TensorBoard's config
text and hparams) or hash the declaration itself are not reads of a stage's inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch.distributed as tdist

from slade_dist import runner, stages, tb
from slade_dist.config import Config, load_config

from ._config_reads import ConfigReads
from .conftest import REPO_ROOT, tiny_config


@pytest.fixture(scope="module")  # one run of the chain serves both tests
def recorded(tmp_path_factory, tiny_demo):
    """({stage: keys its function read}, the run dir) over one run of the tiny chain (periodic eval
    and curate on)."""
    tmp_path = tmp_path_factory.mktemp("reads")
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

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(stages.Stage, "load", recording_load)
        for owner, name in [(Config, "to_dict"), (Config, "section_hash"), (tb, "config_hparams")]:
            monkeypatch.setattr(owner, name, paused(getattr(owner, name)))
        try:
            runner.run_pipeline(cfg)
        finally:  # the trainers gave this process a world-1 group: later tests must not inherit it
            if tdist.is_initialized():
                tdist.destroy_process_group()
    return reads, cfg.run.dir


def test_every_key_a_stage_reads_is_declared(recorded):
    recorded, _ = recorded
    assert set(recorded) == set(stages.STAGES)
    for name, keys in recorded.items():
        undeclared = sorted(k for k in keys if not stages.STAGES[name].declares(k))
        assert not undeclared, f"stage {name} reads {undeclared}: add them to its reads in slade_dist/stages.py"
    assert "train.warmup_steps" in recorded["pretrain"]  # through the copied TrainConfig of SwAV
    assert "pseudo.k" in recorded["cluster"] and "pseudo.k" not in recorded["embed"]
    assert "eval.recall_k" in recorded["teacher"]  # the periodic evaluator: reported, not hashed


def _documented_run_directory() -> dict[str, str]:
    """docs/ARCHITECTURE.md's run-directory map: {directory pattern: the text that names its files}."""
    text = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("## Run directory", 1)[1].split("```")[1]
    entries: dict[str, str] = {}
    last: list[str] = []
    for line in block.strip().splitlines():
        if line.startswith("<run>/"):
            head, _, names = line.partition("  ")  # one or more "<run>/dir/" (or a file) then the files
            heads = [d.rstrip(",") for d in head.split() if d.startswith("<run>/")]
            files = [d for d in heads if not d.endswith("/")]
            entries["<run>"] = entries.get("<run>", "") + " " + " ".join(f.removeprefix("<run>/") for f in files)
            last = [d.rstrip("/") for d in heads if d.endswith("/")]
            entries.update({d: names for d in last})
        else:  # a continuation line names more files of the same directories
            entries.update({d: entries[d] + " " + line for d in last})
    return entries


def _as_documented(path: Path) -> tuple[str, str]:
    """(directory, file name) of a run-dir path with its numbers as the map writes them."""
    rel = re.sub(r"round\d+", "round<r>", path.as_posix())
    rel = re.sub(r"\d{6}", "%06d", rel)
    directory, _, name = rel.rpartition("/")
    return "<run>/" + directory if directory else "<run>", re.sub(r"-\d{5}\.npy$", "-%05d.npy", name)


def test_the_run_directory_map_in_the_docs_names_every_file_the_chain_wrote(recorded):
    _, run_dir = recorded
    documented = _documented_run_directory()
    undocumented = []
    for path in sorted(p.relative_to(run_dir) for p in Path(run_dir).rglob("*") if p.is_file()):
        if path.parts[0] == "tb" or any(part.endswith("ckpt") for part in path.parts[:-1]):
            continue  # TensorBoard's and the checkpointers' own files: the map names the folders
        directory, name = _as_documented(path)
        text = documented.get(directory, "") if directory == "<run>" else documented["<run>/<stage>"]
        text += documented.get(directory, "") + (documented["<run>/teacher"] if directory.endswith("/student") else "")
        if directory == "<run>/eval" and name.startswith("retrieval_"):
            name = "retrieval_<model>.png"
        if name not in re.split(r"[\s,+()]+", text):
            undocumented.append(f"{directory}/{name}")
    assert not undocumented, (
        f"files the chain wrote that docs/ARCHITECTURE.md's run-directory map lacks: {undocumented}"
    )


def test_swav_pretraining_leaves_out_what_curate_found_to_copy_a_test_image(recorded):
    _, run_dir = recorded
    curate = json.loads((Path(run_dir) / "curate" / "curate.json").read_text())
    pretrain = json.loads((Path(run_dir) / "pretrain" / "DONE.json").read_text())
    removed = curate["removed"]["near_test"] + curate["removed"]["same_bytes"]
    assert pretrain["result"]["test_copies_left_out"] == removed
    assert "curate" in pretrain["inputs"]  # new curation decisions rerun pretrain
