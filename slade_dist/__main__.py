"""The command line: `python -m slade_dist <stage|pipeline|demo-data|show-config|data ...|launch ...>`.

Owns argument parsing and the output of one-process runs (the result line, printed once by rank 0;
the closing summary), and `<command> --help`: the config keys that command reads, with their help,
default and resolved value. `data ...` and `launch ...` are data/__main__.py's and launch/cli.py's.
Tests: tests/unit/test_cli.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import dist
from .config import (
    SECTIONS,
    Config,
    ConfigError,
    defaults_yaml,
    describe_keys,
    describe_sections,
    load_config,
    section_doc,
)
from .data.demo import generate
from .errors import DEBUG_FLAG, DEBUG_HELP, exit_on_user_error
from .eval.report import format_table
from .runner import run_pipeline, run_stage
from .stages import STAGES, RunLayout, read_done, unvalidated_shards

PROG = "python -m slade_dist"

EPILOG = """\
stages (each is also a command):
{stages}

other commands:
  data         shard tools: write (convert a dataset), index, check-pseudo (`data --help`)
  launch       stages as Slurm jobs or local runs, one job shape per stage (`launch --help`;
               `python launch/submit.py` is the same command)
  demo-data    write the procedural demo dataset (demo.* keys) as WebDataset shards
  pipeline     run the whole chain in this process: pretrain -> teacher -> R x (embed ->
               cluster -> student) -> eval; finished stages (DONE.json matching the config hash)
               are skipped
  show-config  print the resolved config (defaults -> --config file -> overrides) and its hash

`python -m slade_dist <stage> --help` lists the config keys that stage reads, with their help
text, defaults and the values a --config file and overrides give them.

config sections and keys (set in YAML or as section.key=value after the command):
{sections}

examples:
  python -m slade_dist demo-data --config configs/demo.yaml
  python -m slade_dist teacher --config configs/demo.yaml train.teacher_steps=50
  python -m slade_dist embed --config configs/demo.yaml run.round=2
  torchrun --nproc_per_node 2 -m slade_dist teacher --config configs/demo.yaml
  python -m slade_dist launch --stage all --config configs/cub.yaml --nodes 8   (Slurm)
