"""Benchmark: the same SLADE student at 1, 2 and 4 ranks, mean +- std over seeds of test MAP@R / P@1.

Per seed, one round of configs/demo.yaml: pretrain -> teacher -> embed -> cluster once, then the
round-1 student from that one teacher and those pseudo labels, trained on 1, 2 and 4 real gloo
processes (dist.run_local_processes, the real stage: slade_dist.runner.run_stage) with the SAME
global batch per optimizer step (train.classes_per_batch x samples_per_class labeled and
student.unlabeled_classes_per_batch x unlabeled_samples_per_class pseudo-labeled: 8 x 4 + 8 x 4 on
the demo, so 2 classes and 2 pseudo-classes per rank at 4 ranks) and the same steps. Each world
size draws its own random batches (rank-seeded streams): what must agree is the method's result,
within seed noise. The ranks share 2 CPU cores here, so only the metrics are figures; the times
are printed for information.
--quick: the demo at 32 px (crops 28), short stages, 1 seed, ranks 1 and 2.
The last line is one JSON object {"bench": "world", "ours": MAP@R at the most ranks, "baseline":
MAP@R at 1 rank, "unit", "ratio", "rows": {ranks: mean and std of MAP@R and P@1}}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _demo import ROOT, config, metrics_of, prepare_data, summarise

from slade_dist import dist
from slade_dist.runner import run_stage
from slade_dist.stages import RunLayout

QUICK_STEPS = [
    "pretrain.steps=30",
    "train.teacher_steps=100",
    "train.student_steps=100",
    "student.basis_warmup_steps=20",
]


def student_worker(run_dir: str, overrides: list[str]) -> None:
    """One rank of the round-1 student (spawned by dist.run_local_processes)."""
    import torch

    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_distributed()
    run_stage(config(Path(run_dir), overrides), "student", force=True)
    dist.barrier()
    dist.shutdown()


def student_at(world: int, run_dir: Path, overrides: list[str]) -> tuple[dict[str, float], float]:
    t0 = time.time()
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
    dist.run_local_processes(student_worker, world, args=(str(run_dir), overrides), extra_env=env)
    seconds = time.time() - t0
    cfg = config(run_dir, overrides)
    return metrics_of(RunLayout(run_dir).stage_dir("student", 1) / "final.pt", cfg), seconds


def one_seed(bench_dir: Path, data: list[str], seed: int, quick: bool, worlds: list[int]) -> dict[int, dict]:
    overrides = [*data, f"run.seed={seed}", "run.rounds=1", "run.round=1", "train.eval_every=0"]
    overrides += QUICK_STEPS if quick else []
    run_dir = bench_dir / f"world-{'quick' if quick else 'demo'}-s{seed}"
    cfg = config(run_dir, overrides)
    for stage in ("pretrain", "teacher", "embed", "cluster"):
        run_stage(cfg, stage)
    rows = {}
    for world in worlds:
        rows[world], seconds = student_at(world, run_dir, overrides)
        print(f"seed {seed}: {world} rank(s): MAP@R {rows[world]['map_at_r']:.4f} ({seconds:.0f} s)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 px demo, short stages, 1 seed, 1 and 2 ranks")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --quick 1)")
    ap.add_argument("--dir", default=str(ROOT / "runs" / "bench"), help="where data and runs go")
    args = ap.parse_args()
    bench_dir = Path(args.dir)
    seeds = args.seeds or (1 if args.quick else 3)
    worlds = [1, 2] if args.quick else [1, 2, 4]
    data = prepare_data(bench_dir, args.quick)
    per_seed = [one_seed(bench_dir, data, seed, args.quick, worlds) for seed in range(seeds)]
    rows = summarise(per_seed)
    for world, r in rows.items():
        print(
            f"{world} rank(s)  MAP@R {r['map_at_r']:.4f} +- {r['map_at_r_std']:.4f}   "
            f"P@1 {r['precision_at_1']:.4f} +- {r['precision_at_1_std']:.4f}"
        )
    top, one = rows[worlds[-1]], rows[1]
    noise = max(top["map_at_r_std"], one["map_at_r_std"])
    print(
        json.dumps(
            {
                "bench": "world",
                "ours": top["map_at_r"],
                "baseline": one["map_at_r"],
                "unit": f"MAP@R (student at {worlds[-1]} ranks vs 1 rank, same global batch)",
                "ratio": round(top["map_at_r"] / max(one["map_at_r"], 1e-9), 4),
                "within_one_std": abs(top["map_at_r"] - one["map_at_r"]) <= noise,
                "seeds": seeds,
                "rows": {str(w): r for w, r in rows.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
