"""The eval stage: the teacher and each round's student (the self-training gain in one table)
measured on the class-disjoint test split (or In-shop query + gallery) -> <run>/eval/metrics.json,
TensorBoard (tb.log_eval) and retrieval grids of the teacher and the final model; and
`periodic_evaluator`, which the stage runner hands to the trainers (train/ never imports eval/).
Tests: tests/integration/test_{pipeline_e2e,tensorboard,vit_chain}.py, tests/unit/test_engine.py
(periodic eval), tests/unit/test_grids.py, tests/unit/test_curate.py (the curation line).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..config import Config
from ..data.curation import read_summary
from ..data.readers import finite_batches
from ..data.shards import read_classes, read_index
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UnusableInput
from ..fileio import atomic_write_json
from ..models import embed_batches, load_embedder, output_dim
from ..progress import progress
from ..stages import RunLayout, chain_reads
from ..tb import log_eval
from .grids import Split, retrieval_grid, save_png
from .metrics import query_gallery_metrics, retrieval_metrics


def models_to_evaluate(layout: RunLayout, rounds: int) -> list[tuple[str, Path]]:
    """(name, final.pt) in chain order, for those that exist."""
    found = [("teacher", layout.stage_dir("teacher") / "final.pt")]
    found += [(f"student r{r}", layout.stage_dir("student", r) / "final.pt") for r in range(1, rounds + 1)]
    return [(n, p) for n, p in found if p.exists()]


def embed_split(model: torch.nn.Module, shard_dir: str, cfg: Config) -> Split:
    """Embeddings, labels and keys of a labeled shard dir, gathered from all ranks (rank order, then
    sorted by key). Images that could not be read are named in a warning: the metrics then cover fewer."""
    embs, labels, keys = [], [], []
    stream = finite_batches(shard_dir, cfg.data, cfg.eval.batch_size)
    with progress(sum(s["count"] for s in dist.shard_slice(read_index(shard_dir)["shards"])), "eval", "img") as bar:
        for e, batch in embed_batches(model, stream, dist.device()):
            embs.append(e)
            labels.append(batch["labels"].numpy())
            keys.extend(batch["keys"])
            bar.update(len(e))
    local = (
        np.concatenate(embs) if embs else np.zeros((0, output_dim(model)), np.float32),
        np.concatenate(labels) if labels else np.zeros((0,), np.int64),
        keys,
        stream.counts,
    )
    parts = dist.all_gather_object(local)
    emb = np.concatenate([p[0] for p in parts])
    lab = np.concatenate([p[1] for p in parts])
    _warn_if_dropped(shard_dir, len(emb), [p[3] for p in parts])
    all_keys = [k for p in parts for k in p[2]]
    order = np.argsort(np.array(all_keys), kind="stable")  # rank-independent order
    return Split(emb[order], lab[order], [all_keys[i] for i in order], shard_dir)


def _warn_if_dropped(shard_dir: str, measured: int, counts: list[dict[str, int]]) -> None:
    corrupt, lost = sum(c["corrupt"] for c in counts), sum(c["lost"] for c in counts)
    if not measured:
        raise UnusableInput(
            f"eval: not one image of {shard_dir} could be read ({corrupt} corrupt, {lost} lost to "
            f"truncated tars): nothing to measure"
        )
    if (corrupt or lost) and dist.is_main():
        dist.get_logger().warning(
            f"[eval] {corrupt + lost} of {measured + corrupt + lost} images of {shard_dir} were "
            f"not measured ({corrupt} corrupt, {lost} lost to truncated tars): the metrics "
            f"cover the {measured} that could be read"
        )


def periodic_evaluator(cfg: Config) -> Callable[[torch.nn.Module], dict[str, float]] | None:
    """The trainers' periodic eval on cfg.data.test_shards (None when train.eval_every is 0 or there
    is no test split). Every rank embeds its share; rank 0 computes the metrics on the gathered
    embeddings and broadcasts them, so all ranks return the same dict."""
    if cfg.train.eval_every <= 0 or not cfg.data.test_shards:
        return None

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        split = embed_split(model, cfg.data.test_shards, cfg)
        metrics = _self_metrics(split.emb, split.labels, cfg) if dist.is_main() else {}
        return dist.broadcast_object({k: float(v) for k, v in metrics.items()})

    return evaluate


def evaluate_model(path: Path, cfg: Config) -> dict[str, float] | None:
    """Metrics of one exported model (rank 0 gets the dict, other ranks None)."""
    return measure(path, cfg)[0]


def measure(path: Path, cfg: Config) -> tuple[dict[str, float] | None, tuple[Split, Split] | None]:
    """(metrics, (queries, references)) of one exported model on rank 0, (None, None) elsewhere.
    Self protocol: the test split is both; In-shop: the query and the gallery split."""
    model = load_embedder(path, map_location="cpu")
    if cfg.eval.protocol == "query_gallery":
        q = embed_split(model, cfg.data.query_shards, cfg)
        g = embed_split(model, cfg.data.gallery_shards, cfg)
        if not dist.is_main():
            return None, None
        e = cfg.eval
        metrics = query_gallery_metrics(
            q.emb, q.labels, g.emb, g.labels, recall_k=tuple(e.recall_k), chunk_size=e.chunk_size
        )
        return metrics, (q, g)
    split = embed_split(model, cfg.data.test_shards, cfg)
    if not dist.is_main():
        return None, None
    return _self_metrics(split.emb, split.labels, cfg), (split, split)


def draw_grid(name: str, splits: tuple[Split, Split], cfg: Config, layout: RunLayout) -> torch.Tensor:
    """eval/retrieval_<model>.png of `name` (rank 0); returns it as a (3, H, W) uint8 tensor for TensorBoard."""
    queries, refs = splits
    e = cfg.eval
    picture, shown = retrieval_grid(
        f"{name}: top-{e.grid_k} per query (blue: query, green: same class, red: other class)",
        queries,
        refs,
        n=e.grid_queries,
        k=e.grid_k,
        seed=cfg.run.seed,
        chunk_size=e.chunk_size,
        tile=e.grid_tile,
        class_names=_class_names(queries.shard_dir),
    )
    path = save_png(picture, layout.stage_dir("eval") / f"retrieval_{name.replace(' ', '_')}.png")
    right = int(shown["same"].sum())
    dist.get_logger().info(
        f"[eval] {name}: retrieval grid of {len(shown['queries'])} queries x top-{shown['results'].shape[1]} "
        f"({right} of {shown['same'].size} shown results of the query's class) -> {path}"
    )
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


def _class_names(shard_dir: str) -> list[str] | None:
    try:
        return read_classes(shard_dir)
    except FileNotFoundError:  # names are a courtesy: the ids are shown instead
        return None


def _self_metrics(emb: np.ndarray, lab: np.ndarray, cfg: Config) -> dict[str, float]:
    e = cfg.eval
    return retrieval_metrics(
        emb, lab, recall_k=tuple(e.recall_k), chunk_size=e.chunk_size, nmi=e.nmi, seed=cfg.run.seed
    )


def pseudo_label_quality(layout: RunLayout, rounds: int) -> dict[str, dict[str, Any]]:
    """Each round's cluster facts (cluster/stats.json; purity/NMI when the pool carried hidden labels)."""
    out = {}
    for r in range(1, rounds + 1):
        stats = layout.stage_dir("cluster", r) / "stats.json"
        if stats.exists():
            s = json.loads(stats.read_text())
            out[f"round {r}"] = {k: s[k] for k in ("purity", "nmi", "k", "n", "imbalance") if k in s}
    return out


