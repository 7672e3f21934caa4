"""The launcher's arguments (`python launch/submit.py` = `python -m slade_dist launch`): only the
flags that are not config keys, and their --help; what a launch does is resolve.py.
Tests: tests/unit/test_launch.py, tests/integration/test_{launch_local,slurm}.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import stages
from ..errors import DEBUG_FLAG, DEBUG_HELP, exit_on_user_error
from .plan import parse_shard_ids
from .resolve import pick_config_file, status_or_cancel, submit_or_run

PROG = "launch/submit.py"

EPILOG = """\
  all       pretrain -> teacher -> R x (embed -> cluster -> student) -> eval, as jobs linked by
            afterok dependencies, each with its job shape launch.shapes.<stage>

Job shapes, partition, account, qos, constraint: the config keys launch.* (python -m slade_dist --help),
as overrides, e.g. launch.shapes.student.gpus_per_node=8 launch.partition=gpu. More sbatch options:
launch.sbatch_extra (every job) and launch.shapes.<stage>.sbatch_extra; shell lines before srun
(module loads): launch.setup.
Slurm jobs are named slade-<run name>-<job> (run name: the last part of run.dir), e.g.
slade-cub-round1-embed: `squeue --name`, `scancel --name` or --status / --cancel.

examples:
  python launch/submit.py --stage all --config configs/demo.yaml --cluster local
  python launch/submit.py --stage student --nodes 8 --config configs/cub.yaml launch.shapes.student.gpus_per_node=8
  python launch/submit.py --stage all --config configs/web.yaml --array 64 --dry-run
  python launch/submit.py --stage embed --config configs/web.yaml --shards 0-9,12 --cluster local
  python launch/submit.py --status --config configs/cub.yaml     (or: --status run.dir=runs/cub)
  python launch/submit.py --cancel --config configs/cub.yaml
  python -m slade_dist launch ...   (the same command)"""


def shard_list(text: str) -> list[int]:
    """argparse type of --shards: a clear message instead of argparse's "invalid value"."""
    try:
        ids = parse_shard_ids(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected shard ids like 0-9,12, got {text!r} ({e})") from e
    if not ids:
        raise argparse.ArgumentTypeError(f"names no shard: {text!r}")
    return ids


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit slade_dist stages as Slurm jobs (submitit), or run them on this machine.",
        epilog="stages:\n" + "".join(f"  {n:9s} {s.help}\n" for n, s in stages.STAGES.items()) + EPILOG,
    )
    p.add_argument("--stage", choices=[*stages.STAGES, "all"], metavar="STAGE", help="a stage or all (the chain)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="run file layered over configs/defaults.yaml (default: <run.dir>/config.yaml, the config the "
        "run last saved, when it exists, else configs/demo.yaml)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
    p.add_argument("--nodes", type=int, help="nodes of every job (over launch.shapes.<stage>.nodes)")
    p.add_argument(
        "--cluster",
        choices=("slurm", "local", "debug"),
        help="slurm: sbatch through submitit; local: this machine, one process per task, jobs one after the "
        "other; debug: in this process (pdb works). Default: launch.cluster, else slurm when sbatch is on "
        "PATH or a job asks for more than one node, else local",
    )
    p.add_argument("--array", type=int, default=0, metavar="N", help="embed as a job array of N parts first")
    p.add_argument(
        "--shards",
        type=shard_list,
        metavar="IDS",
        help="with --stage embed: embed only these unlabeled shard ids, e.g. 0-9,12 (the stage is marked "
        "done only by a run over every shard)",
    )
    p.add_argument("--status", action="store_true", help="the state of every job of every launch of the run")
    p.add_argument("--cancel", action="store_true", help="cancel every job of the run that has not ended")
    p.add_argument("--force", action="store_true", help="rerun stages even when their DONE.json matches")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, each job's #SBATCH, setup and srun lines and what a real submission "
        "would stop at, as warnings; submit nothing (needs neither sbatch nor the data)",
    )
    p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return p


def main(argv: Sequence[str] | None = None, job_cls: type | None = None, prog: str = PROG) -> int:
    """`job_cls` replaces StageJob (tests run their probe stage through it); a user error (errors.py)
    ends it with one line `<prog>: error: ...` and exit code 2."""
    return exit_on_user_error(lambda args: _main(args, job_cls, prog), argv, prog)


def _main(argv: list[str], job_cls: type | None, prog: str) -> int:
    parser = build_parser(prog)
    args = parser.parse_intermixed_args(argv)  # overrides may sit between the flags
    if args.status and args.cancel:
        parser.error("--status and --cancel: pass one of them")
    if not (args.stage or args.status or args.cancel):
        parser.error("--stage is required (or --status / --cancel, about the jobs already submitted)")
    config_file, why = pick_config_file(args)
    if why:
        print(f"slade_dist: {why}", flush=True)
    if args.status or args.cancel:
        status_or_cancel(args, config_file)
        return 0
    submit_or_run(args, config_file, job_cls, prog)
    return 0
