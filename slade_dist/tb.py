"""Rank-0 TensorBoard writing, for every stage (train, pseudo, eval).

Owns:
- `TBWriter`: one SummaryWriter per stage under RunLayout.tb_dir(...), written by rank 0 only
  (every other rank gets a no-op writer): scalars keyed by optimizer step, text, histograms,
  image grids (`images`: normalised batches de-normalised with the writer's `image_norm`, uint8
  images as they are), the embedding projector (`embedding`, `projector`: at most 50 classes, as
  the projector colours no more, with thumbnails) and hparams written into the SAME run directory
  (torch's add_hparams would open a sub-run). Fresh-run rule: a writer opened at step 0 (not a
  resume) starts with a purge at step 0, so TensorBoard (its data server and EventAccumulator)
  drops every event an earlier run of the stage wrote and a rerun never zig-zags; after a resume
  it purges from `resumed step + 1`, hiding what the killed run wrote past its last checkpoint.
- `config_hparams`: the result-changing knobs of a Config as flat hparams; `thumbnail`: a decoded
  image as a small square for a grid.
This module is on the foundation floor (beside data, models, losses): it imports none of them, so
callers pass the data's normalisation in (`image_norm`).
Tests: tests/unit/test_tb.py (read back with EventAccumulator), tests/unit/test_engine.py,
tests/integration/test_tensorboard.py (a real `tensorboard` server), tests/integration/test_resume.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from torchvision.transforms.v2 import functional as v2f
from torchvision.utils import make_grid

from . import dist
from .config import Config

PROJECTOR_MAX_CLASSES = 50  # TensorBoard's projector colours by at most 50 distinct labels
PROJECTOR_MAX_POINTS = 2000
THUMBNAIL = 32  # pixels per side of a projector thumbnail (the sprite holds them all)
NOT_HPARAMS = ("run.dir", "run.round")  # where the run lives and the round a per-round stage is on


class TBWriter:
    """Scalars, text, histograms, images, projector and hparams for rank 0; a no-op elsewhere."""

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None,
        *,
        resume_step: int = 0,
        enabled: bool | None = None,
        image_norm: tuple[Sequence[float], Sequence[float]] | None = None,
    ):
        self.log_dir = Path(log_dir) if log_dir else None
        self.image_norm = image_norm  # (mean, std) the float image batches were normalised with
        on = dist.is_main() if enabled is None else enabled
        self._w = None
        self._once: set[str] = set()
        if on and self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # purge_step 0: a fresh run hides all older events; after a resume only the killed run's
            # steps past its checkpoint
            self._w = SummaryWriter(str(self.log_dir), purge_step=resume_step + 1 if resume_step > 0 else 0)

    @property
    def active(self) -> bool:
        return self._w is not None

    def __enter__(self) -> TBWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        if self._w is None:
            return
        for tag, v in values.items():
            if v is None:
                continue
            self._w.add_scalar(tag, float(v), step)

    def text(self, tag: str, body: str, step: int = 0) -> None:
        if self._w is not None:
            # markdown code block keeps YAML indentation readable in the Text tab
            self._w.add_text(tag, "```\n" + body + "\n```", step)

    def histogram(self, tag: str, values: np.ndarray, step: int, bins: Any = "tensorflow") -> None:
        if self._w is not None:
            self._w.add_histogram(tag, values, global_step=step, bins=bins)

    def images(
        self, tag: str, batch: torch.Tensor, step: int, *, nrow: int = 8, max_images: int = 64, once: bool = False
    ) -> None:
        """One grid of the first `max_images` of a (N, 3, H, W) batch, `nrow` a row (K of a P x K
        batch: one class a row). once=True: only the first call for this tag writes (a stage logs
        its first batch from inside its per-batch function)."""
        if self._w is None or (once and tag in self._once):
            return
        self._once.add(tag)
        self._w.add_image(tag, make_grid(self._viewable(batch[:max_images]), nrow=max(1, nrow), padding=2), step)

    def embedding(
        self,
        tag: str,
        features: np.ndarray,
        labels: np.ndarray,
        thumbnails: torch.Tensor | None = None,
        step: int = 0,
        *,
        names: Sequence[str] | None = None,
        max_classes: int = PROJECTOR_MAX_CLASSES,
        max_points: int = PROJECTOR_MAX_POINTS,
        seed: int = 0,
    ) -> None:
        """The projector: `features` (N, d) with their labels (class names when `names` is given)
        and optional thumbnails, subsampled to at most max_classes classes and max_points points."""
        if self._w is None or len(features) == 0:
            return
        keep = _projector_rows(np.asarray(labels), max_classes, max_points, seed)
        lab = np.asarray(labels)[keep]
        meta = [names[c] if names is not None and 0 <= c < len(names) else str(c) for c in lab.tolist()]
        imgs = None if thumbnails is None else self._viewable(thumbnails[torch.as_tensor(keep)])
        # a rerun writes the same step/tag: replace the old tensors instead of mixing in with them
        folder = tag.replace("%", "%25").replace("/", "%2f").replace("\\", "%5c")  # as SummaryWriter names it
        shutil.rmtree(self.log_dir / f"{step:05d}" / folder, ignore_errors=True)
        self._w.add_embedding(np.asarray(features)[keep], metadata=meta, label_img=imgs, global_step=step, tag=tag)

    def projector(self, tag: str, pairs: Iterable[tuple[np.ndarray, dict[str, Any]]], step: int = 0, **kw: Any) -> None:
        """embedding() of the (embeddings, batch) pairs of models.embed_batches: read until
        max_points rows of the first max_classes labels met, thumbnails from the batch images."""
        if self._w is None:
            return
        max_classes = kw.get("max_classes", PROJECTOR_MAX_CLASSES)
        feats, labels, thumbs = _collect(pairs, max_classes, kw.get("max_points", PROJECTOR_MAX_POINTS))
        if feats:
            self.embedding(tag, np.concatenate(feats), np.concatenate(labels), torch.cat(thumbs), step, **kw)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int = 0) -> None:
        """hparams plugin summaries in this run's directory, plus the metrics as scalars there
        (the plugin shows the last value of each metric tag of the session's run)."""
        if self._w is None:
            return
        hp = {k: v for k, v in hparams.items() if isinstance(v, (bool, int, float, str))}
        for summary in hparams_summaries(hp, dict(metrics)):
            self._w.file_writer.add_summary(summary, step)
        self.scalars(metrics, step)

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def _viewable(self, batch: torch.Tensor) -> torch.Tensor:
        """Float (N, 3, H, W) in [0, 1] on the CPU: uint8 scaled, normalised floats de-normalised."""
        x = batch.detach().cpu()
        if x.dtype == torch.uint8:
            return x.float() / 255.0
        x = x.float()
        if self.image_norm is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in self.image_norm)
            x = x * std + mean
        return x.clamp(0.0, 1.0)


