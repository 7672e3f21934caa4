"""`python -m slade_dist.data` (also `python -m slade_dist data`): the shard tools write, index and
check-pseudo (slade_dist/data/README.md). Tests: tests/unit/test_writers.py, test_pseudo_join.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import DEBUG_FLAG, DEBUG_HELP, exit_on_user_error

# kept in step with writers.FORMATS (not imported: writers imports torch, which --help never needs)
PROG = "python -m slade_dist.data"
FORMATS = sorted(["imagefolder", "cub", "cars196", "inshop", "nabirds", "compcars", "fashion200k", "img2dataset"])

LAYOUTS = """dataset layouts (--root: the dataset's top directory, as distributed; details: slade_dist/data/README.md):
  imagefolder  ROOT/<class>/**/*.jpg (labeled) or ROOT/*.jpg (unlabeled); loose images beside class
               folders are refused unless --split unlabeled (every image under ROOT, one unlabeled set)
  cub          ROOT/[CUB_200_2011/]{images.txt,image_class_labels.txt,classes.txt,images/} -> OUT/{train,test}
  cars196      ROOT/cars_annos.mat + ROOT/car_ims/                       -> OUT/{train,test}
  inshop       ROOT/[Eval/]list_eval_partition.txt + ROOT/[Img/]img/...  -> OUT/{train,query,gallery}
  nabirds      ROOT/{images.txt,image_class_labels.txt,classes.txt,images/}   -> unlabeled, truth in json
  compcars     ROOT/[data/]image/<make>/<model>/<year>/*.jpg                  -> unlabeled, truth in json
  fashion200k  ROOT/labels/*.txt (path<TAB>score<TAB>description) + ROOT/women/... -> unlabeled
  img2dataset  ROOT/<digits>.tar: validated and indexed in place (OUT/index.json points at them)
Re-running skips finished shards. Every file under ROOT is written or listed in OUT/rejects.txt
with why (e.g. outside the decoder contract; GIF, AVIF, HEIC are not read)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="slade_dist shard tools")
    p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser(
        "write",
        help="convert a dataset into shards",
        epilog=LAYOUTS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("--format", required=True, choices=FORMATS)
    w.add_argument("--root", required=True, help="dataset directory as distributed")
    w.add_argument("--out", required=True, help="output shard directory, e.g. shards/cub")
    w.add_argument(
        "--split",
        default="all",
        choices=["all", "train", "test", "query", "gallery", "unlabeled"],
        help="multi-split formats: which split to write (default all); single-split formats: the shard name "
        "prefix (imagefolder: unlabeled reads every image under ROOT as one unlabeled set)",
    )
    w.add_argument("--workers", type=int, default=1, help="parallel writer processes (default 1)")
    w.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    w.add_argument(
        "--resize",
        type=int,
        default=0,
        metavar="SHORTER_SIDE",
        help="shrink images whose shorter side is larger (re-encodes JPEG); 0 keeps bytes as is",
    )
    w.add_argument("--seed", type=int, default=0, help="seed of the fixed write order (default 0)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in a job log)")
    w.set_defaults(run=_write)
    ix = sub.add_parser("index", help="rebuild index.json of a shard directory from its tars")
    ix.add_argument("shard_dir")
    ix.set_defaults(run=_index)
    cp = sub.add_parser("check-pseudo", help="verify pl-%%06d.npz files against their image shards")
    cp.add_argument("unlabeled_dir")
    cp.add_argument("pseudo_dir")
    cp.set_defaults(run=_check_pseudo)
    return p


def main(argv: list[str] | None = None) -> int:
    """The shard tools; a user error ends them with one line and exit code 2 (errors.py). Every
    ValueError of the converters is about the dataset or the arguments, so it counts as one here."""
    return exit_on_user_error(_main, argv, PROG, also=(ValueError,))


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


def _write(args: argparse.Namespace) -> int:
    # imported here: --help needs no torch
    from .writers import convert

    if args.workers < 1 or args.shard_size < 1 or args.resize < 0:
        raise ValueError("--workers and --shard-size must be >= 1, --resize >= 0")
    done = convert(
        args.format,
        args.root,
        args.out,
        split=args.split,
        shard_size=args.shard_size,
        workers=args.workers,
        resize=args.resize,
        seed=args.seed,
        progress=not args.no_progress,
    )
    for split, idx in done.items():
        print(
            f"{split}: {idx['total']} images in {len(idx['shards'])} shards, {idx.get('rejected', 0)} "
            f"rejected"
            + (f", {idx['skipped']} files skipped" if idx.get("skipped") else "")
            + (f", {idx['num_classes']} classes" if "num_classes" in idx else "")
            + (" (listed in rejects.txt)" if idx.get("rejected") or idx.get("skipped") else "")
        )
    return 0


def _index(args: argparse.Namespace) -> int:
    from .shards import INDEX_FILE, read_index

    (Path(args.shard_dir) / INDEX_FILE).unlink(missing_ok=True)
    idx = read_index(args.shard_dir)
    print(json.dumps({"shards": len(idx["shards"]), "total": idx["total"], "kind": idx["kind"]}))
    return 0


def _check_pseudo(args: argparse.Namespace) -> int:
    from .pseudo_join import check_zip
    from .readers import resolve_shards

    n = sum(check_zip(s, args.pseudo_dir) for s in resolve_shards(args.unlabeled_dir))
    print(f"ok: {n} pseudo-labeled samples zip with their image shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
