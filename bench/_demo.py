"""What bench/teacher_quality.py and bench/ablation.py share: the demo data they train on, its
config, and the one evaluation both report (eval/stage.py's, MAP@R / P@1 on the test classes).

Sizes (SIZES): "demo" is configs/demo.yaml as it is; "small" a second demo at 32 px with other
class counts (30 labeled, 30 test, 30 unlabeled-only classes, k 90); "quick" the demo drawn at 32 px
(crops of 28 px) with fewer steps, so each bench runs in minutes on 2 CPU cores. Data goes under runs/bench/ (never
shards/demo: the benches must not rewrite what a demo run next to them reads).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slade_dist.config import Config, load_config  # noqa: E402
from slade_dist.data.demo import generate  # noqa: E402
from slade_dist.eval.stage import evaluate_model  # noqa: E402

DEMO = ROOT / "configs" / "demo.yaml"


# The demo's sizes: "demo" is configs/demo.yaml as it is; "small" a second demo of another image
# size and other class counts (so a default that only suits the demo shows); "quick" the demo drawn
# at 32 px for minute-long runs.
SIZES: dict[str, list[str]] = {
    "demo": [],
    "small": [
        "demo.image_size=32",
        "data.image_size=28",
        "data.resize_size=32",
        "demo.train_classes=30",
        "demo.test_classes=30",
        "demo.extra_classes=30",
        "demo.labeled_per_class=12",
        "demo.unlabeled_per_class=40",
        "pseudo.k=90",
        "pretrain.prototypes=90",
    ],
    "quick": ["demo.image_size=32", "data.image_size=28", "data.resize_size=32"],
}


def size_overrides(quick: bool, size: str | None = None) -> list[str]:
    """The overrides of a named demo size (default: "quick" or "demo" as `quick` says)."""
    return SIZES[size or ("quick" if quick else "demo")]


def prepare_data(
    bench_dir: Path, quick: bool, size: str | None = None, demo: Sequence[str] = (), tag: str = ""
) -> list[str]:
    """Generate the demo (skipped when already there; `demo`: extra demo.* overrides, in a dir
    suffixed by `tag`) and return the overrides that read it."""
    size = size or ("quick" if quick else "demo")
    out = bench_dir / (("demo" if size == "demo" else f"demo-{size}") + tag)
    cfg = load_config(DEMO, [f"demo.out={out}", *SIZES[size], *demo], check_paths=False)
    generate(cfg.demo, progress=False)
    return [
        f"demo.out={out}",
        *SIZES[size],
        *demo,
        f"data.train_shards={out / 'train'}",
        f"data.test_shards={out / 'test'}",
        f"data.unlabeled_shards={out / 'unlabeled'}",
    ]


def config(run_dir: Path, data: list[str], *extra: str) -> Config:
    return load_config(DEMO, [*data, f"run.dir={run_dir}", *extra])


def metrics_of(path: Path, cfg: Config) -> dict[str, Any]:
    """MAP@R and P@1 of one exported model on the test classes (the eval stage's numbers)."""
    m = evaluate_model(path, cfg) or {}
    return {"map_at_r": float(m["map_at_r"]), "precision_at_1": float(m["precision_at_1"])}


def summarise(per_seed: list[dict[Any, dict[str, float]]]) -> dict[Any, dict[str, float]]:
    """Mean and std over seeds of each row's MAP@R and P@1 (rows: the first seed's keys)."""
    out = {}
    for name in per_seed[0]:
        row: dict[str, float] = {}
        for metric in ("map_at_r", "precision_at_1"):
            vals = [s[name][metric] for s in per_seed]
            row[metric] = round(statistics.mean(vals), 4)
            row[f"{metric}_std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
        out[name] = row
    return out
