"""The student's optimizer step on one device, for bench/gpu_check.py (and a CPU smoke run).

`student_rate` runs the REAL student objective (train/student.py StudentObjective: embedder, W_a,
L_CE, L_SD, Eq. 7 mining, the ranking losses) through the REAL Trainer (DeepSpeed engine) and step
loop (train/loop.py optimizer_step) at a given per-device shape, fed one fixed batch already on the
device (the loaders are measured by bench/loader.py; this is the GPU's side of a step). It reports
images/s and peak device memory. web.yaml's shape is 4 labeled + 512 pseudo-labeled images per GPU
per step; the paper-size configs' old 8-GPU shape was 4 + 4, which leaves a GPU waiting on latency.

`collectives_check` runs the collectives the losses use (dist.gather_rows, dist.sum_over_ranks,
staged_all_reduce_sum) on the process group the process holds (NCCL on a GPU machine) and checks
their values and gradients.

  python bench/_gpu_steps.py           # CPU smoke: tiny_cnn at 32 px, 4 + 8 and 4 + 16 images
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

K = 4  # samples per (pseudo-)class, as every shipped config


def _fixed_stream(n: int, size: int, device: torch.device, salt: int):
    """One P x K batch (n images, n // K classes) made once on the device and yielded forever."""
    g = torch.Generator(device="cpu").manual_seed(salt)
    labels = torch.arange(n // K).repeat_interleave(K)
    images = torch.randn(n, 3, size, size, generator=g).to(device)
    batch = {"images": images, "labels": labels.to(device), "skipped": 0}
    while True:
        yield batch


def student_rate(
    device: torch.device,
    labeled: int,
    unlabeled: int,
    *,
    backbone: str = "resnet50",
    size: int = 224,
    precision: str = "bf16",
    steps: int = 6,
    warmup: int = 2,
    run_dir: Path | None = None,
    basis_classes: int = 100,  # W_a's rows: the labeled set's classes (CUB's 100 train classes)
) -> dict:
    """Images/s of the student's optimizer step at `labeled` + `unlabeled` images per device."""
    from slade_dist.basis import FeatureBasis
    from slade_dist.config import load_config
    from slade_dist.losses import build_loss
    from slade_dist.models import build_embedder
    from slade_dist.train.engine import Trainer
    from slade_dist.train.loop import optimizer_step
    from slade_dist.train.student import StudentNet, StudentObjective, param_groups

    run_dir = run_dir or Path("/tmp") / f"slade-gpu-steps-{uuid.uuid4().hex[:8]}"
    classes = labeled // K
    cfg = load_config(
        None,
        [
            f"run.dir={run_dir}",
            f"model.backbone={backbone}",
            "model.pretrained=none",
            f"data.image_size={size}",
            f"train.classes_per_batch={classes}",
            f"train.samples_per_class={K}",
            f"student.unlabeled_classes_per_batch={unlabeled // K}",
            f"student.unlabeled_samples_per_class={K}",
            "student.basis_warmup_steps=0",  # every timed step trains the trunk and all SLADE terms
            f"train.precision={precision}",
        ],
        check_paths=False,
    )
    torch.manual_seed(0)
    emb = build_embedder(cfg.model)
    b = cfg.basis
    net = StudentNet(emb, FeatureBasis(basis_classes, emb.embed_dim, b.scale, b.beta, b.margin, b.lambda_sd, b.sd_grad))
    total = warmup + steps
    trainer = Trainer(
        net, param_groups(net, cfg), cfg.train, stage_dir=run_dir, total_steps=total, micro_batch=labeled + unlabeled
    )
    objective = StudentObjective(
        cfg,
        trainer,
        build_loss(cfg.loss),
        _fixed_stream(labeled, size, device, 1),
        _fixed_stream(unlabeled, size, device, 2),
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    scalars: dict = {}
    for step in range(total):
        if step == warmup:
            sync(device)
            t = time.perf_counter()
        _, scalars = optimizer_step(trainer, objective, step, [objective.draw(step)])
    sync(device)
    seconds = time.perf_counter() - t
    images = (labeled + unlabeled) * steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "labeled": labeled,
        "unlabeled": unlabeled,
        "backbone": backbone,
        "size": size,
        "precision": trainer.precision,
        "images_per_s": round(images / seconds, 1),
        "step_s": round(seconds / steps, 4),
        "peak_gib": round(peak, 2) if peak is not None else None,
        "sd_loss": round(float(scalars.get("loss/sd", 0.0)), 5),  # alive: the SLADE terms ran
        "mined_pairs": float(scalars.get("mining/pos_pairs", 0.0)) + float(scalars.get("mining/neg_pairs", 0.0)),
    }


def collectives_check(device: torch.device) -> dict:
    """The losses' collectives on a process group of this process (NCCL on a GPU): values and grads.

    One GPU holds one NCCL rank (NCCL refuses two ranks on one device), so on a 1-GPU machine this
    checks NCCL's start-up, the staging of host tensors through the GPU (dist.staged_all_reduce_sum)
    and the all-gather; the multi-rank values are tests/integration/test_world_invariance.py's (gloo).
    """
    import torch.distributed as tdist

    from slade_dist import dist

    if not dist.is_dist():
        backend = "nccl" if device.type == "cuda" else "gloo"
        port = dist.find_free_port()
        tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    world = dist.world_size()
    x = torch.arange(6.0, device=device).reshape(3, 2).add(dist.rank()).requires_grad_(True)
    rows = dist.gather_rows(x)
    total = dist.sum_over_ranks(x.sum())
    (rows.sum() + total).backward()
    host = dist.staged_all_reduce_sum(torch.ones(4))  # a CPU tensor: staged through the GPU under NCCL
    gathered = dist.all_gather_cat(torch.full((2,), float(dist.rank()), device=device))
    ok = (
        rows.shape[0] == 3 * world
        and torch.allclose(x.grad, torch.full_like(x, 2.0 * world))  # each rank's rows reach every rank
        and bool((host == world).all())
        and host.device.type == "cpu"
        and gathered.shape[0] == 2 * world
    )
    return {"world": world, "backend": tdist.get_backend(), "ok": bool(ok)}


def main() -> None:
    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    out = {"collectives": collectives_check(cpu)}
    rates = [
        student_rate(cpu, 4, n, backbone="tiny_cnn", size=32, precision="fp32", steps=3, warmup=1) for n in (8, 16)
    ]
    out["student"] = rates
    print(json.dumps(out))


if __name__ == "__main__":
    main()