"""


def build_parser() -> argparse.ArgumentParser:
    stages = "\n".join(f"  {s.name:12s} {s.help}" for s in STAGES.values())
    p = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="SLADE self-training for deep metric learning (distributed).",
        epilog=EPILOG.format(stages=stages, sections=describe_sections()),
    )
    p.add_argument(
        "command",
        choices=[*STAGES, "demo-data", "pipeline", "show-config", "data", "launch"],
        metavar="command",
        help="a stage (" + ", ".join(STAGES) + ") or demo-data / pipeline / show-config / data / launch",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides, applied after the --config file"
    )
    p.add_argument("--config", "-c", default=None, help="run file layered over configs/defaults.yaml")
    p.add_argument("--force", action="store_true", help="rerun even if DONE.json matches the config hash")
    p.add_argument("--defaults", action="store_true", help="show-config: configs/defaults.yaml as the schema writes it")
    p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return p


def describe_sections_of(command: str, cfg: Config, defaults: Config) -> str:
    """The keys a command reads, by section: a stage's, those it declares; demo-data's, demo.*."""
    keep = STAGES[command].declares if command in STAGES else lambda key: key.startswith("demo.")
    lines = []
    for section in SECTIONS:
        keys = describe_keys(getattr(cfg, section), getattr(defaults, section), section, keep)
        if keys:
            doc = section_doc(getattr(cfg, section))
            lines.append(f"\n  {section}:" + (f"  {doc}" if doc else ""))
            lines.extend(keys)
    return "\n".join(lines)


def command_help(command: str, cfg: Config, defaults: Config, source: str) -> str:
    if command == "demo-data":
        what, inputs = "write the procedural demo dataset as WebDataset shards", ""
    else:
        stage = STAGES[command]
        what = stage.help + (" (per round: run.round picks the round)" if stage.per_round else "")
        shards = stage.shard_keys(cfg)
        inputs = f"\ninputs (must exist): {', '.join(shards)}" if shards else ""
    return (
        f"usage: python -m slade_dist {command} [--config FILE] [--force] [section.key=value ...]\n\n"
        f"{command}: {what}{inputs}\n\n"
        f"config keys {command} reads (values: {source}; set them in the run file or as section.key=value):"
        + describe_sections_of(command, cfg, defaults)
        + "\n\nevery command and section: python -m slade_dist --help; as Slurm jobs: python launch/submit.py --help"
    )


def print_command_help(argv: Sequence[str]) -> bool:
    """Print one command's help when argv asks for it (`teacher --help`): the keys it reads, valued by
    --config and the overrides. False when argv asks for something else."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("words", nargs="*")
    p.add_argument("--config", "-c")
    p.add_argument("-h", "--help", action="store_true")
    known, _ = p.parse_known_intermixed_args(argv)
    if not known.help or not known.words or known.words[0] not in (*STAGES, "demo-data"):
        return False
    command, config, overrides = known.words[0], known.config, known.words[1:]
    cfg = load_config(config, overrides, check_paths=False)
    source = "configs/defaults.yaml" + (f" -> {config}" if config else "") + (" -> overrides" if overrides else "")
    print(command_help(command, cfg, load_config(None, check_paths=False), source))
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """The command; a user error ends it with one line on stderr and exit code 2 (errors.py)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["data"]:  # imported here: the shard tools and the launcher need neither the other
        from .data.__main__ import main as data_main

        return data_main(args[1:])
    if args[:1] == ["launch"]:
        from .launch.cli import main as launch_main

        return launch_main(args[1:], prog=f"{PROG} launch")
    return exit_on_user_error(_main, args, PROG)


def _main(argv: list[str]) -> int:
    if print_command_help(argv):  # before argparse, whose --help is the global one
        return 0
    args = build_parser().parse_intermixed_args(argv)
    dist.set_default_accelerator()
    # demo-data creates the inputs the path check would look for
    cfg = load_config(args.config, args.overrides, check_paths=args.command not in ("demo-data", "show-config"))
    refusal = unvalidated_shards(cfg, list(STAGES) if args.command == "pipeline" else [args.command])
    if refusal:
        raise ConfigError(refusal)
    if args.command == "show-config":
        print(defaults_yaml() if args.defaults else f"# hash {cfg.hash()}\n{cfg.dump_yaml()}", end="")
        return 0
    if args.command == "demo-data":
        return _demo_data(cfg, args.force)
    dist.init_distributed()
    try:
        t0 = time.time()
        if args.command == "pipeline":  # every stage in order, in this process
            run_pipeline(cfg, force=args.force)
            dist.print0(f"[pipeline] finished in {time.time() - t0:.0f} s")
        else:
            result = run_stage(cfg, args.command, force=args.force)
            # printed before shutdown: afterwards every rank would think it is rank 0
            if result is not None:
                dist.print0(json.dumps({"stage": args.command, "result": result}, default=str))
        if args.command in ("pipeline", "eval"):
            print_summary(cfg)
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


def print_summary(cfg: Config) -> None:
    """The metrics table (when eval ran), a pretrain stage that handed on its input weights (its
    SwAV steps spent for nothing), the retrieval grids and where to look at the run."""
    layout = RunLayout(cfg.run.dir)
    metrics = layout.stage_dir("eval") / "metrics.json"
    if metrics.exists() and dist.is_main():
        print(format_table(json.loads(metrics.read_text())))
    result = (read_done(layout.done_file("pretrain")) or {}).get("result")  # did it hand on its input weights?
    if isinstance(result, dict) and result.get("warning"):
        dist.print0(f"WARNING: {result['warning']}")
    grids = sorted(layout.stage_dir("eval").glob("retrieval_*.png"))
    if grids:
        dist.print0("retrieval grids: " + ", ".join(str(p) for p in grids))
    dist.print0(f"\nTensorBoard:  tensorboard --logdir {Path(cfg.run.dir) / 'tb'}")


if __name__ == "__main__":
    sys.exit(main())
