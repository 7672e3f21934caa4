"""Stage registry, run-directory layout, the identity of a stage's work and its DONE markers.

Owns: which stages exist and where each reads/writes (`RunLayout`), the identity of a stage's
work (`stage_id`: the hash of the config sections it depends on and the content ids of what it
reads: shard dirs, model files, upstream stages' ids), `DONE.json` (a stage whose marker matches
both is done; a changed config or input makes it, and so everything downstream, run again) and
the chain plan. A stage is a plain function `run(cfg, run_dir) -> dict` (counts/timings for
DONE.json) in its own module, named here by "module:function" and imported only when it runs, so
the launcher plans and checks a chain without importing torch. Trainer stages also take
`evaluate`, the periodic evaluator their entry names (handed in, so train/ never imports eval/).
Running stages is runner.py. Tests: tests/unit/test_stages.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .fileio import atomic_write_json
from .provenance import MISSING, combine, file_id, shard_dir_id

# The sections a stage's result depends on are cumulative along the chain: changing the teacher's
# loss invalidates everything downstream, changing eval.* reruns only eval.
_CHAIN_SECTIONS = [
    "run_seed",
    "data",
    "model",
    "pretrain",
    "train",
    "loss",
    "pseudo",
    "curate",
    "student",
    "basis",
    "mining",
    "eval",
]


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"
    sections: tuple[str, ...]  # config sections its result depends on
    per_round: bool  # lives under round<r>/ and depends on run.round
    requires: tuple[str, ...]  # config keys that must name existing inputs
    help: str
    evaluator: str = ""  # "module:function" building the periodic evaluator (trainers)

    def load(self) -> Callable[..., dict[str, Any]]:
        return _load_target(self.target)

    def kwargs(self, cfg: Config) -> dict[str, Any]:
        """Extra arguments of this stage's function (the periodic evaluator of a trainer)."""
        return {"evaluate": _load_target(self.evaluator)(cfg)} if self.evaluator else {}

    def available(self) -> bool:
        try:
            self.load()
            return True
        except (ImportError, AttributeError):
            return False


def _load_target(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _upto(last: str) -> tuple[str, ...]:
    return tuple(_CHAIN_SECTIONS[: _CHAIN_SECTIONS.index(last) + 1])


_PERIODIC_EVAL = "slade_dist.eval.stage:periodic_evaluator"

STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "pretrain",
            "slade_dist.train.pretrain:run",
            _upto("pretrain"),
            False,
            ("data.train_shards", "data.unlabeled_shards"),
            "SwAV self-supervised training on labeled + unlabeled images (labels ignored)",
        ),
        Stage(
            "teacher",
            "slade_dist.train.teacher:run",
            _upto("loss"),
            False,
            ("data.train_shards",),
            "ranking loss (MS / contrastive) on labeled P x K batches",
            _PERIODIC_EVAL,
        ),
        Stage(
            "embed",
            "slade_dist.pseudo.embed:run",
            _upto("pseudo"),
            True,
            ("data.unlabeled_shards",),
            "teacher embeddings of every unlabeled image, one file pair per shard",
        ),
        Stage(
            "cluster",
            "slade_dist.pseudo.cluster:run",
            _upto("curate"),
            True,
            ("data.unlabeled_shards",),
            "distributed k-means on the embeddings -> pseudo-label shards",
        ),
        Stage(
            "student",
            "slade_dist.train.student:run",
            _upto("mining"),
            True,
            ("data.train_shards", "data.unlabeled_shards"),
            "labels + pseudo labels, feature basis, high-confidence pair mining",
            _PERIODIC_EVAL,
        ),
        Stage(
            "eval",
            "slade_dist.eval.stage:run",
            _upto("eval"),
            False,
            (),
            "Recall@K, P@1, R-Precision, MAP@R, NMI of the final model on the test split",
        ),
        # listed last; it runs first in the chain when curate.enabled (pipeline_plan)
        Stage(
            "curate",
            "slade_dist.pseudo.curate:run",
            ("run_seed", "data", "curate"),
            False,
            ("data.unlabeled_shards",),
            "the unlabeled pool checked once (curate.enabled): copies of test images out, near-duplicate "
            "groups down to one image",
        ),
    ]
}


