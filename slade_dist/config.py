"""Typed configuration: dataclasses for every section, YAML layering, validation at load.

Owns: the schema (every knob the system has, with its default), layering
`configs/defaults.yaml` -> a run file -> `key.sub=value` overrides, and the errors a user sees for
an unknown key (closest valid key suggested), a wrong type, an out-of-range value or a missing input
path (each naming the key and the file it came from). Also the resolved-config dump and its hash.
Tests: tests/unit/test_config.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import textwrap
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError
from .fileio import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = REPO_ROOT / "configs" / "defaults.yaml"


class ConfigError(ValueError, UserError):
    """A configuration problem, with the key and the file it came from in the message."""


def _f(
    default: Any = dataclasses.MISSING,
    *,
    lo: float | None = None,
    hi: float | None = None,
    input_path: bool = False,
    nonempty: bool = False,
    result: bool = True,
    help: str = "",
    factory: Any = None,
) -> Any:
    """A field with validation metadata: lo/hi bounds (inclusive; for lists, of every item),
    input_path (must exist if set), nonempty (a string or list that must not be empty), result
    (False: how often to log or checkpoint, how many loader workers... such a knob never changes
    what a stage computes, so it is left out of the stage hashes and changing it reruns nothing)."""
    meta = {"lo": lo, "hi": hi, "input_path": input_path, "nonempty": nonempty, "result": result, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# Backbones built in (slade_dist/models/backbones.py registers one constructor per name).
BACKBONE_NAMES = ("resnet50", "resnet18", "tiny_cnn")


# ----------------------------------------------------------------------------------------- schema
@dataclass
class RunConfig:
    dir: str = _f(
        "runs/demo", nonempty=True, result=False, help="run directory: every stage writes under it (where, not what)"
    )
    rounds: int = _f(2, lo=1, help="self-training rounds (embed -> cluster -> student)")
    round: int = _f(1, lo=1, help="round a per-round stage (embed/cluster/student) works on")
    seed: int = _f(0, lo=0)


@dataclass
class DemoConfig:
    """The procedural fine-grained demo dataset (python -m slade_dist demo-data)."""

    out: str = _f("shards/demo", help="where the demo shards go (train/ test/ unlabeled/)")
    image_size: int = _f(64, lo=16, hi=1024)
    train_classes: int = _f(40, lo=2)
    test_classes: int = _f(40, lo=2)
    extra_classes: int = _f(20, lo=0, help="unseen classes that appear only in the unlabeled set")
    labeled_per_class: int = _f(10, lo=1)
    test_per_class: int = _f(20, lo=2)
    unlabeled_per_class: int = _f(40, lo=0)
    shard_size: int = _f(500, lo=1)
    seed: int = _f(0, lo=0)
    workers: int = _f(2, lo=1)
    planted_test_copies: int = _f(
        0,
        lo=0,
        help="edited copies of test images (crop, resize, JPEG re-encode, small rotation, or the same bytes) "
        "mixed into unlabeled/; their identity goes to <out>/planted.json only (measuring the curate stage)",
    )
    duplicate_groups: int = _f(
        0, lo=0, help="unlabeled images given edited copies of themselves (groups of duplicate_group_size images)"
    )
    duplicate_group_size: int = _f(3, lo=2, help="images per planted duplicate group: the original and its copies")


@dataclass
class AugmentConfig:
    """Train-time augmentation: data.augment (teacher / student streams) and pretrain.augment (SwAV
    views) share these keys, with their own defaults. Order: crop, flip, rotation, colour jitter,
    grayscale, blur."""

    flip: bool = _f(True, help="random horizontal flip (p 0.5); false where a mirror image is another class")
    rotation_degrees: float = _f(0.0, lo=0.0, hi=180.0, help="random rotation in [-d, d] degrees (0: none)")
    jitter_brightness: float = _f(0.0, lo=0.0, help="colour jitter brightness strength (0: none)")
    jitter_contrast: float = _f(0.0, lo=0.0, help="colour jitter contrast strength (0: none)")
    jitter_saturation: float = _f(0.0, lo=0.0, help="colour jitter saturation strength (0: none)")
    jitter_hue: float = _f(0.0, lo=0.0, hi=0.5, help="colour jitter hue strength (0: none)")
    jitter_p: float = _f(0.8, lo=0.0, hi=1.0, help="probability the colour jitter is applied to an image")
    grayscale_p: float = _f(0.0, lo=0.0, hi=1.0, help="probability of converting an image to grayscale")
    blur_p: float = _f(0.0, lo=0.0, hi=1.0, help="probability of a Gaussian blur (kernel ~10% of the crop)")
    blur_sigma_min: float = _f(0.1, lo=1e-3, help="Gaussian blur sigma drawn from [min, max] pixels")
    blur_sigma_max: float = _f(2.0, lo=1e-3, help="Gaussian blur sigma drawn from [min, max] pixels")
    crop_scale_min: float | None = _f(
        None, lo=0.01, hi=1.0, help="RandomResizedCrop area scale minimum; null: data.crop_scale_min"
    )
    crop_scale_max: float = _f(1.0, lo=0.01, hi=1.0, help="RandomResizedCrop area scale maximum")
    crop_ratio_min: float = _f(0.75, lo=0.01, help="RandomResizedCrop aspect ratio minimum")
    crop_ratio_max: float = _f(4.0 / 3.0, lo=0.01, help="RandomResizedCrop aspect ratio maximum")


def swav_augment() -> AugmentConfig:
    """SwAV's view augmentation (Caron et al. 2020): colour jitter 0.4/0.4/0.4/0.1 at p 0.8, grayscale p 0.2."""
    return AugmentConfig(
        jitter_brightness=0.4, jitter_contrast=0.4, jitter_saturation=0.4, jitter_hue=0.1, grayscale_p=0.2
    )


