"""Benchmark: our DeepSpeed training step (slade_dist.train.engine.Trainer) vs a bare PyTorch loop.

One rank, one process, the same model, batch and loss, data in memory (no loader in the timing):
- ours:     Trainer.forward -> multi-similarity loss -> Trainer.backward + step_optimizer (DeepSpeed engine
            with the training defaults: AdamW groups, warmup+cosine schedule, gradient clipping)
- baseline: model(x) -> the same loss -> loss.backward() -> AdamW.step() -> zero_grad
CPU (default): tiny_cnn at 64 px and resnet18 at 64 px (--quick: 32 px), P x K = 8 x 4, fp32, one
thread. The two loops alternate in blocks and the median block rate of each is reported; on CPU
the rate is steps per second of this process' CPU time (time.process_time), so load from other
processes on a shared machine does not skew the ratio (wall-clock rates are printed too).
Goal: ratio ours/baseline >= 0.95.
--gpu (needs CUDA; otherwise prints a message and exits 0): ResNet-50 at 224 px, bf16 autocast,
batch 256; ours (engine, torch.compile'd module) vs a plain torch.compile'd loop with fused AdamW;
images/s and ratio.
--quick: fewer steps (under a minute on 2 CPU cores). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slade_dist.config import LossConfig, ModelConfig, TrainConfig  # noqa: E402
from slade_dist.losses import build_loss  # noqa: E402
from slade_dist.models import build_embedder  # noqa: E402
from slade_dist.train import engine as E  # noqa: E402
from slade_dist.train.common import embedder_groups  # noqa: E402


def make_batch(P: int, K: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(P * K, 3, size, size, generator=g)
    y = torch.arange(P).repeat_interleave(K)
    return x.to(device), y.to(device)


def build(backbone: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_embedder(ModelConfig(backbone=backbone, embed_dim=128, freeze_bn=True))


def ours_step_fn(backbone: str, tcfg: TrainConfig, batch: tuple, stage_dir: str, compile_: bool = False):
    model = build(backbone)
    tr = E.Trainer(
        model, embedder_groups(model, tcfg), tcfg, stage_dir=stage_dir, total_steps=10**6, micro_batch=batch[0].shape[0]
    )
    if compile_:
        tr.engine.compile()
    loss_fn = build_loss(LossConfig())
    x, y = batch

    def step() -> float:
        loss = loss_fn(tr.forward(x).float(), y)
        tr.backward(loss)
        tr.step_optimizer()
        return float(loss.detach())

    return step


def baseline_step_fn(backbone: str, tcfg: TrainConfig, batch: tuple, bf16: bool = False, compile_: bool = False):
    model = build(backbone).to(batch[0].device)
    model.train()
    groups = model.param_groups()
    opt = torch.optim.AdamW(
        [
            {"params": groups["backbone"], "lr": tcfg.lr * tcfg.backbone_lr_mult},
            {"params": groups["head"], "lr": tcfg.lr},
        ],
        weight_decay=tcfg.weight_decay,
        fused=batch[0].is_cuda or None,
    )
    fwd = torch.compile(model) if compile_ else model
    loss_fn = build_loss(LossConfig())
    x, y = batch

    def step() -> float:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = fwd(x)
        loss = loss_fn(emb.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def time_block(step, n: int, sync, clock) -> float:
    """Steps per second (of `clock`) over n steps."""
    sync()
    t0 = clock()
    for _ in range(n):
        step()
    sync()
    return n / max(clock() - t0, 1e-9)


def compare(
    step_ours, step_base, blocks: int, per_block: int, warmup: int, sync, clock=time.perf_counter
) -> tuple[float, float]:
    for _ in range(warmup):
        step_ours()
        step_base()
    ours, base = [], []
    for b in range(blocks):  # alternate the order so neither always runs right after the other
        pair = [(step_ours, ours), (step_base, base)]
        for fn, acc in pair if b % 2 == 0 else pair[::-1]:
            acc.append(time_block(fn, per_block, sync, clock))
    return statistics.median(ours), statistics.median(base)


def cpu_bench(quick: bool) -> dict:
    torch.set_num_threads(1)  # per-step overhead, not thread scaling; stable on a shared machine
    tcfg = TrainConfig(precision="fp32")
    rows = {}
    specs = [("tiny_cnn", 64, 8, 4), ("resnet18", 32 if quick else 64, 8, 4)]
    blocks, per_block, warmup = (3, 3, 1) if quick else (5, 8, 3)
    for backbone, size, P, K in specs:
        batch = make_batch(P, K, size, torch.device("cpu"))
        with tempfile.TemporaryDirectory() as d:
            ours = ours_step_fn(backbone, tcfg, batch, d)
            base = baseline_step_fn(backbone, tcfg, batch)
            wall0 = time.perf_counter()
            o, b = compare(ours, base, blocks, per_block, warmup, lambda: None, clock=time.process_time)
            wall = time.perf_counter() - wall0
        rows[backbone] = {
            "ours_steps_per_cpu_s": round(o, 3),
            "baseline_steps_per_cpu_s": round(b, 3),
            "ratio": round(o / b, 3),
            "images": P * K,
            "px": size,
            "wall_s": round(wall, 1),
        }
        print(
            f"{backbone:9s} {size}px batch {P * K}: ours {o:7.2f} steps/cpu-s  bare torch {b:7.2f} steps/cpu-s  "
            f"ratio {o / b:.3f}  ({wall:.0f} s wall)",
            flush=True,
        )
    return rows


def gpu_bench(quick: bool) -> dict | None:
    if not torch.cuda.is_available():
        print("--gpu: no CUDA GPU visible on this machine; skipping the ResNet-50 bf16 benchmark.", flush=True)
        return None
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    tcfg = TrainConfig(precision="bf16")
    batch = make_batch(64, 4, 224, torch.device("cuda"))
    batch = (batch[0].contiguous(memory_format=torch.channels_last), batch[1])
    blocks, per_block, warmup = (3, 5, 5) if quick else (5, 10, 10)
    with tempfile.TemporaryDirectory() as d:
        ours = ours_step_fn("resnet50", tcfg, batch, d, compile_=True)
        base = baseline_step_fn("resnet50", tcfg, batch, bf16=True, compile_=True)
        o, b = compare(ours, base, blocks, per_block, warmup, torch.cuda.synchronize)
    n = batch[0].shape[0]
    print(
        f"resnet50 224px bf16 batch {n}: ours {o * n:8.1f} img/s  compiled torch {b * n:8.1f} img/s  ratio {o / b:.3f}",
        flush=True,
    )
    return {"ours_images_s": round(o * n, 1), "baseline_images_s": round(b * n, 1), "ratio": round(o / b, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (under a minute on 2 CPU cores)")
    ap.add_argument("--gpu", action="store_true", help="ResNet-50 224px bf16 batch 256 on CUDA (skips without)")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if args.gpu:
        res = gpu_bench(args.quick)
        if res is None:
            print(
                json.dumps(
                    {
                        "bench": "trainer_gpu",
                        "ours": None,
                        "baseline": None,
                        "unit": "images/s",
                        "ratio": None,
                        "skipped": "no CUDA GPU",
                    }
                )
            )
            return 0
        print(
            json.dumps(
                {
                    "bench": "trainer_gpu_resnet50_bf16",
                    "ours": res["ours_images_s"],
                    "baseline": res["baseline_images_s"],
                    "unit": "images/s",
                    "ratio": res["ratio"],
                }
            )
        )
        return 0
    rows = cpu_bench(args.quick)
    ratios = [r["ratio"] for r in rows.values()]
    r18 = rows["resnet18"]
    print(
        json.dumps(
            {
                "bench": "trainer_cpu",
                "ours": r18["ours_steps_per_cpu_s"],
                "baseline": r18["baseline_steps_per_cpu_s"],
                "unit": f"steps per CPU-second (resnet18 {r18['px']}px batch 32, 1 thread)",
                "ratio": r18["ratio"],
                "min_ratio": min(ratios),
                "models": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