class RunLayout:
    """Where every artefact of a run lives.

    <run>/config.yaml                      resolved config of the last invocation
    <run>/curate/                          cur-%06d.npz per unlabeled shard, curate.json, calibration.json
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


def data_keys(cfg: Config, stage: str) -> tuple[str, ...]:
    """The config keys naming the shard dirs `stage` reads."""
    if stage == "eval":
        return (
            ("data.query_shards", "data.gallery_shards")
            if cfg.eval.protocol == "query_gallery"
            else ("data.test_shards",)
        )
    if stage == "curate":  # every test set named is checked against (none: data.test_shards is missing)
        named = tuple(f"data.{n}_shards" for n in ("test", "query", "gallery") if cfg.get(f"data.{n}_shards"))
        return ("data.unlabeled_shards", *(named or ("data.test_shards",)))
    return STAGES[stage].requires


def _upstream_id(layout: RunLayout, stage: str, round_: int) -> str:
    marker = read_done(layout.done_file(stage, round_))
    return str(marker.get("stage_id", MISSING)) if marker else MISSING


def stage_inputs(cfg: Config, stage: str) -> dict[str, str]:
    """Content ids of everything `stage` reads: shard dirs, model files, upstream stage outputs.

    A stage reruns when one changes (and so does everything downstream, whose inputs then change).
    """
    layout = RunLayout(cfg.run.dir)
    r = cfg.run.round
    ids = {key: shard_dir_id(cfg.get(key)) for key in data_keys(cfg, stage)}
    pretrained = layout.stage_dir("pretrain") / "final.pt"
    if stage == "pretrain":
        ids["model.pretrained_path"] = file_id(cfg.model.pretrained_path)
    elif stage == "teacher":
        ids["init"] = file_id(pretrained) if pretrained.exists() else file_id(cfg.model.pretrained_path)
    elif stage == "embed":
        ids["teacher"] = file_id(layout.teacher_weights(r))
    elif stage == "cluster":
        ids["embed"] = _upstream_id(layout, "embed", r)
        if cfg.curate.enabled:
            ids["curate"] = _upstream_id(layout, "curate", r)
    elif stage == "student":
        ids["cluster"] = _upstream_id(layout, "cluster", r)
        ids["init"] = file_id(layout.teacher_weights(r) if cfg.student.init == "teacher" else pretrained)
    elif stage == "eval":
        models = [layout.stage_dir("teacher") / "final.pt"]
        models += [layout.stage_dir("student", i) / "final.pt" for i in range(1, cfg.run.rounds + 1)]
        ids.update({f"model:{p.relative_to(layout.root)}": file_id(p) for p in models})
    return ids


def stage_id(cfg: Config, stage: str, inputs: dict[str, str] | None = None) -> str:
    """The identity of a stage's work: its config hash and the ids of its inputs. Trainer
    checkpoints carry it; a checkpoint of another id is never resumed."""
    inputs = stage_inputs(cfg, stage) if inputs is None else inputs
    return combine(stage_hash(cfg, stage), *(f"{k}={v}" for k, v in sorted(inputs.items())))


def read_done(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def why_not_done(cfg: Config, stage: str) -> str | None:
    """None when the stage's DONE.json matches its config and inputs, else the reason it must run."""
    marker = read_done(RunLayout(cfg.run.dir).done_file(stage, cfg.run.round))
    if not marker:
        return "no DONE.json"
    if marker.get("config_hash") != stage_hash(cfg, stage):
        return f"config changed (hash {marker.get('config_hash')} -> {stage_hash(cfg, stage)})"
    now, then = stage_inputs(cfg, stage), marker.get("inputs", {})
    changed = sorted(k for k in now if then.get(k) != now[k])
    return f"inputs changed: {', '.join(changed)}" if changed else None


def is_done(cfg: Config, stage: str) -> bool:
    return why_not_done(cfg, stage) is None


def write_done(
    cfg: Config,
    stage: str,
    result: dict[str, Any],
    seconds: float,
    inputs: dict[str, str] | None = None,
    world_size: int = 1,
) -> Path:
    layout = RunLayout(cfg.run.dir)
    inputs = stage_inputs(cfg, stage) if inputs is None else inputs
    body = {
        "stage": stage,
        "round": cfg.run.round if STAGES[stage].per_round else None,
        "config_hash": stage_hash(cfg, stage),
        "inputs": inputs,
        "stage_id": stage_id(cfg, stage, inputs),
        "seconds": round(seconds, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "world_size": world_size,
        "result": result,
    }
    return atomic_write_json(layout.done_file(stage, cfg.run.round), body, indent=2)


def with_round(cfg: Config, round_: int) -> Config:
    """A copy of cfg for round `round_` of the chain."""
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, round=round_))


def pipeline_plan(rounds: int, curate: bool = False) -> list[tuple[str, int]]:
    """The whole chain: [curate ->] pretrain -> teacher -> R x (embed -> cluster -> student) -> eval
    (curate: cfg.curate.enabled)."""
    plan = [("curate", 1)] if curate else []
    plan += [("pretrain", 1), ("teacher", 1)]
    for r in range(1, rounds + 1):
        plan += [("embed", r), ("cluster", r), ("student", r)]
    plan.append(("eval", 1))
    return plan
