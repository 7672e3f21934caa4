"""Stage registry, run-directory layout, the identity of a stage's work and its DONE markers.

Owns: which stages exist, what each declares it reads (`Stage`) and where each reads/writes
(`RunLayout`), the identity of a stage's work (`stage_id`: the hash of the config keys it declares
and the content ids of the artefacts it declares: shard dirs, model files, upstream stages' ids),
`DONE.json` (a stage whose marker matches
both is done; a changed config or input makes it, and so everything downstream, run again) and
the chain plan. A stage is a plain function `run(cfg, run_dir) -> dict` (counts/timings for
DONE.json) in its own module, named here by "module:function" and imported only when it runs, so
the launcher plans and checks a chain without importing torch. Trainer stages also take
`evaluate`, the periodic evaluator their entry names (handed in, so train/ never imports eval/).
Running stages is runner.py. Tests: tests/unit/test_stages.py, tests/integration/test_stage_reads.py
(every key a stage reads is declared).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .fileio import atomic_write_json
from .provenance import MISSING, combine, describe_unvalidated, file_id, shard_dir_id, unvalidated_img2dataset

Resolve = Callable[[Config, "RunLayout"], dict[str, str]]  # an input artefact -> {name: content id}


@dataclass(frozen=True)
class Stage:
    """A stage and its declaration: what it reads (config keys, shard dirs, artefacts) is its identity.

    `reads` lists every config key its code reads, as "section" (all of it), "section.sub" or
    "section.key"; their values (less the result=False knobs) are its config hash, so a changed key
    reruns exactly the stages that read it. tests/integration/test_stage_reads.py records the keys
    each stage reads in a real run and fails on one that is not declared. `reports`: keys read only
    to report (the trainers' periodic eval), never hashed. `requires`: config keys naming the shard
    dirs it reads (they must exist; their content ids are inputs), or a function of the config for a
    stage whose shard dirs depend on it. `inputs`: the other artefacts it reads, each resolved to
    content ids (model files, the DONE.json ids of the stages whose outputs it reads)."""

    name: str
    target: str  # "module:function"
    reads: tuple[str, ...]
    per_round: bool  # lives under round<r>/ (and so reads run.round)
    requires: tuple[str, ...] | Callable[[Config], tuple[str, ...]]
    help: str
    evaluator: str = ""  # "module:function" building the periodic evaluator (trainers)
    inputs: tuple[Resolve, ...] = ()
    reports: tuple[str, ...] = ()
    switch: str = ""  # a boolean config key: the chain runs this stage only when it is true

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

    def shard_keys(self, cfg: Config) -> tuple[str, ...]:
        """The config keys naming the shard dirs this stage reads."""
        return self.requires(cfg) if callable(self.requires) else self.requires

    def declares(self, key: str) -> bool:
        """Whether `key` (a leaf "section.key") is in reads or reports (itself or a section above it)."""
        return any(key == d or key.startswith(d + ".") for d in (*self.reads, *self.reports))


def _load_target(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _weights(name: str, path: Callable[[Config, RunLayout], Any]) -> Resolve:
    return lambda cfg, layout: {name: file_id(path(cfg, layout))}


def _upstream(stage: str) -> Resolve:
    """The id in the DONE.json of the stage (same round) whose outputs are read."""

    def resolve(cfg: Config, layout: RunLayout) -> dict[str, str]:
        round_ = cfg.run.round if STAGES[stage].per_round else None  # a once-per-run stage has no round
        marker = read_done(layout.done_file(stage, round_))
        return {stage: str(marker.get("stage_id", MISSING)) if marker else MISSING}

    return resolve


def _curated(cfg: Config, layout: RunLayout) -> dict[str, str]:
    """The curate stage's id where the cluster stage reads its decisions (curate.enabled)."""
    return _upstream("curate")(cfg, layout) if cfg.curate.enabled else {}


def _curate_shards(cfg: Config) -> tuple[str, ...]:
    """The pool and every test set named (none named: data.test_shards, which then must exist)."""
    named = tuple(f"data.{n}_shards" for n in ("test", "query", "gallery") if cfg.get(f"data.{n}_shards"))
    return ("data.unlabeled_shards", *(named or ("data.test_shards",)))


def _teacher_init(cfg: Config, layout: RunLayout) -> Path | str:
    pretrained = layout.stage_dir("pretrain") / "final.pt"
    return pretrained if pretrained.exists() else cfg.model.pretrained_path


def _student_init(cfg: Config, layout: RunLayout) -> Path:
    if cfg.student.init == "teacher":
        return layout.teacher_weights(cfg.run.round)
    return layout.stage_dir("pretrain") / "final.pt"


def _eval_models(cfg: Config, layout: RunLayout) -> dict[str, str]:
    models = [layout.stage_dir("teacher") / "final.pt"]
    models += [layout.stage_dir("student", i) / "final.pt" for i in range(1, cfg.run.rounds + 1)]
    return {f"model:{p.relative_to(layout.root)}": file_id(p) for p in models}


def _eval_shards(cfg: Config) -> tuple[str, ...]:
    if cfg.eval.protocol == "query_gallery":
        return ("data.query_shards", "data.gallery_shards")
    return ("data.test_shards",)


# the decoder contract and loader buffers of every stage that decodes images (data/transforms.py,
# data/loading.py): the header limits decide which images are skipped, so they are part of a result
_LIMITS = ("data.max_image_pixels", "data.max_aspect_ratio")
_DECODE = (*_LIMITS, "data.decode", "data.buffer_mb")
_PERIODIC_EVAL = "slade_dist.eval.stage:periodic_evaluator"
# what eval.stage.periodic_evaluator reads: it only reports (TensorBoard), the weights never see it
_PERIODIC_EVAL_READS = ("data.test_shards", "data.resize_size", "eval", *_DECODE)
# the optimisation knobs every trainer reads (train/engine.py, train/loop.py)
_OPTIM = tuple(
    f"train.{k}"
    for k in "optimizer momentum weight_decay warmup_steps grad_clip grad_accum precision zero_stage "
    "ckpt_every log_every".split()
)
# the labeled P x K stream of the teacher and the student (data/readers.py)
_PK_DATA = (
    *_DECODE,
    "data.train_shards",
    "data.augment",
    "data.crop_scale_min",
    "data.image_size",
    "data.max_buffered",
)
_PK_DATA += ("data.num_workers", "data.shuffle_buffer", "train.classes_per_batch", "train.samples_per_class")
_RANKING = ("run.dir", "run.seed", "model", "loss", "train.lr", "train.backbone_lr_mult", "train.eval_every")

STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "curate",
            "slade_dist.pseudo.curate:run",
            ("run.dir", "run.seed", "data", "curate"),
            False,
            _curate_shards,
            "the unlabeled pool checked once (curate.enabled): copies of test images out, near-duplicate "
            "groups down to one image",
            switch="curate.enabled",
        ),
        Stage(
            "pretrain",
            "slade_dist.train.pretrain:run",
            ("run.dir", "run.seed", "model", "pretrain", *_OPTIM, "eval.batch_size", "data.train_shards")
            + ("data.unlabeled_shards", "data.augment", "data.crop_scale_min", "data.image_size", "data.resize_size")
            + ("data.num_workers", "data.shuffle_buffer", *_DECODE, "curate.enabled"),
            False,
            ("data.train_shards", "data.unlabeled_shards"),
            "SwAV self-supervised training on labeled + unlabeled images (labels ignored; the pool's copies of "
            "test images left out when curate.enabled)",
            inputs=(_weights("model.pretrained_path", lambda cfg, _: cfg.model.pretrained_path), _curated),
        ),
        Stage(
            "teacher",
            "slade_dist.train.teacher:run",
            (*_RANKING, *_OPTIM, *_PK_DATA, "train.teacher_steps"),
            False,
            ("data.train_shards",),
            "ranking loss (MS / contrastive) on labeled P x K batches",
            _PERIODIC_EVAL,
            inputs=(_weights("init", _teacher_init),),
            reports=_PERIODIC_EVAL_READS,
        ),
        Stage(
            "embed",
            "slade_dist.pseudo.embed:run",
            ("run.dir", "run.seed", "run.round", "data.image_size", "data.resize_size", "data.num_workers")
            + ("data.unlabeled_shards", "model", "pseudo.embed_batch_size", *_DECODE),
            True,
            ("data.unlabeled_shards",),
            "teacher embeddings of every unlabeled image, one file pair per shard",
            inputs=(_weights("teacher", lambda cfg, layout: layout.teacher_weights(cfg.run.round)),),
        ),
        Stage(
            "cluster",
            "slade_dist.pseudo.cluster:run",
            ("run.dir", "run.seed", "run.round", "data.num_workers", "data.unlabeled_shards", "pseudo")
            + ("data.pseudo_max_dist_percentile", "data.pseudo_min_cluster_size", *_LIMITS, "curate"),
            True,
            ("data.unlabeled_shards",),
            "distributed k-means on the embeddings -> pseudo-label shards",
            inputs=(_upstream("embed"), _curated),
        ),
        Stage(
            "student",
            "slade_dist.train.student:run",
            (*_RANKING, *_OPTIM, *_PK_DATA, "run.round", "data.unlabeled_shards", "data.pseudo_max_dist_percentile")
            + ("data.pseudo_min_cluster_size", "train.student_steps", "train.basis_lr_mult", "student", "basis")
            + ("mining",),
            True,
            ("data.train_shards", "data.unlabeled_shards"),
            "labels + pseudo labels, feature basis, high-confidence pair mining",
            _PERIODIC_EVAL,
            inputs=(_upstream("cluster"), _weights("init", _student_init)),
            reports=_PERIODIC_EVAL_READS,
        ),
        Stage(
            "eval",
            "slade_dist.eval.stage:run",
            ("run.dir", "run.seed", "run.rounds", "data.image_size", "data.resize_size", "data.num_workers")
            + ("data.test_shards", "data.query_shards", "data.gallery_shards", "model", "eval", *_DECODE),
            False,
            _eval_shards,
            "Recall@K, P@1, R-Precision, MAP@R, NMI of the final model on the test split",
            inputs=(_eval_models,),
            reports=("curate.enabled",),  # the curation line (or the warning that the pool was not checked)
        ),
    ]
}


