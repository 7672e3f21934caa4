"""Command line: `python -m slade_dist <command> --config FILE [section.key=value ...]`.

Owns: argument parsing and the human-facing output of one-process runs (stage commands, the
demo-data generator, the in-process pipeline, show-config): `<command> --help` (the config keys
that command reads, with their help text, default and resolved value), refusing raw img2dataset
output as a shard dir (with the command that validates it), and the result line, printed once (by
rank 0) however many processes run the command. Multi-node runs go through `launch/submit.py`,
which calls the same stage functions. Tests: tests/unit/test_cli.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import dist
from .config import Config, ConfigError, describe_sections, load_config
from .data.__main__ import describe_unvalidated, unvalidated_img2dataset
from .data.demo import generate
from .errors import DEBUG_FLAG, DEBUG_HELP, exit_on_user_error
from .eval.report import format_table
from .runner import run_pipeline, run_stage
from .stages import STAGES, RunLayout, read_done

PROG = "python -m slade_dist"

EPILOG = """\
stages (each is also a command):
{stages}

other commands:
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
  python launch/submit.py --stage all --config configs/cub.yaml --nodes 8   (Slurm)
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
        choices=[*STAGES, "demo-data", "pipeline", "show-config"],
        metavar="command",
        help="a stage (" + ", ".join(STAGES) + ") or demo-data / pipeline / show-config",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides, applied after the --config file"
    )
    p.add_argument("--config", "-c", default=None, help="run file layered over configs/defaults.yaml")
    p.add_argument("--force", action="store_true", help="rerun even if DONE.json matches the config hash")
    p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return p


# ------------------------------------------------------------------------------ <command> --help
def command_sections(command: str) -> list[str]:
    """The config sections a command reads: run and data, then those its stage's result depends on."""
    if command == "demo-data":
        return ["demo"]
    named = ["run", "data", *STAGES[command].sections]
    return list(dict.fromkeys("run" if s == "run_seed" else s for s in named))


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def _doc(obj: object) -> str:
    """A section's docstring, first sentence (dataclasses without one get a generated signature: none)."""
    doc = " ".join((type(obj).__doc__ or "").split())
    return "" if doc.startswith(type(obj).__name__ + "(") else doc.split(". ")[0].rstrip(".")


def describe_keys(obj: object, base: object, prefix: str) -> list[str]:
    """One entry per key under `prefix`: name, resolved value (the default too where it differs),
    help text; nested sections (e.g. a section's own sub-section) recursively."""
    lines = []
    for f in dataclasses.fields(obj):
        value, default, key = getattr(obj, f.name), getattr(base, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            lines.append(f"    {key}:" + (f"  {_doc(value)}" if _doc(value) else ""))
            lines.extend(describe_keys(value, default, key))
            continue
        shown = _shown(value) + (f" (default {_shown(default)})" if value != default else "")
        text = f.metadata.get("help", "")
        lines.append(f"    {key:32s} {shown}" + (f"\n        {text}" if text else ""))
    return lines


def describe_sections_of(sections: Sequence[str], cfg: Config, defaults: Config) -> str:
    lines = []
    for section in sections:
        doc = _doc(getattr(cfg, section))
        lines.append(f"\n  {section}:" + (f"  {doc}" if doc else ""))
        lines.extend(describe_keys(getattr(cfg, section), getattr(defaults, section), section))
    return "\n".join(lines)


def command_help(command: str, cfg: Config, defaults: Config, source: str) -> str:
    if command == "demo-data":
        what, inputs = "write the procedural demo dataset as WebDataset shards", ""
    else:
        stage = STAGES[command]
        what = stage.help + (" (per round: run.round picks the round)" if stage.per_round else "")
        inputs = f"\ninputs (must exist): {', '.join(stage.requires)}" if stage.requires else ""
    return (
        f"usage: python -m slade_dist {command} [--config FILE] [--force] [section.key=value ...]\n\n"
        f"{command}: {what}{inputs}\n\n"
        f"config keys {command} reads (values: {source}; set them in the run file or as section.key=value):"
        + describe_sections_of(command_sections(command), cfg, defaults)
        + "\n\nevery command and section: python -m slade_dist --help; as Slurm jobs: python launch/submit.py --help"
    )


def help_request(argv: Sequence[str]) -> tuple[str, str | None, list[str]] | None:
    """(command, --config, overrides) when argv asks for one command's help (`teacher --help`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("words", nargs="*")
    p.add_argument("--config", "-c")
    p.add_argument("-h", "--help", action="store_true")
    known, _ = p.parse_known_intermixed_args(argv)
    if not known.help or not known.words or known.words[0] not in (*STAGES, "demo-data"):
        return None
    return known.words[0], known.config, known.words[1:]


def print_command_help(command: str, config: str | None, overrides: Sequence[str]) -> int:
    cfg = load_config(config, overrides, check_paths=False)
    source = "configs/defaults.yaml" + (f" -> {config}" if config else "") + (" -> overrides" if overrides else "")
    print(command_help(command, cfg, load_config(None, check_paths=False), source))
    return 0


# ------------------------------------------------------------------------------------------ main
def unvalidated_inputs(cfg: Config, command: str) -> str | None:
    """The refusal when a shard dir the command reads is raw img2dataset output nobody validated."""
    names = list(STAGES) if command == "pipeline" else [command] if command in STAGES else []
    for key in dict.fromkeys(k for n in names for k in STAGES[n].requires):
        value = cfg.get(key)
        command_line = unvalidated_img2dataset(value) if value else None
        if command_line:
            return describe_unvalidated(key, value, command_line)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The command; a user error ends it with one line on stderr and exit code 2 (errors.py)."""
    return exit_on_user_error(_main, argv, PROG)


def _main(argv: list[str]) -> int:
    wanted = help_request(argv)
    if wanted:  # before argparse, whose --help is the global one
        return print_command_help(*wanted)
    args = build_parser().parse_intermixed_args(argv)
    dist.set_default_accelerator()
    # demo-data creates the inputs the path check would look for
    cfg = load_config(args.config, args.overrides, check_paths=args.command not in ("demo-data", "show-config"))
    refusal = unvalidated_inputs(cfg, args.command)
    if refusal:
        raise ConfigError(refusal)
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
    """The metrics table (when eval ran), a pretrain stage that handed on its input weights (its
    SwAV steps spent for nothing), the retrieval grids and where to look at the run."""
    layout = RunLayout(cfg.run.dir)
    metrics = layout.stage_dir("eval") / "metrics.json"
    if metrics.exists() and dist.is_main():
        print(format_table(json.loads(metrics.read_text())))
    warning = pretrain_warning(layout)
    if warning:
        dist.print0(f"WARNING: {warning}")
    grids = sorted(layout.stage_dir("eval").glob("retrieval_*.png"))
    if grids:
        dist.print0("retrieval grids: " + ", ".join(str(p) for p in grids))
    dist.print0(f"\nTensorBoard:  tensorboard --logdir {Path(cfg.run.dir) / 'tb'}")


def pretrain_warning(layout: RunLayout) -> str | None:
    """The warning the pretrain stage recorded in its DONE.json, if it handed on its input weights."""
    marker = read_done(layout.done_file("pretrain")) or {}
    result = marker.get("result")
    return result.get("warning") if isinstance(result, dict) else None


if __name__ == "__main__":
    sys.exit(main())