@dataclass
class DataConfig:
    train_shards: str = _f("", input_path=True, help="labeled training shard dir (index.json inside)")
    test_shards: str = _f("", input_path=True, help="class-disjoint test shard dir")
    query_shards: str = _f("", input_path=True, help="In-shop protocol: query shard dir")
    gallery_shards: str = _f("", input_path=True, help="In-shop protocol: gallery shard dir")
    unlabeled_shards: str = _f("", input_path=True, help="unlabeled shard dir")
    image_size: int = _f(224, lo=8, help="crop size fed to the model")
    resize_size: int = _f(256, lo=8, help="eval: shorter side before the center crop")
    crop_scale_min: float = _f(
        0.16, lo=0.01, hi=1.0, help="train crop area scale minimum (unless data.augment sets one)"
    )
    augment: AugmentConfig = _f(
        factory=AugmentConfig,
        help="train-time augmentation of the labeled / pseudo streams (same keys as pretrain.augment)",
    )
    num_workers: int = _f(2, lo=0, result=False)
    shuffle_buffer: int = _f(1000, lo=0)
    max_buffered: int = _f(10000, lo=1, help="P x K batcher: most samples held while waiting for K of a label")
    buffer_mb: int = _f(
        128,
        lo=1,
        help="most MiB of encoded images each of a loader worker's buffers holds (the shuffle buffer, the P x K "
        "batcher, the SwAV shuffle buffer), whatever shuffle_buffer / max_buffered allow",
    )
    max_image_pixels: int = _f(
        64_000_000,
        lo=1,
        hi=178_956_970,
        help="images of more pixels are skipped as corrupt, checked from the header before decoding (at most "
        "Pillow's own limit, 178,956,970)",
    )
    max_aspect_ratio: float = _f(
        20.0, lo=1.0, help="images whose longer / shorter side exceeds this are skipped as corrupt (header check)"
    )
    decode: Literal["workers", "device"] = _f(
        "workers",
        help="where JPEGs are decoded: workers (CPU loader workers) | device (workers hand over the bytes, the rank "
        "decodes each batch with torchvision.io.decode_jpeg on its device; other formats stay on the workers)",
    )
    pseudo_max_dist_percentile: float = _f(
        100.0,
        lo=0.0,
        hi=100.0,
        help="the cluster stage's member index keeps a cluster's samples up to this percentile of its distances "
        "to the centroid; the student draws only those",
    )
    pseudo_min_cluster_size: int = _f(
        2,
        lo=1,
        help="the cluster stage's member index drops smaller clusters (and the student draws only clusters with >= K "
        "kept members)",
    )


@dataclass
class ModelConfig:
    backbone: str = _f("resnet50", help=" | ".join(BACKBONE_NAMES) + " | timm:<name>")
    embed_dim: int = _f(128, lo=2)
    pretrained: str = _f(
        "none",
        nonempty=True,
        help="initial backbone weights: none (random) | hub (a timm:<name> backbone's published weights, "
        "read through the Hugging Face cache: works offline once cached) | <path> (a local torchvision / timm / "
        "SwAV / safetensors / slade_dist weights file; stored as model.pretrained_path at load)",
    )
    pretrained_path: str = _f(
        "", input_path=True, help="local weights file (the older spelling of model.pretrained=<path>); never downloaded"
    )
    freeze_bn: bool = _f(True, help="BatchNorm keeps its running statistics and weights (eval mode) while training")
    pooling: Literal["avg", "max", "avgmax"] = _f("avg", help="pooling of a CNN's feature map")
    token_pool: Literal["auto", "cls", "mean"] = _f(
        "auto",
        help="pooling of a transformer's tokens: auto = the model family's own (timm's global_pool: the class "
        "token for ViT / DINOv2, the mean where the model has no class token), cls = the class token, "
        "mean = the mean of the patch tokens",
    )
    sync_bn: bool = _f(
        True,
        help="BatchNorm layers that train normalise with the statistics of every rank's rows (SyncBatchNorm; "
        "an all-reduce BatchNorm on CPU); false: each rank's own rows, so the method depends on the GPU count",
    )


PRETRAINED_NONE, PRETRAINED_HUB = "none", "hub"


def pretrained_source(model: ModelConfig) -> tuple[str, str]:
    """Where a backbone's initial weights come from: ("none", ""), ("hub", "") or ("file", path).

    model.pretrained=<path> and model.pretrained_path=<path> mean the same; both set is refused
    (not one silently winning), and so is hub for a backbone that is not a timm model."""
    choice = model.pretrained.strip()
    if choice in (PRETRAINED_NONE, ""):
        return ("file", model.pretrained_path) if model.pretrained_path else (PRETRAINED_NONE, "")
    if model.pretrained_path:
        raise ConfigError(
            f"model.pretrained={choice!r} and model.pretrained_path={model.pretrained_path!r} are both set: "
            f"set only one (model.pretrained=<path> is the same as model.pretrained_path=<path>; "
            f"model.pretrained_path='' clears the old one)"
        )
    if choice == PRETRAINED_HUB:
        if not model.backbone.startswith("timm:"):
            raise ConfigError(
                f"model.pretrained=hub loads a timm model's published weights, but model.backbone is "
                f"{model.backbone!r}: use model.backbone=timm:<name> (e.g. timm:resnet50.a1_in1k, "
                f"timm:vit_small_patch14_dinov2.lvd142m) or model.pretrained=<local file>"
            )
        return PRETRAINED_HUB, ""
    return "file", choice


def starts_pretrained(model: ModelConfig) -> bool:
    """Whether the backbone starts from trained weights (hub or a file) rather than random ones."""
    return pretrained_source(model)[0] != PRETRAINED_NONE


@dataclass
class LossConfig:
    name: Literal["ms", "contrastive"] = _f("ms")
    ms_alpha: float = _f(2.0, lo=0.0)
    ms_beta: float = _f(50.0, lo=0.0)
    ms_lambda: float = _f(0.5)
    ms_eps: float = _f(0.1, lo=0.0)
    pos_margin: float = _f(0.0, lo=0.0)
    neg_margin: float = _f(1.0, lo=0.0)