class RunLayout:
    """Where every artefact of a run lives: the map is docs/ARCHITECTURE.md "Run directory" (tested
    against a real run's files by tests/integration/test_stage_reads.py)."""

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
    """The hash of the config keys the stage declares it reads (result=False knobs left out)."""
    return cfg.section_hash(STAGES[stage].reads, {"stage": stage})


def data_keys(cfg: Config, stage: str) -> tuple[str, ...]:
    """The config keys naming the shard dirs `stage` reads."""
    return STAGES[stage].shard_keys(cfg)


def stage_inputs(cfg: Config, stage: str) -> dict[str, str]:
    """Content ids of everything `stage` declares it reads: shard dirs, model files, upstream
    stage outputs. A stage reruns when one changes (and so does everything downstream, whose
    inputs then change)."""
    layout = RunLayout(cfg.run.dir)
    ids = {key: shard_dir_id(cfg.get(key)) for key in data_keys(cfg, stage)}
    for resolve in STAGES[stage].inputs:
        ids.update(resolve(cfg, layout))
    return ids


def unvalidated_shards(cfg: Config, names: Sequence[str]) -> str | None:
    """The refusal when a shard dir the named stages read is raw img2dataset output nobody validated."""
    for key in dict.fromkeys(k for n in names if n in STAGES for k in STAGES[n].shard_keys(cfg)):
        value = cfg.get(key)
        command_line = unvalidated_img2dataset(value) if value else None
        if command_line:
            return describe_unvalidated(key, value, command_line)
    return None


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