def curation_report(layout: RunLayout, cfg: Config) -> dict[str, Any]:
    """What the curate stage removed from the unlabeled pool per test set (logged in one line)."""
    log = dist.get_logger()
    s = read_summary(layout.stage_dir("curate")) if cfg.curate.enabled else None
    if s is None:
        log.warning(
            "[eval] the unlabeled pool was not checked against the test sets (curate.enabled is false or the curate "
            "stage has not run): copies of test images in it would inflate these metrics"
        )
        return {}
    sets = ", ".join(f"{n} {v['removed']} ({v['same_bytes']} same bytes)" for n, v in s["per_test_set"].items())
    log.info(
        f"[eval] curation removed from the {s['pool']} unlabeled images: copies of {sets}; "
        f"{s['removed']['duplicates']} near-duplicates"
    )
    keys = ("pool", "kept", "removed", "per_test_set", "candidate_radius", "match_threshold", "colour_threshold")
    return {k: s[k] for k in keys if k in s}


def run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    layout = RunLayout(run_dir)
    models = models_to_evaluate(layout, cfg.run.rounds)
    if not models:
        raise FileNotFoundError(
            f"eval: no trained model under {layout.root} (expected teacher/final.pt or "
            f"round<r>/student/final.pt); run the teacher stage first"
        )
    results: dict[str, Any] = {"protocol": cfg.eval.protocol, "models": {}, "final": models[-1][0]}
    grids: dict[str, torch.Tensor] = {}
    for name, path in models:
        metrics, splits = measure(path, cfg)
        if metrics is not None:
            results["models"][name] = {k: float(v) for k, v in metrics.items()}
            dist.get_logger().info(f"[eval] {name}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        # a grid for the teacher and the final model, on the same seeded queries
        if splits is not None and cfg.eval.grid_queries and name in {models[0][0], models[-1][0]}:
            grids[name] = draw_grid(name, splits, cfg, layout)
    if not dist.is_main():
        return {}
    results["pseudo_labels"] = pseudo_label_quality(layout, cfg.run.rounds)
    results["curation"] = curation_report(layout, cfg)
    out = atomic_write_json(layout.stage_dir("eval") / "metrics.json", results, indent=2)
    _log_tensorboard(layout, results, cfg, models[-1][1], grids)
    dist.get_logger().info(f"[eval] metrics of {len(results['models'])} model(s) -> {out}")
    return {"final": results["final"], **results["models"][results["final"]]}


def _log_tensorboard(
    layout: RunLayout, results: dict[str, Any], cfg: Config, final: Path, grids: dict[str, torch.Tensor]
) -> None:
    """tb/eval (tb.log_eval); the projector shows `final` on the split's first images, read by rank 0;
    `grids`: each model's retrieval grid as the image retrieval/<model>."""
    split = cfg.data.test_shards or cfg.data.gallery_shards
    stream = finite_batches(split, cfg.data, cfg.eval.batch_size, rank=0, world=1)
    pairs = embed_batches(load_embedder(final, map_location="cpu"), stream, dist.device())
    norm = (IMAGENET_MEAN, IMAGENET_STD)
    hparams = chain_reads(cfg)  # the keys the run's stages declare: what runs are compared by
    log_eval(layout.tb_dir("eval"), results, cfg, pairs, read_classes(split), norm, hparams, images=grids)