@dataclass
class PretrainConfig:
    """SwAV continued pre-training on labeled + unlabeled images (labels ignored)."""

    steps: int = _f(200, lo=0)
    batch_size: int = _f(
        64, lo=2, help="images per optimizer step over all ranks and micro-batches (each rank takes its share)"
    )
    prototypes: int = _f(300, lo=2)
    proj_dim: int = _f(128, lo=2)
    temperature: float = _f(0.1, lo=1e-4)
    epsilon: float = _f(0.05, lo=1e-4)
    sinkhorn_iters: int = _f(3, lo=1)
    lr: float = _f(1e-3, lo=0.0)
    backbone_lr_mult: float | None = _f(
        None,
        lo=0.0,
        help="backbone lr = pretrain.lr x this; null (auto): 0.1 when the backbone starts from pretrained weights "
        "(model.pretrained hub or a file: SwAV refines them rather than erasing them), 1.0 from random weights",
    )
    freeze_prototypes_steps: int = _f(50, lo=0)
    freeze_backbone_steps: int = _f(0, lo=0, help="train only the projection head (+ prototypes) for the first steps")
    keep_better: bool = _f(
        True,
        help="hand on the better of the input weights and the SwAV output by kNN MAP@R (pooled backbone "
        "features) on the labeled train classes; false: always the output",
    )
    augment: AugmentConfig = _f(factory=swav_augment, help="augmentation of each SwAV view (SwAV's own defaults)")
    local_crops: int = _f(
        6, lo=0, help="multi-crop: V small crops per image besides the 2 global ones (SwAV: 6); 0: two views only"
    )
    local_crop_size: int | None = _f(
        None, lo=8, help="side of a local crop in pixels; null: data.image_size x 96 / 224 (SwAV's 96 px at 224), >= 16"
    )
    local_crop_scale_min: float = _f(0.05, lo=0.01, hi=1.0, help="RandomResizedCrop area scale range of a local crop")
    local_crop_scale_max: float = _f(0.14, lo=0.01, hi=1.0, help="RandomResizedCrop area scale range of a local crop")
    queue_length: int = _f(
        -1,
        lo=-1,
        help="global rows of the feature queue whose scores join the Sinkhorn input; -1 auto: when "
        "pretrain.batch_size x ranks < prototypes, the smallest multiple of that global batch >= 2 x prototypes, "
        "else none; 0: none",
    )
    queue_start_step: int | None = _f(
        None, lo=0, help="first step whose codes use the (full) queue; null: pretrain.freeze_prototypes_steps"
    )


SWAV_LR_MULT_PRETRAINED, SWAV_LR_MULT_RANDOM = 0.1, 1.0


def swav_backbone_lr_mult(cfg: Config) -> tuple[float, str]:
    """(the SwAV stage's backbone lr multiplier, why): pretrain.backbone_lr_mult when set, else 0.1
    for a backbone that starts from pretrained weights and 1.0 for one that starts from random
    weights (at 0.1 a random backbone barely moves: SwAV's steps would be spent on the heads)."""
    if cfg.pretrain.backbone_lr_mult is not None:
        return cfg.pretrain.backbone_lr_mult, "pretrain.backbone_lr_mult"
    if starts_pretrained(cfg.model):
        return SWAV_LR_MULT_PRETRAINED, "auto: the backbone starts from pretrained weights"
    return SWAV_LR_MULT_RANDOM, "auto: the backbone starts from random weights"


@dataclass
class TrainConfig:
    """Optimisation shared by the teacher and the student."""

    teacher_steps: int = _f(1000, lo=0)
    student_steps: int = _f(1000, lo=0)
    classes_per_batch: int = _f(
        8, lo=1, help="P of the labeled P x K batch of one optimizer step, over all ranks and micro-batches"
    )
    samples_per_class: int = _f(4, lo=2, help="K of the labeled P x K batch")
    optimizer: Literal["adamw", "sgd"] = _f("adamw")
    lr: float = _f(1e-4, lo=0.0, help="head learning rate")
    backbone_lr_mult: float = _f(0.1, lo=0.0)
    basis_lr_mult: float = _f(10.0, lo=0.0)
    weight_decay: float = _f(1e-4, lo=0.0)
    momentum: float = _f(0.9, lo=0.0, hi=1.0)
    warmup_steps: int = _f(50, lo=0)
    grad_clip: float = _f(10.0, lo=0.0, help="0 disables clipping")
    grad_accum: int = _f(1, lo=1)
    precision: Literal["auto", "fp32", "bf16"] = _f("auto", help="auto: bf16 on GPU, fp32 on CPU")
    zero_stage: int = _f(0, lo=0, hi=3)
    ckpt_every: int = _f(200, lo=1, result=False)
    log_every: int = _f(10, lo=1, result=False)
    eval_every: int = _f(0, lo=0, result=False, help="periodic eval during training (0: only at the end)")


@dataclass
class StudentConfig:
    init: Literal["teacher", "pretrain"] = _f("teacher")
    unlabeled_classes_per_batch: int = _f(
        8, lo=1, help="P of the pseudo-labeled P x K batch of one optimizer step, over all ranks and micro-batches"
    )
    unlabeled_samples_per_class: int = _f(4, lo=2)
    lambda1: float = _f(1.0, lo=0.0, help="weight of the ranking loss on mined unlabeled pairs")
    lambda2: float = _f(0.25, lo=0.0, help="weight of L_CE + L_SD")
    basis_warmup_steps: int = _f(100, lo=0, help="train W_a alone first, embeddings detached")
    lr_mult: float = _f(
        1.0,
        lo=0.0,
        help="the student's learning rates are train.lr's x this: a student whose step holds more images than "
        "its teacher's scales them (docs/SCALING.md: the square-root rule)",
    )
    ablation: Literal["full", "no_mining", "no_basis", "raw_pairs"] = _f("full")


