"""What bench/teacher_quality.py and bench/ablation.py share: the demo data they train on, its
config, and the one evaluation both report (eval/stage.py's, MAP@R / P@1 on the test classes).

Full size: configs/demo.yaml as it is. --quick: the demo drawn at 32 px (crops of 28 px) and
fewer steps, so each bench runs in minutes on 2 CPU cores. Data goes under runs/bench/ (never
shards/demo: the benches must not rewrite what a demo run next to them reads).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slade_dist.config import Config, load_config  # noqa: E402
from slade_dist.data.demo import generate  # noqa: E402
from slade_dist.eval.stage import evaluate_model  # noqa: E402

DEMO = ROOT / "configs" / "demo.yaml"


def size_overrides(quick: bool) -> list[str]:
    """The demo's image size (and crops) for the mode."""
    return ["demo.image_size=32", "data.image_size=28", "data.resize_size=32"] if quick else []


def prepare_data(bench_dir: Path, quick: bool) -> list[str]:
    """Generate the demo (skipped when already there) and return the data.* overrides that read it."""
    out = bench_dir / ("demo-quick" if quick else "demo")
    cfg = load_config(DEMO, [f"demo.out={out}", *size_overrides(quick)], check_paths=False)
    generate(cfg.demo, progress=False)
    return [
        f"demo.out={out}",
        *size_overrides(quick),
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
