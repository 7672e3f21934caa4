"""Stage registry, run-directory layout, DONE markers and the round loop.

Owns: which stages exist and where each reads/writes (`RunLayout`), the config sections whose
hash identifies a stage's work, `DONE.json` (a stage whose marker matches its hash is skipped;
`force=True` reruns it), and running the whole chain in one process (`run_pipeline`).
A stage is a plain function `run(cfg, run_dir) -> dict` (counts/timings for DONE.json) in its own
module, imported lazily so one missing stage never breaks the others.
Tests: tests/unit/test_stages.py.
"""
from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import dist
from .config import Config
from .fileio import atomic_write_json

# The sections a stage's result depends on are cumulative along the chain: changing the teacher's
# loss invalidates everything downstream, changing eval.* reruns only eval.
_CHAIN_SECTIONS = ["run_seed", "data", "model", "pretrain", "train", "loss", "pseudo", "student",
                   "basis", "mining", "eval"]


@dataclass(frozen=True)
class Stage:
    name: str
    target: str                 # "module:function"
    sections: tuple[str, ...]   # config sections its result depends on
    per_round: bool             # lives under round<r>/ and depends on run.round
    requires: tuple[str, ...]   # config keys that must name existing inputs
    help: str

    def load(self) -> Callable[[Config, Path], dict[str, Any]]:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)

    def available(self) -> bool:
        try:
            self.load()
            return True
        except (ImportError, AttributeError):
            return False


def _upto(last: str) -> tuple[str, ...]:
    return tuple(_CHAIN_SECTIONS[: _CHAIN_SECTIONS.index(last) + 1])


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("pretrain", "slade_dist.train.pretrain:run", _upto("pretrain"), False,
          ("data.train_shards", "data.unlabeled_shards"),
          "SwAV self-supervised training on labeled + unlabeled images (labels ignored)"),
    Stage("teacher", "slade_dist.train.teacher:run", _upto("loss"), False, ("data.train_shards",),
          "ranking loss (MS / contrastive) on labeled P x K batches"),
    Stage("embed", "slade_dist.pseudo.embed:run", _upto("pseudo"), True, ("data.unlabeled_shards",),
          "teacher embeddings of every unlabeled image, one file pair per shard"),
    Stage("cluster", "slade_dist.pseudo.cluster:run", _upto("pseudo"), True, ("data.unlabeled_shards",),
          "distributed k-means on the embeddings -> pseudo-label shards"),
    Stage("student", "slade_dist.train.student:run", _upto("mining"), True,
          ("data.train_shards", "data.unlabeled_shards"),
          "labels + pseudo labels, feature basis, high-confidence pair mining"),
    Stage("eval", "slade_dist.eval.stage:run", _upto("eval"), False, (),
          "Recall@K, P@1, R-Precision, MAP@R, NMI of the final model on the test split"),
]}


class RunLayout:
    """Where every artefact of a run lives.

    <run>/config.yaml                      resolved config of the last invocation
    <run>/pretrain/  <run>/teacher/        final.pt (plain state dict), ckpt/, DONE.json
    <run>/round<r>/embed/                  emb-%06d.npy + emb-%06d.keys per unlabeled shard
    <run>/round<r>/cluster/                pl-%06d.npz, centroids.npy, stats.json, meta.json
    <run>/round<r>/student/                like teacher/
    <run>/eval/metrics.json                final metrics
    <run>/tb/<stage>                       TensorBoard events (round stages: tb/round<r>-<stage>)
    """

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.root = Path(run_dir)

    def stage_dir(self, stage: str, round_: int | None = None) -> Path:
        if STAGES[stage].per_round:
            if round_ is None:
                raise ValueError(f"stage {stage} is per round: pass round_")
            return self.root / f"round{round_}" / stage
        return self.root / stage

    def tb_dir(self, stage: str, round_: int | None = None) -> Path:
        name = f"round{round_}-{stage}" if STAGES[stage].per_round else stage
        return self.root / "tb" / name

    def done_file(self, stage: str, round_: int | None = None) -> Path:
        return self.stage_dir(stage, round_) / "DONE.json"

    def teacher_weights(self, round_: int) -> Path:
        """The model that embeds the unlabeled set in round r: the teacher, then each student."""
        if round_ <= 1:
            return self.stage_dir("teacher") / "final.pt"
        return self.stage_dir("student", round_ - 1) / "final.pt"

    def final_weights(self, rounds: int) -> Path:
        """The model eval measures: the last student that exists, else the teacher."""
        for r in range(rounds, 0, -1):
            p = self.stage_dir("student", r) / "final.pt"
            if p.exists():
                return p
        return self.stage_dir("teacher") / "final.pt"


def stage_hash(cfg: Config, stage: str) -> str:
    st = STAGES[stage]
    sections = [s for s in st.sections if s != "run_seed"]
    extra: dict[str, Any] = {"stage": stage, "seed": cfg.run.seed}
    if st.per_round:
        extra["round"] = cfg.run.round
    if stage == "eval":
        extra["rounds"] = cfg.run.rounds
    return cfg.section_hash(sections, extra)


def read_done(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_done(cfg: Config, stage: str) -> bool:
    layout = RunLayout(cfg.run.dir)
    marker = read_done(layout.done_file(stage, cfg.run.round))
    return bool(marker) and marker.get("config_hash") == stage_hash(cfg, stage)


def write_done(cfg: Config, stage: str, result: dict[str, Any], seconds: float) -> Path:
    layout = RunLayout(cfg.run.dir)
    body = {"stage": stage, "round": cfg.run.round if STAGES[stage].per_round else None,
            "config_hash": stage_hash(cfg, stage), "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "world_size": dist.world_size(),
            "result": result}
    return atomic_write_json(layout.done_file(stage, cfg.run.round), body, indent=2)


class StageNotAvailable(RuntimeError):
    pass


def run_stage(cfg: Config, stage: str, force: bool = False) -> dict[str, Any] | None:
    """Run one stage in this process (all ranks call it). Returns its result, None when skipped.

    Call dist.init_distributed() first for multi-process runs. Rank 0 writes config + DONE.json.
    """
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    st = STAGES[stage]
    log = dist.get_logger()
    if not force and is_done(cfg, stage):
        log.info(f"[{stage}] DONE marker matches config hash {stage_hash(cfg, stage)}: skipped "
                 f"(use --force to rerun)")
        return None
    try:
        fn = st.load()
    except (ImportError, AttributeError) as e:
        raise StageNotAvailable(f"stage {stage!r} is not implemented yet ({e})") from e
    cfg.require_inputs(*st.requires)
    layout = RunLayout(cfg.run.dir)
    out_dir = layout.stage_dir(stage, cfg.run.round)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(layout.root / "config.yaml")
        cfg.save(out_dir / "config.yaml")
    dist.barrier()
    t0 = time.time()
    log.info(f"[{stage}{f' round {cfg.run.round}' if st.per_round else ''}] start -> {out_dir}")
    result = fn(cfg, layout.root) or {}
    dist.barrier()
    if dist.is_main():
        write_done(cfg, stage, result, time.time() - t0)
    log.info(f"[{stage}] done in {time.time() - t0:.1f}s")
    return result


def pipeline_plan(rounds: int) -> list[tuple[str, int]]:
    """The whole chain: pretrain -> teacher -> R x (embed -> cluster -> student) -> eval."""
    plan = [("pretrain", 1), ("teacher", 1)]
    for r in range(1, rounds + 1):
        plan += [("embed", r), ("cluster", r), ("student", r)]
    plan.append(("eval", 1))
    return plan