@dataclass
class BasisConfig:
    scale: float = _f(16.0, lo=0.0, help="s of normalized softmax (temperature 1/s)")
    beta: float = _f(0.99, lo=0.0, hi=1.0, help="running-Gaussian momentum (must be < 1)")
    sd_grad: Literal["full", "damped"] = _f(
        "full",
        help="gradient of L_SD: full = the batch statistics' own gradient (values still the running Eq. 6 "
        "ones); damped = through the running update, scaled by 1 - beta",
    )
    margin: float = _f(0.5, lo=0.0, help="m of L_SD")
    lambda_sd: float = _f(1.0, lo=0.0, help="weight of the variance term of L_SD")


@dataclass
class MiningConfig:
    enabled: bool = _f(True)
    require_cluster_agreement: bool = _f(False, help="also require same/different pseudo label (non-literal reading)")


@dataclass
class PseudoConfig:
    """Embedding the unlabeled set and clustering it into pseudo labels."""

    embed_batch_size: int = _f(256, lo=1, result=False)
    k: int = _f(400, lo=2, help="number of k-means clusters")
    niter: int = _f(20, lo=1)
    max_points_per_centroid: int = _f(256, lo=1)
    init: Literal["auto", "kmeans++", "random"] = _f(
        "auto",
        help="k-means init; auto: kmeans++ up to kmeanspp_max_k centroids, random sample "
        "points above (kmeans++ costs O(k^2) on one rank)",
    )
    kmeanspp_max_k: int = _f(2048, lo=1, hi=65536, help="init=auto uses kmeans++ up to this k")
    spherical: bool = _f(True)
    backend: Literal["auto", "faiss_gpu", "torch", "faiss_cpu"] = _f("auto")
    chunk_size: int = _f(65536, lo=1, help="points per assignment chunk (bounds memory)")
    seed: int = _f(0, lo=0)
    gpu_tf32: bool = _f(True, help="torch backend on CUDA: TF32 distance matmuls (~8x faster on Hopper)")
    assign: Literal["auto", "exact", "ivf"] = _f(
        "auto",
        help="full assignment pass; ivf: through coarse lists (the two-level cells when "
        "trained two-level; FAISS backends); auto: ivf after two-level training on a "
        "FAISS backend where it computes >= 8x fewer distances, else exact",
    )
    ivf_nlist: int = _f(0, lo=0, help="coarse lists of the ivf assignment without two-level cells (0: about 4 sqrt(k))")
    ivf_nprobe: int = _f(16, lo=1, hi=2048, help="lists (two-level cells) searched per point by the ivf assignment")
    two_level: Literal["auto", "on", "off", True, False] = _f(
        "auto",
        help="two-level k-means: ~sqrt(k) coarse cells, then k-means inside each cell "
        "(k shared by cell size); auto: on from two_level_min_k (true/false = on/off: "
        "YAML reads a bare on/off as a boolean)",
    )
    two_level_min_k: int = _f(16384, lo=1, help="two_level=auto switches on from this k")
    coarse_k: int = _f(0, lo=0, help="coarse cells of two-level k-means (0: round(sqrt(k)))")
    two_level_refine_iters: int = _f(
        4, lo=0, hi=100, help="Lloyd iterations over all k centroids after the cells (repair cell boundaries)"
    )
    ckpt_every_iters: int = _f(
        5,
        lo=0,
        hi=10000,
        result=False,
        help="k-means checkpoint every this many Lloyd iterations (0: only when a stage ends)",
    )


@dataclass
class CurateConfig:
    """The unlabeled pool checked once, before anything reads it (the curate stage,
    slade_dist/pseudo/curate/): copies of test images out, near-duplicate groups down to one
    image; plus the cluster stage's balance cap and collapse warning (those act either way). A copy
    is found by a colour-histogram search (FAISS) and confirmed by a pixel check (copy_match:
    gradient maps correlated over crops, scales and small rotations, then the colours compared at
    the best alignment), every threshold calibrated."""

    enabled: bool = _f(
        False, help="run the curate stage (once, before pretrain); cluster and student use what it keeps"
    )
    decontaminate: bool = _f(True, help="remove pool images that are copies of a test / query / gallery image")
    hash_check: bool = _f(True, help="also remove pool images whose bytes equal a test image's (blake2b)")
    dedup: bool = _f(True, help="near-duplicate groups inside the pool keep one representative")
    candidates: int = _f(8, lo=1, hi=1024, help="nearest images by colour histogram checked per image (test and pool)")
    candidate_radius: float | None = _f(
        None,
        lo=0.0,
        hi=2.0,
        help="colour-histogram distance (unit vectors) within which a candidate is checked; null: calibrated",
    )
    radius_margin: float = _f(
        1.25,
        lo=1.0,
        hi=4.0,
        help="the calibrated candidate radius is this multiple of the copies' histogram-distance quantile: the "
        "radius only picks what gets the pixel check (which decides), so a margin keeps copies just beyond the "
        "calibration's tail at the cost of more checks",
    )
    match_threshold: float | None = _f(
        None,
        lo=-1.0,
        hi=1.0,
        help="pixel-check structure score (normalised cross-correlation of gradient maps, 1 = same picture) "
        "from which a candidate is a copy; null: calibrated (calibration.json beside the outputs)",
    )
    colour_threshold: float | None = _f(
        None,
        lo=0.0,
        hi=255.0,
        help="pixel-check colour difference (mean absolute RGB difference at the best alignment, grey levels) "
        "up to which a candidate is a copy (and its structure score passes too); null: calibrated",
    )
    calibration_images: int = _f(512, lo=16, help="test images given an edited copy each to calibrate the thresholds")
    copy_quantile: float = _f(
        0.998, lo=0.5, hi=1.0, help="the thresholds keep at least this share of the calibration copies (each)"
    )
    distinct_quantile: float = _f(
        0.005,
        lo=0.0,
        hi=0.5,
        help="the false-positive budget: where the two distributions allow it, each pixel-check threshold lies "
        "halfway to the value only this share of distinct test images reach with their best candidate",
    )
    copy_min_area: float = _f(0.75, lo=0.05, hi=1.0, help="copies: least area a crop keeps (calibration and search)")
    copy_max_rotation: float = _f(3.0, lo=0.0, hi=45.0, help="copies: rotation in [-d, d] degrees")
    copy_min_scale: float = _f(0.5, lo=0.1, hi=1.0, help="calibration copies: resize factor range [min, max]")
    copy_max_scale: float = _f(2.0, lo=1.0, hi=4.0, help="calibration copies: resize factor range [min, max]")
    copy_min_quality: int = _f(45, lo=5, hi=95, help="calibration copies: JPEG re-encode quality in [min, 95]")
    dedup_cell_size: int = _f(
        16384, lo=16, help="pool images per dedup cell (k-means cells of the histograms; search inside each)"
    )
    dedup_probe: int = _f(
        4, lo=1, hi=64, help="nearest cells an image is searched in (where a candidate could lie across a border)"
    )
    cluster_cap: float = _f(
        0.0,
        lo=0.0,
        help="cluster stage: the student draws at most this multiple of the mean cluster size from one cluster "
        "(its nearest members); 0: no cap",
    )
    collapse_share: float = _f(
        0.1,
        lo=0.0,
        hi=1.0,
        help="cluster stage: a WARNING when one cluster holds more than this share of the points (and more "
        "than twice an equal share)",
    )
    seed: int = _f(0, lo=0)


