"""Helpers for the trainer tests: tiny real shards, configs, and per-rank worker functions.

The worker functions run inside processes started by dist.run_local_processes (module level, so
spawn can import them). Data: 32x32 JPEGs whose class is a colour + stripe pattern (a tiny CNN
learns it in a few dozen steps), written with slade_dist.data.shards.write_shard, plus perfect or
noisy pseudo-label files written with slade_dist.data.pseudo_labels.
"""

from __future__ import annotations

import colorsys
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slade_dist.data.shards import encode_jpeg, shard_name, shard_paths, write_classes, write_index, write_shard

IMAGE = 32


def class_image(c: int, n_classes: int, rng: np.random.Generator) -> Image.Image:
    """A colour (hue by class) with stripes (orientation and period by class) and noise."""
    r, g, b = colorsys.hsv_to_rgb(c / n_classes, 0.8, 0.9)
    img = np.empty((IMAGE, IMAGE, 3), np.float32)
    img[:] = (r * 255, g * 255, b * 255)
    period = 4 + 2 * (c % 3)
    idx = np.arange(IMAGE)
    stripes = (idx // (period // 2)) % 2 == 0
    if c % 2:
        img[stripes, :, :] *= 0.35
    else:
        img[:, stripes, :] *= 0.35
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_labeled(
    out: Path,
    n_classes: int,
    per_class: int,
    n_shards: int = 2,
    seed: int = 0,
    prefix: str = "train",
    class_offset: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    samples = []
    for c in range(n_classes):
        for i in range(per_class):
            img = class_image(c + class_offset, n_classes + class_offset, rng)
            samples.append(
                {
                    "__key__": f"{prefix}_{c:03d}_{i:03d}",
                    "jpg": encode_jpeg(img),
                    "cls": str(c),
                    "json": json.dumps({"class_name": f"class{c}"}).encode(),
                }
            )
    rng.shuffle(samples)
    shards = []
    for s in range(n_shards):
        name = shard_name(prefix, s)
        n = write_shard(out / name, samples[s::n_shards])
        shards.append({"name": name, "count": n})
    write_index(out, shards, "labeled")
    write_classes(out, [f"class{c}" for c in range(n_classes)])
    return out


def write_unlabeled(
    out: Path, n_classes: int, per_class: int, n_shards: int = 2, seed: int = 1, corrupt: int = 0
) -> tuple[Path, dict[str, int]]:
    """Unlabeled shards (+ `corrupt` undecodable jpgs); returns the true class of every key."""
    rng = np.random.default_rng(seed)
    samples, truth = [], {}
    for c in range(n_classes):
        for i in range(per_class):
            key = f"u_{c:03d}_{i:03d}"
            samples.append({"__key__": key, "jpg": encode_jpeg(class_image(c, n_classes, rng))})
            truth[key] = c
    for i in range(corrupt):
        key = f"u_bad_{i:03d}"
        samples.append({"__key__": key, "jpg": b"\xff\xd8 not a jpeg"})
        truth[key] = 0
    order = rng.permutation(len(samples))
    samples = [samples[i] for i in order]
    shards = []
    for s in range(n_shards):
        name = shard_name("unlabeled", s)
        n = write_shard(out / name, samples[s::n_shards])
        shards.append({"name": name, "count": n})
    write_index(out, shards, "unlabeled")
    return out, truth


def write_pseudo(
    unlabeled_dir: Path, pseudo_dir: Path, truth: dict[str, int], noise: float = 0.0, seed: int = 2
) -> Path:
    """Pseudo-label files (one per image shard, same key order) from the true classes."""
    import tarfile

    from slade_dist.data.pseudo_index import build_index
    from slade_dist.data.pseudo_labels import pseudo_label_path, write_meta, write_pseudo_labels

    rng = np.random.default_rng(seed)
    n_cls = max(truth.values()) + 1
    for shard in shard_paths(unlabeled_dir):
        keys = []
        with tarfile.open(shard) as tf:
            for m in tf:
                k = m.name.split(".", 1)[0]
                if not keys or keys[-1] != k:
                    keys.append(k)
        cls = np.array([truth[k] if rng.random() >= noise else rng.integers(n_cls) for k in keys])
        write_pseudo_labels(pseudo_label_path(pseudo_dir, shard), keys, cls, rng.random(len(keys)))
    write_meta(pseudo_dir, round=1, teacher_step=0, k=n_cls)
    build_index(unlabeled_dir, pseudo_dir)  # the cluster -> members index the student reads
    return pseudo_dir


def make_data(
    root: Path, n_classes: int = 6, per_class: int = 8, unl_per_class: int = 8, corrupt: int = 0
) -> dict[str, Path]:
    train = write_labeled(root / "train", n_classes, per_class)
    test = write_labeled(root / "test", 4, 5, n_shards=1, seed=5, prefix="test", class_offset=n_classes)
    unl, truth = write_unlabeled(root / "unlabeled", n_classes, unl_per_class, corrupt=corrupt)
    return {"train": train, "test": test, "unlabeled": unl, "truth": truth}  # type: ignore[dict-item]


def overrides(data: dict[str, Any], run_dir: Path, *extra: str) -> list[str]:
    """Small-and-fast config for the tiny data (tiny_cnn, 32 px, no loader workers)."""
    return [
        f"run.dir={run_dir}",
        f"data.train_shards={data['train']}",
        f"data.test_shards={data['test']}",
        f"data.unlabeled_shards={data['unlabeled']}",
        "data.image_size=32",
        "data.resize_size=32",
        "data.crop_scale_min=0.6",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        "model.backbone=tiny_cnn",
        "model.embed_dim=32",
        "model.freeze_bn=false",
        "train.classes_per_batch=4",
        "train.samples_per_class=4",
        "train.lr=0.003",
        "train.backbone_lr_mult=1.0",
        "train.warmup_steps=3",
        "train.log_every=2",
        "train.ckpt_every=10",
        "student.unlabeled_classes_per_batch=4",
        "student.unlabeled_samples_per_class=4",
        "student.basis_warmup_steps=4",
        "pretrain.batch_size=16",
        "pretrain.prototypes=12",
        "pretrain.proj_dim=16",
        "pretrain.freeze_prototypes_steps=3",
        "pretrain.lr=0.003",
        "eval.batch_size=64",
        *extra,
    ]


def load_cfg(ovr: Sequence[str]):
    from slade_dist.config import load_config

    return load_config(None, list(ovr), check_paths=False)


# ---------------------------------------------------------------------------- rank workers
def _start() -> None:
    import torch

    from slade_dist import dist

    torch.set_num_threads(1)  # 2 ranks on 2 shared cores: more threads only contend
    dist.init_distributed()


def stage_worker(stages: list[str], ovr: list[str], out_prefix: str) -> None:
    """Run stages in order on this rank (as a user's rerun: finished ones skipped, interrupted ones
    resumed); write this rank's results to <out_prefix>.rank<r>.json."""
    from slade_dist import dist
    from slade_dist.runner import run_stage

    _start()
    results = {}
    for stage in stages:
        results[stage] = run_stage(load_cfg(ovr), stage)
    Path(f"{out_prefix}.rank{dist.rank()}.json").write_text(json.dumps(results, default=str))
    dist.barrier()
    dist.shutdown()


def read_results(out_prefix: str | Path, world: int) -> list[dict[str, Any]]:
    return [json.loads(Path(f"{out_prefix}.rank{r}.json").read_text()) for r in range(world)]


def run_ranks(world: int, stages: list[str], ovr: list[str], out_prefix: str | Path) -> list[dict[str, Any]]:
    from slade_dist import dist

    dist.run_local_processes(
        stage_worker,
        world,
        args=(stages, list(ovr), str(out_prefix)),
        extra_env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )
    return read_results(out_prefix, world)


def tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def tb_text_tags(tb_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    ea.Reload()
    return list(ea.Tags().get("tensors", []))


def main_two_ranks(stages_csv: str, ovr_file: str, out_prefix: str) -> None:
    """Entry of a killable 2-rank run (the resume test SIGKILLs its whole process group)."""
    ovr = json.loads(Path(ovr_file).read_text())
    run_ranks(2, stages_csv.split(","), ovr, out_prefix)


if __name__ == "__main__":  # python -m tests.integration._train_workers STAGES OVR_JSON OUT_PREFIX
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main_two_ranks(sys.argv[1], sys.argv[2], sys.argv[3])