def _projector_rows(labels: np.ndarray, max_classes: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted row indices: the rows of at most max_classes labels (drawn at random), then at most
    max_points of those rows (drawn at random)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if len(classes) > max_classes:
        classes = rng.choice(classes, max_classes, replace=False)
    rows = np.flatnonzero(np.isin(labels, classes))
    if len(rows) > max_points:
        rows = np.sort(rng.choice(rows, max_points, replace=False))
    return rows


def _collect(
    pairs: Iterable[tuple[np.ndarray, dict[str, Any]]], max_classes: int, max_points: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[torch.Tensor]]:
    """Rows of the first max_classes labels met, until max_points; thumbnails shrunk per batch
    (memory stays max_points small images whatever the split's size)."""
    feats, labels, thumbs, seen, n = [], [], [], set(), 0
    it = iter(pairs)
    try:
        for emb, batch in it:
            lab = batch["labels"].numpy()
            for c in dict.fromkeys(lab.tolist()):  # new labels in order met, while there is room
                if len(seen) < max_classes:
                    seen.add(c)
            rows = np.flatnonzero(np.isin(lab, list(seen)))[: max_points - n]
            if len(rows):
                feats.append(emb[rows])
                labels.append(lab[rows])
                thumbs.append(_shrink(batch["images"][torch.as_tensor(rows)]))
                n += len(rows)
            if n >= max_points:
                break
    finally:
        getattr(it, "close", lambda: None)()  # ends the reader (and its workers) when we stop early
    return feats, labels, thumbs


def thumbnail(image: torch.Tensor, pixels: int) -> torch.Tensor:
    """A decoded (3, H, W) uint8 image as a pixels x pixels square (shorter side resized, centre
    crop), so images of any size stack into one grid."""
    return v2f.center_crop(v2f.resize(image, [pixels], antialias=True), [pixels, pixels])


def _shrink(images: torch.Tensor) -> torch.Tensor:
    x = images.detach().cpu().float()
    return torch.nn.functional.interpolate(x, size=(THUMBNAIL, THUMBNAIL), mode="bilinear", antialias=True)


def log_eval(
    log_dir: str | os.PathLike[str],
    results: Mapping[str, Any],
    cfg: Config,
    pairs: Iterable[tuple[np.ndarray, dict[str, Any]]],
    names: Sequence[str] | None,
    image_norm: tuple[Sequence[float], Sequence[float]],
    hparam_keys: Sequence[str],
    images: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """The eval stage's run (rank 0; a rerun replaces it): eval/<metric> per model at steps 0..n-1
    in chain order (eval/model names each step), the final model's metrics as final/<metric>
    with config_hparams(cfg, hparam_keys) as hparams, the projector "test" of `pairs` (embed_batches of the
    final model) at the final model's step, and `images` (model -> a (3, H, W) uint8 picture, the
    retrieval grids) as retrieval/<model> at that model's step."""
    models = results["models"]
    with TBWriter(log_dir, image_norm=image_norm) as tb:
        for step, (name, metrics) in enumerate(models.items()):
            tb.scalars({f"eval/{k}": v for k, v in metrics.items()}, step)
            tb.text("eval/model", name, step)
            if images and name in images:
                tb.images(f"retrieval/{name.replace(' ', '_')}", images[name][None], step, nrow=1)
        tb.hparams(config_hparams(cfg, hparam_keys), {f"final/{k}": v for k, v in models[results["final"]].items()})
        tb.projector("test", pairs, max(len(models) - 1, 0), names=names)


def config_hparams(cfg: Config, keys: Sequence[str]) -> dict[str, Any]:
    """The knobs that change results among `keys` (what the chain's stages declare they read,
    stages.chain_reads), flat as "section.key": what the hparams dashboard compares runs by.
    Fields marked result=False and input paths are left out; lists become text."""
    every: dict[str, Any] = {}
    _flatten(cfg, "", every)
    declared = tuple(keys)
    return {
        k: v
        for k, v in every.items()
        if k not in NOT_HPARAMS and any(k == d or k.startswith(d + ".") for d in declared)
    }


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    for f in dataclasses.fields(obj):
        if f.name.startswith("_") or not f.metadata.get("result", True) or f.metadata.get("input_path", False):
            continue
        v = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(v):
            _flatten(v, key, out)
        elif v is not None:
            out[key] = v if isinstance(v, (bool, int, float, str)) else str(v)