@dataclass
class EvalConfig:
    protocol: Literal["self", "query_gallery"] = _f("self")
    recall_k: list[int] = _f(factory=lambda: [1, 2, 4, 8], lo=1, nonempty=True, help="K of the Recall@K columns")
    batch_size: int = _f(256, lo=1, result=False)
    chunk_size: int = _f(8192, lo=1, result=False, help="query chunk of the exact kNN search")
    nmi: bool = _f(True)
    grid_queries: int = _f(
        8,
        lo=0,
        hi=200,
        help="retrieval grids (eval/retrieval_<model>.png + TensorBoard) of the teacher and the final model: "
        "this many queries, one per class first, drawn with run.seed; 0: no grids",
    )
    grid_k: int = _f(6, lo=1, hi=50, help="results shown per query in the retrieval grids")
    grid_tile: int = _f(96, lo=16, hi=512, result=False, help="side of one image in the retrieval grids, pixels")


@dataclass
class JobShape:
    """The shape of one stage's jobs: launch.shapes.<stage> (launch/README.md)."""

    nodes: int = _f(1, lo=1, help="nodes per job")
    gpus_per_node: int = _f(0, lo=0, help="GPUs per node (0: a CPU job)")
    tasks_per_node: int = _f(0, lo=0, help="0: one per GPU (or 1 without GPUs)")
    cpus_per_task: int = _f(2, lo=1, help="CPUs per task (data loader workers + 1)")
    mem_gb: int = _f(0, lo=0, help="0: Slurm default")
    time_min: int = _f(60, lo=1, help="time limit; at the limit the job is requeued and resumes")
    sbatch_extra: dict[str, Any] = _f(
        factory=dict, help="more sbatch options for this stage's jobs, over launch.sbatch_extra"
    )


