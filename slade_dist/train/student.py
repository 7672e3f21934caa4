"""Student stage of round r: labels + pseudo labels + feature basis W_a + pair mining.

Owns `run(cfg, run_dir)`, `StudentObjective` (the loss of one optimizer step over every
micro-batch of every rank, with the student.ablation variants of the paper's Table 4) and
`TruthPrecision`. The objective, the basis warm-up and the ablations: docs/METHOD.md, stage 4 and
"What the paper reports". Each step also logs how the two Eq. 7 readings differ (mining/*) and,
where the unlabeled samples carry a hidden class, the precision of the pairs it trains on
(truth/*). W_a and its Gaussians live in the engine's module (checkpointed with it) and are
exported in final.pt's `extra`.
Tests: tests/unit/test_student.py, tests/integration/test_train_multirank.py,
tests/integration/test_resume.py, tests/integration/test_world_invariance.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import dist
from ..basis import FeatureBasis, PairBlock, global_counts
from ..config import Config
from ..data.readers import labeled_batches, pseudo_labeled_batches
from ..data.shards import read_classes
from ..losses import build_loss
from ..stages import RunLayout, stage_id
from ..tb import TBWriter
from .batch_split import rank_share
from .common import (
    Evaluate,
    check_trunk_bn,
    embedder_groups,
    eval_every,
    export_final,
    fit_summary,
    init_embedder,
    open_tb,
    pretrain_init_path,
    stream_seed,
)
from .engine import ParamGroup, Trainer
from .loop import Micro, SkipDelta, StepObjective, fit, timed_next


class StudentNet(nn.Module):
    """The engine's module: the embedder plus (unless ablated) the feature basis."""

    def __init__(self, embedder: nn.Module, basis: nn.Module | None):
        super().__init__()
        self.embedder = embedder
        self.basis = basis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedder(x)


def student_init_path(cfg: Config, run_dir: Path) -> Path | None:
    r = cfg.run.round
    if cfg.student.init == "teacher":
        p = RunLayout(run_dir).teacher_weights(r)
        if not p.exists():
            raise FileNotFoundError(
                f"student round {r} starts from {p}, which does not exist: run the "
                f"{'teacher' if r <= 1 else f'round {r - 1} student'} stage first "
                f"(or set student.init=pretrain)"
            )
        return p
    return pretrain_init_path(run_dir)


def build_student(cfg: Config, run_dir: Path) -> tuple[StudentNet, Path | None, int]:
    init = student_init_path(cfg, run_dir)
    embedder = init_embedder(cfg.model, init)
    num_classes = len(read_classes(cfg.data.train_shards))
    basis = None
    if cfg.student.ablation != "no_basis":
        b = cfg.basis
        basis = FeatureBasis(num_classes, embedder.embed_dim, b.scale, b.beta, b.margin, b.lambda_sd, b.sd_grad)
    return StudentNet(embedder, basis), init, num_classes


def param_groups(net: StudentNet, cfg: Config) -> list[ParamGroup]:
    warm = cfg.student.basis_warmup_steps if net.basis is not None else 0
    tcfg = dataclasses.replace(cfg.train, lr=cfg.train.lr * cfg.student.lr_mult)
    groups = embedder_groups(net.embedder, tcfg, start=warm)
    if net.basis is not None:
        # W_a has no weight decay: its rows are normalised in L_CE, decay would only shrink them
        groups.append(
            ParamGroup(
                "basis",
                [p for p in net.basis.parameters() if p.requires_grad],
                tcfg.lr * tcfg.basis_lr_mult,
                0,
                weight_decay=0.0,
            )
        )
    return groups


