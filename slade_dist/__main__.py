"""Command line: `python -m slade_dist <command> --config FILE [section.key=value ...]`.

Owns: argument parsing and the human-facing output of one-process runs (stage commands, the
demo-data generator, the in-process pipeline, show-config). Multi-node runs go through
`launch/submit.py`, which calls the same stage functions. Tests: tests/unit/test_cli.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import dist
from .config import Config, ConfigError, describe_sections, load_config
from .data.demo import generate
from .eval.report import format_table
from .runner import StageNotAvailable, run_pipeline, run_stage
from .stages import STAGES, RunLayout

EPILOG = """\
stages (each is also a command):
{stages}

other commands:
  demo-data    write the procedural demo dataset (demo.* keys) as WebDataset shards
  pipeline     run the whole chain in this process: pretrain -> teacher -> R x (embed ->
               cluster -> student) -> eval; finished stages (DONE.json matching the config hash)
               are skipped
  show-config  print the resolved config (defaults -> --config file -> overrides) and its hash

config sections and keys (set in YAML or as section.key=value after the command):
{sections}

examples:
  python -m slade_dist demo-data --config configs/demo.yaml
  python -m slade_dist teacher --config configs/demo.yaml train.teacher_steps=50
  python -m slade_dist embed --config configs/demo.yaml run.round=2
  torchrun --nproc_per_node 2 -m slade_dist teacher --config configs/demo.yaml
  python launch/submit.py --stage all --config configs/cub.yaml --nodes 8   (Slurm)
"""


def build_parser() -> argparse.ArgumentParser:
    stages = "\n".join(f"  {s.name:12s} {s.help}" for s in STAGES.values())
    p = argparse.ArgumentParser(
        prog="python -m slade_dist",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="SLADE self-training for deep metric learning (distributed).",
        epilog=EPILOG.format(stages=stages, sections=describe_sections()),
    )
    p.add_argument(
        "command",
        choices=[*STAGES, "demo-data", "pipeline", "show-config"],
        metavar="command",
        help="a stage (" + ", ".join(STAGES) + ") or demo-data / pipeline / show-config",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides, applied after the --config file"
    )
    p.add_argument("--config", "-c", default=None, help="run file layered over configs/defaults.yaml")
    p.add_argument("--force", action="store_true", help="rerun even if DONE.json matches the config hash")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    dist.set_default_accelerator()
    try:
        # demo-data creates the inputs the path check would look for
        cfg = load_config(args.config, args.overrides, check_paths=args.command not in ("demo-data", "show-config"))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.command == "show-config":
        print(f"# hash {cfg.hash()}\n{cfg.dump_yaml()}", end="")
        return 0
    if args.command == "demo-data":
        return _demo_data(cfg, args.force)
    if args.command == "pipeline":
        return _pipeline(cfg, force=args.force)
    dist.init_distributed()
    try:
        result = run_stage(cfg, args.command, force=args.force)
        # printed before shutdown: afterwards every rank would think it is rank 0
        if result is not None:
            dist.print0(json.dumps({"stage": args.command, "result": result}, default=str))
        if args.command == "eval":
            print_summary(cfg)
    except (StageNotAvailable, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    return 0


def _demo_data(cfg: Config, force: bool) -> int:
    res = generate(cfg.demo, force=force)
    if res["skipped"]:
        print(f"demo data already in {res['out']} with these parameters (--force regenerates)")
    else:
        print(
            f"demo data: {res['counts']} images in {res['seconds']} s "
            f"({res['images_per_minute']} images/min) -> {res['out']}"
        )
    return 0


def _pipeline(cfg: Config, force: bool = False) -> int:
    """Every stage in order, in this process (runner.run_pipeline), then the metrics table."""
    t0 = time.time()
    dist.init_distributed()
    try:
        run_pipeline(cfg, force=force)
        dist.print0(f"[pipeline] finished in {time.time() - t0:.0f} s")
        print_summary(cfg)
    finally:
        dist.shutdown()
    return 0


def print_summary(cfg: Config) -> None:
    """The metrics table (when eval ran) and where to look at the run."""
    metrics = RunLayout(cfg.run.dir).stage_dir("eval") / "metrics.json"
    if metrics.exists() and dist.is_main():
        print(format_table(json.loads(metrics.read_text())))
    dist.print0(f"\nTensorBoard:  tensorboard --logdir {Path(cfg.run.dir) / 'tb'}")


if __name__ == "__main__":
    sys.exit(main())