@dataclass
class LaunchConfig:
    """How stages run as jobs (launch/submit.py; launch/README.md). Never part of a stage's identity."""

    cluster: Literal["auto", "slurm", "local", "debug"] = _f(
        "auto", help="auto: slurm when sbatch is on PATH or a job asks for more than one node, else local"
    )
    partition: str = _f("", help="Slurm partition ('' = the cluster's default)")
    account: str = _f("")
    qos: str = _f("")
    constraint: str = _f("", help="node features, e.g. a100")
    requeue: bool = _f(True, help="requeue at preemption / time limit; the stage resumes from its checkpoint")
    sbatch_extra: dict[str, Any] = _f(
        factory=dict,
        help="sbatch options passed through to every job (Slurm only), e.g. {exclusive: true, reservation: r1, "
        "gres: 'gpu:8', mem-per-gpu: 80G, comment: text}",
    )
    setup: list[str] = _f(
        factory=list, help="shell lines run in the job script before srun, e.g. ['module load cuda/12.1']"
    )
    shapes: dict[str, JobShape] = _f(
        factory=dict,
        help="each stage's job shape, by stage name, e.g. {student: {nodes: 4, gpus_per_node: 8}}; a stage "
        "not named here runs with the defaults",
    )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    # where each leaf key's value came from ("defaults", a file path, or "command line")
    _sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self) if not f.name.startswith("_")
        }

    def section_hash(self, keys: Sequence[str], extra: Mapping[str, Any] | None = None) -> str:
        """Short stable hash of the named sections / sub-sections / keys (+ extra facts): identifies
        a stage's work. Knobs marked result=False (logging, checkpoint cadence, workers) are left out."""
        payload = {k: _results_only(_to_plain(self.get(k)), self.get(k)) for k in keys if self._result(k)}
        if extra:
            payload["_extra"] = dict(extra)
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def _result(self, key: str) -> bool:
        """Whether a dotted key may change a result (False for a field marked result=False)."""
        parent, _, leaf = key.rpartition(".")
        owner = self.get(parent) if parent else self
        return next(f for f in dataclasses.fields(owner) if f.name == leaf).metadata.get("result", True)

    def hash(self) -> str:
        return self.section_hash(
            [f.name for f in dataclasses.fields(self) if not f.name.startswith("_") and f.name != "launch"]
        )

    def source_of(self, key: str) -> str:
        return self._sources.get(key, "defaults")

    def require_inputs(self, *keys: str) -> None:
        """Fail clearly unless each dotted key names a non-empty, existing path."""
        for key in keys:
            value = self.get(key)
            if not value:
                raise ConfigError(f"{key} must be set for this stage (set it in your run file or pass {key}=PATH)")
            if not Path(value).exists():
                raise ConfigError(f"{key}: path {value!r} does not exist (from {self.source_of(key)})")

    def get(self, dotted: str) -> Any:
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the resolved config (atomically) and return the path."""
        return atomic_write_text(path, f"# resolved slade_dist config, hash {self.hash()}\n" + self.dump_yaml())


SECTIONS = [f.name for f in dataclasses.fields(Config) if not f.name.startswith("_")]


def _results_only(plain: Any, obj: Any) -> Any:
    """`plain` (a section as a dict) without the fields of `obj` marked result=False."""
    if not dataclasses.is_dataclass(obj):
        return plain
    return {
        f.name: _results_only(plain[f.name], getattr(obj, f.name))
        for f in dataclasses.fields(obj)
        if f.metadata.get("result", True) and f.name in plain
    }


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(x) for x in obj]
    return obj


# --------------------------------------------------------------------------------------- loading
# Not OmegaConf (evaluated for issue 21): 2.3 has no Literal fields (15 here would become Enums), no
# per-key source, ranges or did-you-mean, which we would keep writing around it; and its antlr4 runtime
# is not in this project's local package index, so it cannot be installed from local disk.
def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema (what --help and suggestions show)."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(valid_keys(t, f"{prefix}{f.name}."))
        elif _dict_of_sections(t):  # launch.shapes.<stage>.nodes
            keys.extend(valid_keys(typing.get_args(t)[1], f"{prefix}{f.name}.<stage>."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _dict_of_sections(tp: Any) -> bool:
    return typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1])


def _suggest(key: str, candidates: Sequence[str]) -> str:
    # a <stage> placeholder (launch.shapes.<stage>.nodes) stands for each word of the key in turn
    named = list(dict.fromkeys(c.replace("<stage>", w) for c in candidates for w in key.split(".")))
    close = difflib.get_close_matches(key, named, n=3, cutoff=0.5)
    if not close:  # a right leaf in the wrong section ("lr" -> "train.lr")
        leaf = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf][:3]
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _merge(
    base: dict[str, Any], layer: Mapping[str, Any], source: str, sources: dict[str, str], prefix: str = ""
) -> None:
    """Deep-merge `layer` into `base`, recording the source of every leaf it sets."""
    for k, v in layer.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v, source, sources, key + ".")
        else:
            base[k] = v
            sources[key] = source
            if isinstance(v, Mapping):
                for leaf in _leaves(v, key + "."):
                    sources[leaf] = source


def _leaves(d: Mapping[str, Any], prefix: str) -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.extend(_leaves(v, f"{prefix}{k}."))
        else:
            out.append(f"{prefix}{k}")
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so 3 -> int, true -> bool, [1,2] -> list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _check_type(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    where = f"{key} (from {source})"
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        arg = next(a for a in typing.get_args(tp) if a is not type(None))
        return _check_type(value, arg, key, source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls: type, data: Mapping[str, Any], sources: dict[str, str], prefix: str, all_keys: Sequence[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            if isinstance(v, Mapping):  # an unknown section: name the full key the user wrote
                key = next(iter(_leaves(v, key + ".")), key)
            src = sources.get(key, "?")
            hint = _suggest(key, all_keys)
            raise ConfigError(
                f"unknown config key {key!r} (from {src}). {hint}".rstrip()
                + (
                    f"\nvalid keys in {prefix.rstrip('.') or 'the top level'}: "
                    f"{', '.join(sorted(prefix + n for n in names))}"
                )
            )
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build_section(tp, v, sources, key, all_keys)
            continue
        if _dict_of_sections(tp):  # {name: section}, e.g. launch.shapes
            _check_type(v, dict, key, sources.get(key, "?"))
            item = typing.get_args(tp)[1]
            kwargs[k] = {n: _build_section(item, sub, sources, f"{key}.{n}", all_keys) for n, sub in v.items()}
            continue
        src = sources.get(key, "defaults")
        val = _check_type(v, tp, key, src)
        meta = names[k].metadata
        lo, hi = meta.get("lo"), meta.get("hi")
        if meta.get("nonempty") and (val == "" or val == []):
            raise ConfigError(f"{key} (from {src}) must not be empty")
        for item in val if isinstance(val, list) else [val]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key} (from {src}): {item!r} is not a finite number")
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                if lo is not None and item < lo:
                    raise ConfigError(f"{key} (from {src}): {item!r} is below the minimum {lo}")
                if hi is not None and item > hi:
                    raise ConfigError(f"{key} (from {src}): {item!r} is above the maximum {hi}")
        kwargs[k] = val
    return cls(**kwargs)


def _build_section(cls: type, v: Any, sources: dict[str, str], key: str, all_keys: Sequence[str]) -> Any:
    if not isinstance(v, Mapping):
        raise ConfigError(
            f"{key} (from {sources.get(key, '?')}) must be a mapping of {', '.join(valid_keys(cls))}, got {v!r}"
        )
    return _build(cls, v, sources, key + ".", all_keys)


def check_section(obj: Any, key: str) -> None:
    """The load checks of types, choices and ranges for a section built in code (e.g. the
    PseudoConfig a bench hands to k-means): the ConfigError a run file with these values would get."""
    plain = _to_plain(obj)
    _build(type(obj), plain, dict.fromkeys(_leaves(plain, f"{key}."), "code"), f"{key}.", valid_keys())


def _check_values(cfg: Config) -> None:
    """Checks that span a field's own type and range (run before any stage or job starts)."""
    _check_basis_beta(cfg)
    for key in ("data.augment", "pretrain.augment"):
        _check_augment(cfg, key)
    _check_local_crops(cfg)
    _check_pretrained(cfg)
    b = cfg.model.backbone
    if b not in BACKBONE_NAMES and not (b.startswith("timm:") and len(b) > 5):
        hint = _suggest(b, BACKBONE_NAMES)
        raise ConfigError(
            f"model.backbone (from {cfg.source_of('model.backbone')}): unknown backbone {b!r}; "
            f"choose one of {', '.join(BACKBONE_NAMES)} or timm:<model name>. {hint}".rstrip()
        )


