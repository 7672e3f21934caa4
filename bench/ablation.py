"""Benchmark: the SLADE component ablation on the demo, mean +- std over seeds of test MAP@R / P@1.

Per seed, one round (configs/demo.yaml otherwise): pretrain -> teacher -> embed -> cluster, then
every student variant from the same teacher and pseudo labels, and two teachers:
- teacher                 the teacher the students start from (train.teacher_steps)
- teacher_budget          a teacher trained teacher_steps + student_steps from the same pretrain
                          export: what the student's extra steps give without unlabeled data
- no_basis / raw_pairs / no_mining / full   student.ablation (docs/METHOD.md, the paper's Table 4)
- full_sd_damped          full with basis.sd_grad=damped (L_SD's gradient through Eq. 6, x 1-beta)
- full_cluster_agreement  full with mining.require_cluster_agreement=true (the non-literal Eq. 7)
- full_init_pretrain      full with student.init=pretrain (the student starts from the SwAV export)
`full` is the defaults: sd_grad full, literal Eq. 7, student.init teacher.
--size small: the second demo size (bench/_demo.py SIZES: 32 px, 30 + 30 + 30 classes, k 90), the
demo's steps. --batch-mult M: M x the labeled and unlabeled P per step (teacher and student; the
same steps, so M x the images) with the square-root lr rule (train.lr x sqrt(M), docs/SCALING.md);
--rows picks the students to train (default all). --quick: the demo at 32 px (crops 28),
30 pretrain / 100 teacher / 100 student steps, 1 seed.
The last line is one JSON object {"bench": "ablation", "ours": full's MAP@R, "baseline": the
budget-matched teacher's, "unit", "ratio", "rows": {name: {mean and std of MAP@R and P@1}}}.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from _demo import ROOT, config, metrics_of, prepare_data, summarise

from slade_dist.runner import run_stage
from slade_dist.stages import RunLayout

STUDENTS: dict[str, list[str]] = {
    "no_basis": ["student.ablation=no_basis"],
    "raw_pairs": ["student.ablation=raw_pairs"],
    "no_mining": ["student.ablation=no_mining"],
    "full": ["student.ablation=full"],
    "full_sd_damped": ["student.ablation=full", "basis.sd_grad=damped"],
    "full_cluster_agreement": ["student.ablation=full", "mining.require_cluster_agreement=true"],
    "full_init_pretrain": ["student.ablation=full", "student.init=pretrain"],
}
QUICK_STEPS = [
    "pretrain.steps=30",
    "train.teacher_steps=100",
    "train.student_steps=100",
    "student.basis_warmup_steps=20",
]


def _timed(name: str, fn, *args) -> Any:
    t0 = time.time()
    out = fn(*args)
    print(f"  {name}: {time.time() - t0:.0f}s", flush=True)
    return out


def budget_teacher(overrides: list[str], pretrain_export: Path, run_dir: Path) -> dict[str, float]:
    """A teacher with the student's steps added, from the same pretrain export (copied in)."""
    (run_dir / "pretrain").mkdir(parents=True, exist_ok=True)
    shutil.copy2(pretrain_export, run_dir / "pretrain" / "final.pt")
    tc = config(run_dir, overrides).train
    cfg = config(run_dir, overrides, f"train.teacher_steps={tc.teacher_steps + tc.student_steps}")
    run_stage(cfg, "teacher", force=True)
    return metrics_of(RunLayout(run_dir).stage_dir("teacher") / "final.pt", cfg)


def batch_overrides(data: list[str], mult: int) -> list[str]:
    """M x both P per step, lr x sqrt(M) (the square-root rule for Adam-type optimizers)."""
    if mult == 1:
        return []
    base = config(ROOT / "runs" / "unused", data)
    return [
        f"train.classes_per_batch={base.train.classes_per_batch * mult}",
        f"student.unlabeled_classes_per_batch={base.student.unlabeled_classes_per_batch * mult}",
        f"train.lr={base.train.lr * math.sqrt(mult):g}",
    ]


def one_seed(
    bench_dir: Path, data: list[str], seed: int, quick: bool, size: str, mult: int, students: list[str]
) -> dict[str, dict[str, float]]:
    overrides = [*data, f"run.seed={seed}", "run.rounds=1", "run.round=1", "train.eval_every=0"]
    overrides += QUICK_STEPS if quick else []
    overrides += batch_overrides(data, mult)
    run_dir = bench_dir / f"ablation-{size}{f'-x{mult}' if mult > 1 else ''}-s{seed}"
    cfg = config(run_dir, overrides)
    for stage in ("pretrain", "teacher", "embed", "cluster"):
        _timed(stage, run_stage, cfg, stage)
    layout = RunLayout(run_dir)
    rows = {"teacher": metrics_of(layout.stage_dir("teacher") / "final.pt", cfg)}
    export = layout.stage_dir("pretrain") / "final.pt"
    rows["teacher_budget"] = _timed("teacher_budget", budget_teacher, overrides, export, Path(f"{run_dir}-budget"))
    for name in students:
        extra = STUDENTS[name]
        scfg = config(run_dir, [*overrides, *extra])
        _timed(f"student {name}", run_stage, scfg, "student", True)
        rows[name] = metrics_of(layout.stage_dir("student", 1) / "final.pt", scfg)
    print(f"seed {seed}: " + ", ".join(f"{k} {v['map_at_r']:.4f}" for k, v in rows.items()), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 px demo, short stages, 1 seed")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --quick 1)")
    ap.add_argument("--size", choices=["demo", "small"], default="demo", help="which demo size (bench/_demo.py)")
    ap.add_argument("--batch-mult", type=int, default=1, help="M x the labeled and unlabeled P, lr x sqrt(M)")
    ap.add_argument("--rows", default=",".join(STUDENTS), help="comma-separated students to train (default all)")
    ap.add_argument("--dir", default=str(ROOT / "runs" / "bench"), help="where data and runs go")
    args = ap.parse_args()
    students = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(students) - set(STUDENTS))
    if unknown or "full" not in students:
        ap.error(f"--rows must include full and name students of {', '.join(STUDENTS)} (got {unknown or students})")
    bench_dir = Path(args.dir)
    seeds = args.seeds or (1 if args.quick else 3)
    size = "quick" if args.quick else args.size
    data = prepare_data(bench_dir, args.quick, size)
    per_seed = [one_seed(bench_dir, data, seed, args.quick, size, args.batch_mult, students) for seed in range(seeds)]
    rows = summarise(per_seed)
    for name, r in rows.items():
        print(
            f"{name:24s} MAP@R {r['map_at_r']:.4f} +- {r['map_at_r_std']:.4f}   "
            f"P@1 {r['precision_at_1']:.4f} +- {r['precision_at_1_std']:.4f}"
        )
    print(
        json.dumps(
            {
                "bench": "ablation",
                "ours": rows["full"]["map_at_r"],
                "baseline": rows["teacher_budget"]["map_at_r"],
                "unit": "MAP@R (student full vs the budget-matched teacher)",
                "ratio": round(rows["full"]["map_at_r"] / max(rows["teacher_budget"]["map_at_r"], 1e-9), 4),
                "seeds": seeds,
                "size": size,
                "batch_mult": args.batch_mult,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
