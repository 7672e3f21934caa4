"""Benchmark (framework sanity): our teacher stage vs a plain PyTorch loop, test MAP@R on the demo.

Both train the same recipe from the same initial weights (torch.manual_seed(seed) -> tiny_cnn
embedder, no pretrain stage):
- ours:     `python -m slade_dist teacher` in process (runner.run_stage: DeepSpeed engine, streaming
            shard readers, P x K batcher, checkpoints), configs/demo.yaml;
- baseline: written here: the labeled train images decoded once and held in memory, a P x K
            sampler (P random classes, K random images of each), the same augmentation
            (data/transforms.train_geometry of data.augment), the multi-similarity loss
            (slade_dist.losses), AdamW with the same groups (backbone lr x backbone_lr_mult,
            head lr, weight decay), linear warmup + cosine decay, gradient clipping, train.teacher_steps.
Both exports are measured by the same eval (eval/stage.py evaluate_model: MAP@R on the test
classes). Over seeds (3 by default); goal: mean MAP@R ours / baseline >= 0.98.
--quick: the demo at 32 px (crops 28) and 120 steps, 1 seed unless --seeds is given.
The last line is one JSON object: {"bench": "teacher_quality", "ours", "baseline", "unit", "ratio", ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from _demo import ROOT, config, metrics_of, prepare_data

from slade_dist.config import Config
from slade_dist.data.readers import iter_shard, resolve_shards
from slade_dist.data.transforms import normalize_batch, train_geometry
from slade_dist.losses import build_loss
from slade_dist.models import build_embedder, save_weights
from slade_dist.runner import run_stage
from slade_dist.stages import RunLayout


def load_labeled(shard_dir: str) -> tuple[list[torch.Tensor], list[int]]:
    """Every labeled train image as a uint8 (3, H, W) tensor, with its class."""
    images, labels = [], []
    for path in resolve_shards(shard_dir):
        for _key, img, cls, _meta in iter_shard(path):
            images.append(img)
            labels.append(int(cls))
    return images, labels


def pk_batches(labels: list[int], P: int, K: int, seed: int):
    """Endless P x K index batches: P distinct classes, K images each (with replacement if fewer)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    classes = sorted(by_class)
    while True:
        batch = []
        for c in rng.sample(classes, P):
            members = by_class[c]
            batch += rng.sample(members, K) if len(members) >= K else rng.choices(members, k=K)
        yield batch


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup (the first step already moves), cosine decay to 0."""
    warm = min(warmup, total)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * min((step - warm) / max(total - warm, 1), 1.0)))


def plain_teacher(cfg: Config, seed: int, out: Path) -> Path:
    """The baseline loop; returns its exported weights (save_weights format, for the same eval)."""
    torch.manual_seed(seed)
    model = build_embedder(cfg.model)
    tc = cfg.train
    parts = model.param_groups()
    opt = torch.optim.AdamW(
        [
            {"params": parts["backbone"], "lr": tc.lr * tc.backbone_lr_mult},
            {"params": parts["head"], "lr": tc.lr},
        ],
        weight_decay=tc.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc.teacher_steps, tc.warmup_steps))
    loss_fn = build_loss(cfg.loss)
    geometry = train_geometry(cfg.data.image_size, cfg.data.crop_scale_min, cfg.data.augment)
    images, labels = load_labeled(cfg.data.train_shards)
    y_all = torch.tensor(labels)
    batches = pk_batches(labels, tc.classes_per_batch, tc.samples_per_class, seed)
    model.train()
    for _ in range(tc.teacher_steps):
        idx = next(batches)
        x = normalize_batch(torch.stack([geometry(images[i]) for i in idx]))
        loss = loss_fn(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
    return save_weights(out, model, cfg.model, extra={"stage": "plain_teacher", "seed": seed})


def ours_teacher(cfg: Config) -> Path:
    run_stage(cfg, "teacher", force=True)
    return RunLayout(cfg.run.dir).stage_dir("teacher") / "final.pt"


def one_seed(bench_dir: Path, data: list[str], seed: int, steps: int) -> dict[str, float]:
    run_dir = bench_dir / f"teacher_quality-s{seed}"
    cfg = config(run_dir, data, f"run.seed={seed}", f"train.teacher_steps={steps}", "train.eval_every=0")
    t0 = time.time()
    ours = metrics_of(ours_teacher(cfg), cfg)
    t1 = time.time()
    base = metrics_of(plain_teacher(cfg, seed, run_dir / "plain_teacher.pt"), cfg)
    t2 = time.time()
    row = {"seed": seed, "ours": ours["map_at_r"], "baseline": base["map_at_r"]}
    print(f"seed {seed}: MAP@R ours {row['ours']:.4f} ({t1 - t0:.0f}s), plain {row['baseline']:.4f} ({t2 - t1:.0f}s)")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 px demo, 120 steps, 1 seed")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="teacher steps (default: demo.yaml's, --quick 120)")
    ap.add_argument("--dir", default=str(ROOT / "runs" / "bench"), help="where data and runs go")
    args = ap.parse_args()
    bench_dir = Path(args.dir)
    seeds = args.seeds or (1 if args.quick else 3)
    data = prepare_data(bench_dir, args.quick)
    steps = args.steps or (120 if args.quick else config(bench_dir / "_", data).train.teacher_steps)
    rows = [one_seed(bench_dir, data, seed, steps) for seed in range(seeds)]
    ours = statistics.mean(r["ours"] for r in rows)
    base = statistics.mean(r["baseline"] for r in rows)
    print(
        json.dumps(
            {
                "bench": "teacher_quality",
                "ours": round(ours, 4),
                "baseline": round(base, 4),
                "unit": "MAP@R",
                "ratio": round(ours / base, 4),
                "seeds": seeds,
                "steps": steps,
                "quick": args.quick,
                "per_seed": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