def _check_pretrained(cfg: Config) -> None:
    """model.pretrained against model.pretrained_path and the backbone; a path given as
    model.pretrained moves to model.pretrained_path, the one key the stages read a file from (its
    content is part of the pretrain stage's identity), so both spellings are the same work."""
    try:
        kind, path = pretrained_source(cfg.model)
    except ConfigError as e:
        where = f"{cfg.source_of('model.pretrained')} / {cfg.source_of('model.pretrained_path')}"
        raise ConfigError(f"{e} (from {where})") from None
    if kind == "file" and not cfg.model.pretrained_path:
        cfg._sources["model.pretrained_path"] = f"{cfg.source_of('model.pretrained')}, as model.pretrained"
        cfg.model.pretrained_path, cfg.model.pretrained = path, PRETRAINED_NONE


def _check_basis_beta(cfg: Config) -> None:
    """beta = 1 would freeze each running Gaussian at its first batch (and give L_SD no gradient
    in the damped mode): the bound is exclusive, which _f's inclusive bounds cannot say."""
    if cfg.basis.beta >= 1.0:
        raise ConfigError(
            f"basis.beta (from {cfg.source_of('basis.beta')}) = {cfg.basis.beta} must be below 1: with beta = 1 "
            f"the running Gaussians never move from their first batch; the paper uses 0.99"
        )


def _check_ordered(cfg: Config, lo_key: str, hi_key: str) -> None:
    """A [min, max] range given as two keys must be ordered."""
    lo, hi = cfg.get(lo_key), cfg.get(hi_key)
    if lo > hi:
        raise ConfigError(
            f"{lo_key} = {lo} is above {hi_key} = {hi} (from {cfg.source_of(lo_key)} / {cfg.source_of(hi_key)})"
        )


def _check_augment(cfg: Config, key: str) -> None:
    for name in ("crop_scale", "crop_ratio", "blur_sigma"):
        lo_key = f"{key}.{name}_min"
        if cfg.get(lo_key) is None:  # crop_scale_min null: data.crop_scale_min
            lo_key = "data.crop_scale_min"
        _check_ordered(cfg, lo_key, f"{key}.{name}_max")


def _check_local_crops(cfg: Config) -> None:
    """SwAV's local crops: an ordered scale range, and smaller than the global crops."""
    pc = cfg.pretrain
    _check_ordered(cfg, "pretrain.local_crop_scale_min", "pretrain.local_crop_scale_max")
    if pc.local_crops and pc.local_crop_size is not None and pc.local_crop_size > cfg.data.image_size:
        raise ConfigError(
            f"pretrain.local_crop_size (from {cfg.source_of('pretrain.local_crop_size')}) = {pc.local_crop_size} "
            f"is larger than the global crops (data.image_size = {cfg.data.image_size}): local crops are the "
            f"small views; set it below {cfg.data.image_size} or null"
        )


def _check_data_fits(cfg: Config) -> None:
    """P of the labeled P x K batch needs at least P classes in data.train_shards/classes.json."""
    classes = Path(cfg.data.train_shards) / "classes.json" if cfg.data.train_shards else None
    if classes is None or not classes.is_file():
        return
    n = len(json.loads(classes.read_text()))
    P = cfg.train.classes_per_batch
    if P > n:
        raise ConfigError(
            f"train.classes_per_batch (from {cfg.source_of('train.classes_per_batch')}) = {P}, "
            f"but {classes} lists only {n} classes: a P x K batch needs P distinct classes; "
            f"set train.classes_per_batch <= {n}"
        )