def run(cfg: Config, run_dir: Path, evaluate: Evaluate | None = None) -> dict[str, Any]:
    """Train round cfg.run.round's student; `evaluate` (from the stage runner) runs every
    train.eval_every steps on the embedder."""
    run_dir = Path(run_dir)
    r = cfg.run.round
    layout = RunLayout(run_dir)
    stage_dir = layout.stage_dir("student", r)
    pseudo_dir = layout.stage_dir("cluster", r)
    if not pseudo_dir.is_dir():
        raise FileNotFoundError(f"pseudo labels {pseudo_dir} are missing: run the round {r} cluster stage first")
    torch.manual_seed(cfg.run.seed)  # identical initial weights (heads, W_a) on every rank
    net, init, num_classes = build_student(cfg, run_dir)
    check_trunk_bn(net.embedder, cfg)
    # both P are the whole optimizer step's: this rank draws its share per micro-batch
    accum = cfg.train.grad_accum
    P = rank_share(cfg.train.classes_per_batch, "train.classes_per_batch", accum)
    Pu = rank_share(cfg.student.unlabeled_classes_per_batch, "student.unlabeled_classes_per_batch", accum)
    K, Ku = cfg.train.samples_per_class, cfg.student.unlabeled_samples_per_class
    trainer = Trainer(
        net,
        param_groups(net, cfg),
        cfg.train,
        stage_dir=stage_dir,
        total_steps=cfg.train.student_steps,
        micro_batch=P * K + Pu * Ku,
        stage_id=stage_id(cfg, "student"),
        sync_bn=cfg.model.sync_bn,
    )
    seeds = {
        "labeled_stream_seed": stream_seed(cfg.run.seed, trainer.step, salt=r),
        "pseudo_stream_seed": stream_seed(cfg.run.seed, trainer.step, salt=1000 + r),
    }
    lab_stream = labeled_batches(cfg.data.train_shards, cfg.data, P, K, seed=seeds["labeled_stream_seed"])
    unl_stream = pseudo_labeled_batches(  # one seed on every rank: the ranks share each step's draw
        cfg.data.unlabeled_shards, pseudo_dir, cfg.data, Pu, Ku, seed=seeds["pseudo_stream_seed"], accum=accum
    )
    tb = open_tb(cfg, run_dir, "student", r, trainer.step)
    objective = StudentObjective(cfg, trainer, build_loss(cfg.loss), lab_stream, unl_stream, tb=tb)
    resumed = dict(trainer.resume_info)
    if resumed and trainer.module.basis is not None:  # the Gaussians as restored from the checkpoint
        resumed["basis"] = {
            k: float(v)
            for k, v in trainer.module.basis.stats().items()
            if k in ("mu_pos", "mu_neg", "var_pos", "var_neg")
        }
    result = fit(
        trainer,
        objective,
        tb=tb,
        state_fn=lambda: {"stream_seeds": seeds},
        eval_fn=eval_every(evaluate, lambda: trainer.module.embedder),
        desc=f"student r{r}",
    )
    tb.close()
    module: StudentNet = trainer.module  # type: ignore[assignment]
    basis_stats = module.basis.stats() if module.basis is not None else {}
    extra: dict[str, Any] = {
        "stage": "student",
        "round": r,
        "step": trainer.step,
        "ablation": cfg.student.ablation,
        "init": str(init) if init else "",
    }
    if module.basis is not None:
        extra["basis_state_dict"] = {k: v.detach().cpu() for k, v in module.basis.state_dict().items()}
        extra["basis_num_classes"] = num_classes
    export_final(stage_dir, module.embedder, cfg.model, extra)
    return {
        **fit_summary(result, resumed),
        "round": r,
        "ablation": cfg.student.ablation,
        "init": str(init) if init else "",
        "num_classes": num_classes,
        "basis": {k: float(v) for k, v in basis_stats.items() if isinstance(v, (int, float))},
        "truth_precision": objective.truth.summary(),
    }