def pipeline_plan(rounds: int, switched_on: Sequence[str] = ()) -> list[tuple[str, int]]:
    """The whole chain in registry order, every per-round stage once per round, where the first of
    them stands: [curate ->] pretrain -> teacher -> R x (embed -> cluster -> student) -> eval. A stage
    with a `switch` runs only when its key is in `switched_on` (chain_switches(cfg))."""
    names = [n for n in STAGES if not STAGES[n].switch or STAGES[n].switch in switched_on]
    first = next((i for i, n in enumerate(names) if STAGES[n].per_round), len(names))
    per_round = [n for n in names if STAGES[n].per_round]
    plan = [(n, 1) for n in names[:first]] + [(n, r) for r in range(1, rounds + 1) for n in per_round]
    return plan + [(n, 1) for n in names[first:] if not STAGES[n].per_round]


def chain_switches(cfg: Config) -> tuple[str, ...]:
    """The stage switches the config turns on (e.g. curate.enabled)."""
    return tuple(s.switch for s in STAGES.values() if s.switch and cfg.get(s.switch))


def chain_reads(cfg: Config) -> tuple[str, ...]:
    """Every config key the chain's stages declare they read, in registry order (the hparams that
    eval's TensorBoard run is compared by: tb.config_hparams)."""
    on = {name for name, _ in pipeline_plan(1, chain_switches(cfg))}
    return tuple(dict.fromkeys(k for name, s in STAGES.items() if name in on for k in s.reads))