def missing_input_paths(cfg: Config, obj: Any = None, prefix: str = "") -> list[str]:
    """Every input-path key that is set but names nothing on disk, as "key (from source): ..."."""
    missing: list[str] = []
    for f in dataclasses.fields(cfg if obj is None else obj):
        if f.name.startswith("_"):
            continue
        v, key = getattr(cfg if obj is None else obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            missing += missing_input_paths(cfg, v, key + ".")
        elif f.metadata.get("input_path") and v and not Path(v).exists():
            missing.append(f"{key} (from {cfg.source_of(key)}): input path {v!r} does not exist")
    return missing


def load_config(
    run_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    *,
    defaults_file: str | os.PathLike[str] | None = None,
    check_paths: bool = True,
) -> Config:
    """defaults.yaml -> run file -> key=value overrides, validated into a Config.

    Relative paths in configs resolve against the current directory (run from the repo root, as
    the README does). check_paths=False skips the input-path existence check (e.g. before the demo
    data has been generated).
    """
    sources: dict[str, str] = {}
    merged: dict[str, Any] = {}
    dpath = Path(defaults_file) if defaults_file else DEFAULTS_FILE
    if dpath.exists():
        _merge(merged, _read_yaml(dpath), str(dpath), sources)
    if run_file:
        rpath = Path(run_file)
        layer = _read_yaml(rpath)
        _merge(merged, layer, str(rpath), sources)
    for text in overrides:
        key, value = parse_override(text)
        _merge(merged, _nest(key, value), "command line", sources)
    _read_old_job_shapes(merged.get("launch"), sources)
    all_keys = valid_keys()
    cfg = _build(Config, merged, sources, "", all_keys)
    cfg._sources = sources
    _check_values(cfg)
    if check_paths:
        for missing in missing_input_paths(cfg)[:1]:
            raise ConfigError(missing)
        _check_data_fits(cfg)
    return cfg


# the job-shape keys of configs written before launch.shapes (a run dir's config.yaml, old run files)
_OLD_JOB_SHAPES = {s: s for s in ("pretrain", "teacher", "embed", "student", "eval")} | {"cluster_job": "cluster"}


def _read_old_job_shapes(launch: Any, sources: dict[str, str]) -> None:
    """launch.<stage> (and launch.cluster_job) read as launch.shapes.<stage>, with a warning; a key
    also set in launch.shapes keeps that value."""
    if not isinstance(launch, dict):
        return
    for old, stage in _OLD_JOB_SHAPES.items():
        if not isinstance(launch.get(old), Mapping):
            continue
        shape = launch.pop(old)
        if not isinstance(launch.get("shapes"), dict):
            launch["shapes"] = {}
        launch["shapes"][stage] = {**shape, **launch["shapes"].get(stage, {})}
        source = "?"
        for leaf in shape:
            source = sources.pop(f"launch.{old}.{leaf}", source)
            sources.setdefault(f"launch.shapes.{stage}.{leaf}", source)
        warnings.warn(
            f"launch.{old} (from {source}) is the old spelling of launch.shapes.{stage}: read as that", stacklevel=3
        )


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def section_doc(obj: object, full: bool = False) -> str:
    """A section's docstring, its first sentence unless `full` (dataclasses without one get a
    generated signature: none)."""
    doc = " ".join((type(obj).__doc__ or "").split())
    if doc.startswith(type(obj).__name__ + "("):
        return ""
    return doc if full else doc.split(". ")[0].rstrip(".")


def describe_keys(obj: object, base: object, prefix: str, keep: Callable[[str], bool]) -> list[str]:
    """One entry per key under `prefix` that `keep` keeps: name, resolved value (the default too
    where it differs), help text; nested sections (e.g. a section's own sub-section) recursively."""
    lines = []
    for f in dataclasses.fields(obj):
        value, default, key = getattr(obj, f.name), getattr(base, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            inner = describe_keys(value, default, key, keep)
            if inner:
                lines.append(f"    {key}:" + (f"  {section_doc(value)}" if section_doc(value) else ""))
            lines.extend(inner)
            continue
        if not keep(key):
            continue
        shown = _shown(value) + (f" (default {_shown(default)})" if value != default else "")
        text = f.metadata.get("help", "")
        lines.append(f"    {key:32s} {shown}" + (f"\n        {text}" if text else ""))
    return lines


DEFAULTS_HEADER = """\
# slade_dist defaults: every knob with its default. Run files (configs/*.yaml) override a few;
# the command line overrides those (section.key=value). Unknown keys fail at load.
# Generated from slade_dist/config.py (the help text is there): python -m slade_dist show-config --defaults
"""


def defaults_yaml() -> str:
    """configs/defaults.yaml, written from the schema: every key with its default and help text."""
    lines = [DEFAULTS_HEADER]
    for f in dataclasses.fields(Config):
        if not f.name.startswith("_"):
            section = getattr(Config(), f.name)
            lines += [*_yaml_key(f.name, section_doc(section, full=True), "", ""), *_yaml_fields(section, "  "), ""]
    return "\n".join(lines)


def _yaml_fields(obj: Any, indent: str) -> list[str]:
    lines: list[str] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, text = getattr(obj, f.name), f.metadata.get("help", "")
        if dataclasses.is_dataclass(value):
            lines += [*_yaml_key(f.name, text or section_doc(value), "", indent), *_yaml_fields(value, indent + "  ")]
        elif _dict_of_sections(hints[f.name]):  # an example entry, commented out: the dict is empty
            example = _yaml_fields(typing.get_args(hints[f.name])[1](), indent + "    ")
            lines += _yaml_key(f.name, text, "{}", indent, [f"{indent}  <name>:", *example])
        else:
            plain = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("\n...\n").strip()
            lines += _yaml_key(f.name, text, plain, indent)
    return lines


def _yaml_key(name: str, text: str, value: str, indent: str, example: Sequence[str] = ()) -> list[str]:
    """`name: value  # text`, the text above the key when the line would pass 120 characters."""
    line = f"{indent}{name}:{' ' + value if value else ''}"
    if text and len(line) + len(text) + 4 <= 120 and not example:
        return [f"{line}  # {text}"]
    above = [f"{indent}# {t}" for t in textwrap.wrap(text, 116 - len(indent))]
    return [*above, *(f"{indent}#{ln[len(indent) - 1 :]}" for ln in example), line]


def describe_sections() -> str:
    """One line per section with its keys (for --help); a sub-section's keys named once."""
    hints = typing.get_type_hints(Config)
    lines = []
    for name in SECTIONS:
        sub = typing.get_type_hints(hints[name])
        keys = []
        for f in dataclasses.fields(hints[name]):
            inner = sub[f.name] if dataclasses.is_dataclass(sub[f.name]) else None
            if _dict_of_sections(sub[f.name]):
                inner, f_name = typing.get_args(sub[f.name])[1], f"{f.name}.<stage>"
            else:
                f_name = f.name
            keys.append(f"{f_name}.{{{','.join(g.name for g in dataclasses.fields(inner))}}}" if inner else f_name)
        lines.append(f"  {name:9s} {', '.join(keys)}")
    return "\n".join(lines)


def step_share(total: int, key: str, world: int, grad_accum: int = 1) -> int:
    """Each rank's share per micro-batch of a per-step count (train.classes_per_batch,
    student.unlabeled_classes_per_batch, pretrain.batch_size: the batch of one optimizer step over
    every rank and every micro-batch of train.grad_accum). A count that does not divide fails
    naming the two nearest values that do. Torch-free: the launcher checks job shapes with it."""
    parts = world * grad_accum
    if total % parts:
        lower, upper = total // parts * parts, (total // parts + 1) * parts
        fix = " or ".join(f"{key}={v}" for v in (lower, upper) if v > 0)
        raise ConfigError(
            f"{key} = {total} per optimizer step is shared by {world} rank(s) x {grad_accum} micro-batch(es) "
            f"(train.grad_accum): it must be a multiple of {parts}; set {fix} (or change the job's GPUs / "
            f"train.grad_accum)"
        )
    return total // parts