class StudentObjective(StepObjective):
    """The student objective of one optimizer step, over every micro-batch of every rank."""

    def __init__(
        self,
        cfg: Config,
        trainer: Trainer,
        rank_loss: Any,
        lab_stream: Any,
        unl_stream: Any,
        tb: TBWriter | None = None,
    ):
        self.cfg = cfg
        self.tb = tb or TBWriter(None)  # the first batches' images go to TensorBoard
        self.trainer = trainer
        self.rank_loss = rank_loss
        self.lab_stream = lab_stream
        self.unl_stream = unl_stream
        self.ablation = cfg.student.ablation
        self.mining = cfg.mining.enabled and self.ablation == "full"
        self.skip = SkipDelta()
        self._reseeded = False  # the Gaussians were reset when the warm-up ended (once per process)
        self.truth = TruthPrecision()

    @property
    def net(self) -> StudentNet:
        return self.trainer.module  # type: ignore[return-value]

    def warmup(self, step: int) -> bool:
        """W_a alone trains: the embedder gets no gradient (its lr is 0 too)."""
        return self.net.basis is not None and step < self.cfg.student.basis_warmup_steps

    def trunk_trains(self, step: int) -> bool:
        return not self.warmup(step)

    def draw(self, step: int) -> Micro:
        cfg = self.cfg
        lab, wait_l = timed_next(self.lab_stream)
        unl, wait_u = timed_next(self.unl_stream)
        self.tb.images("batch/labeled", lab["images"], step, nrow=cfg.train.samples_per_class, once=True)
        self.tb.images(
            "batch/pseudo_labeled", unl["images"], step, nrow=cfg.student.unlabeled_samples_per_class, once=True
        )
        dev = self.trainer.device
        x = torch.cat([lab["images"], unl["images"]]).to(dev, non_blocking=True)
        data = {
            "labels": lab["labels"].to(dev, non_blocking=True),
            "pseudo": unl["labels"].to(dev, non_blocking=True),
            "n_labeled": int(lab["images"].shape[0]),
        }
        if "true_labels" in unl:  # the hidden classes, where the unlabeled json has them: measured only
            data["truth"] = unl["true_labels"].to(dev, non_blocking=True)
        skipped = self.skip("labeled", lab.get("skipped", 0)) + self.skip("pseudo", unl.get("skipped", 0))
        return Micro(x=x, data=data, images=int(x.shape[0]), skipped=skipped, wait_s=wait_l + wait_u)

    def loss(self, step: int, outs: list[torch.Tensor], micros: list[Micro]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, net = self.cfg, self.net
        emb_l = torch.cat([o[: m.data["n_labeled"]] for o, m in zip(outs, micros)]).float()
        emb_u = torch.cat([o[m.data["n_labeled"] :] for o, m in zip(outs, micros)]).float()
        y = torch.cat([m.data["labels"] for m in micros])
        pl = torch.cat([m.data["pseudo"] for m in micros])
        truth = torch.cat([m.data["truth"] for m in micros]) if "truth" in micros[0].data else None
        warmup = self.warmup(step)
        self._reseed_after_warmup(net, step)
        terms: dict[str, torch.Tensor] = {}
        scalars: dict[str, float] = {}
        if not warmup:
            terms["rank_labeled"] = self.rank_loss(emb_l, y)
        if net.basis is not None:
            terms.update(self._basis_terms(net.basis, emb_l, y, emb_u, pl, truth, warmup, scalars))
        if self.ablation in ("no_basis", "raw_pairs") and not warmup:
            terms["rank_unlabeled"] = cfg.student.lambda1 * self.rank_loss(emb_u, pl)
        scalars.update({f"loss/{k}": float(v.detach()) for k, v in terms.items()})
        return sum(terms.values()), scalars

    def _reseed_after_warmup(self, net: StudentNet, step: int) -> None:
        """Forget the Gaussians of the frozen warm-up embeddings at the first step after it (why:
        docs/METHOD.md, stage 4); a resume past that step keeps the checkpointed ones."""
        warm = self.cfg.student.basis_warmup_steps
        if net.basis is not None and warm > 0 and step == warm and not self._reseeded:
            net.basis.reset_gaussians()
            self._reseeded = True

    def _basis_terms(
        self,
        basis: FeatureBasis,
        emb_l: torch.Tensor,
        y: torch.Tensor,
        emb_u: torch.Tensor,
        pl: torch.Tensor,
        truth: torch.Tensor | None,
        warmup: bool,
        scalars: dict[str, float],
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        ce = basis.ce_loss(emb_l, y)
        block = basis.pair_block(emb_u, pl)
        sd, stats = basis.sd_loss(block)
        scalars.update({f"basis/{k}": float(v) for k, v in stats.items()})
        terms = {"ce": cfg.student.lambda2 * ce, "sd": cfg.student.lambda2 * sd}
        if not warmup:  # both Eq. 7 readings on this batch, whichever one (if any) trains
            scalars.update({f"mining/{k}": v for k, v in basis.mining_shares(block).items()})
            if truth is not None:
                scalars.update(self.truth.measure(basis, block, truth))
        if self.mining and not warmup:
            # Eq. 7's pairs of the global batch (this rank's anchors x all candidates, as the ranking
            # loss reads them), with thresholds that include this batch (sd_loss ran above)
            pos, neg = basis.mine_pairs(block, cfg.mining.require_cluster_agreement)
            scalars["mining/pos_pairs"] = float(basis.stats()["n_pos_mined"])
            scalars["mining/neg_pairs"] = float(basis.stats()["n_neg_mined"])
            terms["rank_mined"] = cfg.student.lambda1 * self.rank_loss(emb_u, pos_pairs=pos, neg_pairs=neg)
        return terms


class TruthPrecision:
    """How many of the pairs the student trains on are right, where the unlabeled samples carry a
    hidden class (the demo, the NABirds / CompCars converters, any json with a label): the
    precision, over the global batch's pairs whose two classes are known, of the pseudo-positive
    pairs (same cluster), and of both Eq. 7 readings' mined positives (same class) and negatives
    (different classes). Per step in TensorBoard (truth/*), summed over the run for DONE.json
    (`summary`). The hidden classes are never trained on. Collective (counts over ranks)."""

    SETS = ("pseudo_pos", "literal_pos", "literal_neg", "agreement_pos", "agreement_neg")

    def __init__(self) -> None:
        self.totals = {name: [0, 0] for name in self.SETS}  # (agreeing, known) over the run

    def measure(self, basis: FeatureBasis, block: PairBlock, truth: torch.Tensor) -> dict[str, float]:
        truth_all = dist.all_gather_cat(truth)
        known = (truth.view(-1, 1) >= 0) & (truth_all.view(1, -1) >= 0) & block.valid
        equal = truth.view(-1, 1) == truth_all.view(1, -1)
        pos, neg = basis.literal_masks(block)
        sets = {
            "pseudo_pos": block.same,
            "literal_pos": pos,
            "literal_neg": neg,
            "agreement_pos": pos & block.same,
            "agreement_neg": neg & ~block.same,
        }
        masks = []
        for name, m in sets.items():
            right = equal if name.endswith("pos") else ~equal
            masks += [m & known & right, m & known]
        counts = global_counts(*masks)
        out = {}
        for i, name in enumerate(self.SETS):
            agree, n = counts[2 * i], counts[2 * i + 1]
            self.totals[name][0] += agree
            self.totals[name][1] += n
            if n:
                out[f"truth/{name}_precision"] = agree / n
        return out

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """{set: {precision, pairs}} over every step measured in this process (empty without truth)."""
        return {
            name: {"precision": round(agree / n, 4) if n else None, "pairs": n}
            for name, (agree, n) in self.totals.items()
            if n
        }
