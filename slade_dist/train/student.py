"""Student stage of round r: labels + pseudo labels + feature basis W_a + pair mining.

Owns `run(cfg, run_dir)`. Each optimizer step draws a labeled P x K batch and a pseudo-labeled
P x K batch (pseudo labels of RunLayout.stage_dir("cluster", r)); both go through the embedder in
one forward. For the first student.basis_warmup_steps only W_a trains (embeddings computed without
grad; the embedder's lr groups start after the warm-up), then
    L = L_rank(labeled) + lambda1 * L_rank(mined unlabeled pairs) + lambda2 * (L_CE + L_SD).
Ablations (student.ablation, the paper's Table 4):
    full       the objective above
    no_mining  no unlabeled ranking term: L_rank(labeled) + lambda2 * (L_CE + L_SD)
    no_basis   no W_a: L_rank(labeled) + lambda1 * L_rank(unlabeled, pseudo labels as classes)
    raw_pairs  pseudo-label pairs used directly in L_rank, plus the basis losses
When the warm-up ends the running Gaussians are reset, so the first batch of the moving embedder
seeds them (not the frozen warm-up embeddings). L_SD's gradient follows basis.sd_grad (basis.py).
Under loss.cross_rank the mined term is the global batch's: pairs mined on every rank's
embeddings (`mined_loss`). Every step after the warm-up logs how the two Eq. 7 readings differ on
that batch (mining/literal_*, mining/agreement_*: FeatureBasis.mining_shares), whichever trains.
W_a and its running Gaussians live in the engine's module (buffers are checkpointed with it) and
are exported in final.pt's `extra`.
Tests: tests/unit/test_student.py (terms of each ablation, warm-up), tests/integration/test_train_multirank.py,
tests/integration/test_resume.py, tests/integration/test_global_batch.py (the mined term on 2 ranks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import dist
from ..basis import FeatureBasis
from ..config import Config
from ..data.readers import labeled_batches, pseudo_labeled_batches
from ..data.shards import read_classes
from ..losses import gather_live, global_pair_loss
from ..models import save_weights
from ..stages import RunLayout, stage_id
from ..tb import TBWriter
from .batch_split import rank_share
from .common import (
    Evaluate,
    embedder_groups,
    eval_every,
    fit_summary,
    init_embedder,
    open_tb,
    pretrain_init_path,
    ranking_loss_fn,
    stream_seed,
)
from .engine import ParamGroup, Trainer
from .loop import MicroResult, SkipDelta, fit, timed_next


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
    groups = embedder_groups(net.embedder, cfg.train, start=warm)
    if net.basis is not None:
        # W_a has no weight decay: its rows are normalised in L_CE, decay would only shrink them
        groups.append(
            ParamGroup(
                "basis",
                [p for p in net.basis.parameters() if p.requires_grad],
                cfg.train.lr * cfg.train.basis_lr_mult,
                0,
                weight_decay=0.0,
            )
        )
    return groups


def _pairs_count(pairs: Any) -> int:
    """Number of pairs in a (2, n) index tensor (None -> 0)."""
    if pairs is None:
        return 0
    return int(pairs.shape[-1]) if pairs.dim() == 2 else int(pairs.numel())


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
    # both P are the whole optimizer step's: this rank draws its share per micro-batch
    accum, cross = cfg.train.grad_accum, cfg.loss.cross_rank
    P = rank_share(cfg.train.classes_per_batch, "train.classes_per_batch", accum, cross_rank=cross)
    Pu = rank_share(
        cfg.student.unlabeled_classes_per_batch, "student.unlabeled_classes_per_batch", accum, cross_rank=cross
    )
    K, Ku = cfg.train.samples_per_class, cfg.student.unlabeled_samples_per_class
    trainer = Trainer(
        net,
        param_groups(net, cfg),
        cfg.train,
        stage_dir=stage_dir,
        total_steps=cfg.train.student_steps,
        micro_batch=P * K + Pu * Ku,
        stage_id=stage_id(cfg, "student"),
    )
    seeds = {
        "labeled_stream_seed": stream_seed(cfg.run.seed, trainer.step, salt=r),
        "pseudo_stream_seed": stream_seed(cfg.run.seed, trainer.step, salt=1000 + r),
    }
    lab_stream = labeled_batches(
        cfg.data.train_shards,
        cfg.data,
        P,
        K,
        seed=seeds["labeled_stream_seed"],
        rank=dist.rank(),
        world=dist.world_size(),
        train=True,
    )
    unl_stream = pseudo_labeled_batches(
        cfg.data.unlabeled_shards,
        pseudo_dir,
        cfg.data,
        Pu,
        Ku,
        seed=seeds["pseudo_stream_seed"],
        rank=dist.rank(),
        world=dist.world_size(),
    )
    tb = open_tb(cfg, run_dir, "student", r, trainer.step)
    step_fn = StudentStep(cfg, trainer, ranking_loss_fn(cfg), lab_stream, unl_stream, tb=tb)
    resumed = dict(trainer.resume_info)
    if resumed and trainer.module.basis is not None:  # the Gaussians as restored from the checkpoint
        resumed["basis"] = {
            k: float(v)
            for k, v in trainer.module.basis.stats().items()
            if k in ("mu_pos", "mu_neg", "var_pos", "var_neg")
        }
    result = fit(
        trainer,
        step_fn,
        tb=tb,
        state_fn=lambda: {"stream_seeds": seeds},
        eval_fn=eval_every(evaluate, lambda: trainer.module.embedder),
        desc=f"student r{r}",
    )
    tb.close()
    module: StudentNet = trainer.module  # type: ignore[assignment]
    basis_stats = module.basis.stats() if module.basis is not None else {}
    if dist.is_main():
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
        save_weights(stage_dir / "final.pt", module.embedder, cfg.model, extra=extra)
    dist.barrier()
    return {
        **fit_summary(result, resumed),
        "round": r,
        "ablation": cfg.student.ablation,
        "init": str(init) if init else "",
        "num_classes": num_classes,
        "basis": {k: float(v) for k, v in basis_stats.items() if isinstance(v, (int, float))},
    }


class StudentStep:
    """One micro-batch of the student objective (callable for loop.fit)."""

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

    def __call__(self, step: int) -> MicroResult:
        cfg, tr = self.cfg, self.trainer
        net: StudentNet = tr.module  # type: ignore[assignment]
        lab, wait_l = timed_next(self.lab_stream)
        unl, wait_u = timed_next(self.unl_stream)
        self.tb.images("batch/labeled", lab["images"], step, nrow=cfg.train.samples_per_class, once=True)
        self.tb.images(
            "batch/pseudo_labeled", unl["images"], step, nrow=cfg.student.unlabeled_samples_per_class, once=True
        )
        dev = tr.device
        x = torch.cat([lab["images"], unl["images"]]).to(dev, non_blocking=True)
        y = lab["labels"].to(dev, non_blocking=True)
        pl = unl["labels"].to(dev, non_blocking=True)
        n_lab = int(lab["images"].shape[0])
        warmup = net.basis is not None and step < cfg.student.basis_warmup_steps
        self._reseed_after_warmup(net, step)
        if warmup:
            with torch.no_grad():  # W_a alone: the embedder gets no gradient (its lr is 0 too)
                emb = tr.forward(x).float()
        else:
            emb = tr.forward(x).float()
        emb_l, emb_u = emb[:n_lab], emb[n_lab:]
        terms: dict[str, torch.Tensor] = {}
        scalars: dict[str, float] = {}
        if not warmup:
            terms["rank_labeled"] = self.rank_loss(emb_l, y)
        if net.basis is not None:
            terms.update(self._basis_terms(net, emb_l, y, emb_u, pl, warmup, scalars))
        if self.ablation in ("no_basis", "raw_pairs") and not warmup:
            terms["rank_unlabeled"] = cfg.student.lambda1 * self.rank_loss(emb_u, pl)
        loss = sum(terms.values()) if terms else emb.sum() * 0.0
        scalars.update({f"loss/{k}": float(v.detach()) for k, v in terms.items()})
        skipped = self.skip("labeled", lab.get("skipped", 0)) + self.skip("pseudo", unl.get("skipped", 0))
        return MicroResult(loss=loss, scalars=scalars, images=int(x.shape[0]), skipped=skipped, wait_s=wait_l + wait_u)

    def _reseed_after_warmup(self, net: StudentNet, step: int) -> None:
        """At the first step after the warm-up the Gaussians summarise the frozen warm-up
        embeddings, with beta = 0.99 for ~100 more steps: forget them so the first moving batch
        seeds them. Every rank does it at the same step; a resume past that step keeps the
        checkpointed Gaussians."""
        warm = self.cfg.student.basis_warmup_steps
        if net.basis is not None and warm > 0 and step == warm and not self._reseeded:
            net.basis.reset_gaussians()
            self._reseeded = True

    def _basis_terms(
        self,
        net: StudentNet,
        emb_l: torch.Tensor,
        y: torch.Tensor,
        emb_u: torch.Tensor,
        pl: torch.Tensor,
        warmup: bool,
        scalars: dict[str, float],
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        basis = net.basis
        ce = basis.ce_loss(emb_l, y)
        sim = basis.basis_similarity(emb_u)
        sd, stats = basis.sd_loss(sim, pl)
        for k, v in (stats or {}).items():
            if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1):
                scalars[f"basis/{k}"] = float(v)
        terms = {"ce": cfg.student.lambda2 * ce, "sd": cfg.student.lambda2 * sd}
        if not warmup:  # both Eq. 7 readings on this sim, whichever one (if any) trains
            scalars.update({f"mining/{k}": v for k, v in basis.mining_shares(sim.detach(), pl).items()})
        if self.mining and not warmup:
            mined, n_pos, n_neg = mined_loss(
                basis,
                self.rank_loss,
                emb_u,
                pl,
                sim=sim,
                cross_rank=cfg.loss.cross_rank,
                require_agreement=cfg.mining.require_cluster_agreement,
            )
            scalars["mining/pos_pairs"] = float(n_pos)
            scalars["mining/neg_pairs"] = float(n_neg)
            terms["rank_mined"] = cfg.student.lambda1 * mined
        return terms


def mined_loss(
    basis: FeatureBasis,
    rank_loss: Any,
    emb_u: torch.Tensor,
    pl: torch.Tensor,
    *,
    sim: torch.Tensor | None = None,
    cross_rank: bool = False,
    require_agreement: bool = False,
) -> tuple[torch.Tensor, int, int]:
    """(L_rank on the pairs Eq. 7 mines from the unlabeled batch, #positive, #negative pairs).

    Under loss.cross_rank (world > 1) the pairs are mined on the GLOBAL batch (every rank's emb_u
    and pseudo labels, rank order, losses.gather_live) and the loss is that batch's
    (losses.global_pair_loss): value and averaged gradient equal one process holding the whole
    step. Collective then: every rank calls it each step. `sim`: basis_similarity(emb_u) when
    already computed (the per-rank path reuses it). With no mined pair the loss is a zero
    connected to emb_u (the same graph on every rank)."""
    if cross_rank and dist.world_size() > 1:
        glob = gather_live(emb_u)
        labels = dist.all_gather_cat(pl.view(-1))
        with torch.no_grad():
            glob_sim = basis.basis_similarity(glob.detach())
        pos, neg = basis.mine_pairs(glob_sim, labels, require_agreement)
        loss = global_pair_loss(rank_loss, glob, pos, neg)
    else:
        local_sim = basis.basis_similarity(emb_u) if sim is None else sim
        pos, neg = basis.mine_pairs(local_sim.detach(), pl, require_agreement)
        loss = rank_loss(emb_u, pos_pairs=pos, neg_pairs=neg)
    return loss, _pairs_count(pos), _pairs_count(neg)
