"""`python -m slade_dist.data`: shard tools.

  write  convert a dataset, as distributed, into WebDataset shards (or index img2dataset output)
  index  (re)build index.json of a shard directory by scanning its tars
  check-pseudo  verify that pseudo-label files zip with their image shards (keys, order)

Also owns `unvalidated_img2dataset`: whether a directory named as a shard dir is raw img2dataset
output that `write --format img2dataset` never validated (the stage commands and the launcher
refuse it with that command, instead of indexing it unchecked).
Tests: tests/unit/test_writers.py (runs the CLI in a subprocess), tests/unit/test_cli.py and
tests/unit/test_launch.py (the img2dataset refusal).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from ..errors import DEBUG_FLAG, DEBUG_HELP, exit_on_user_error

# img2dataset names its shards 00000.tar, 00001.tar...; slade_dist's writers never do (<prefix>-%06d.tar)
IMG2DATASET_TAR = re.compile(r"\d+\.tar")
# kept in step with writers.FORMATS (not imported: the launcher calls unvalidated_img2dataset, and
# writers / readers import numpy, PIL and torch, which the launcher never needs)
PROG = "python -m slade_dist.data"
FORMATS = sorted(["imagefolder", "cub", "cars196", "inshop", "nabirds", "compcars", "fashion200k", "img2dataset"])

LAYOUTS = """dataset layouts (--root is the dataset's top directory, as distributed):
  imagefolder  ROOT/<class>/**/*.jpg (labeled, class = sub-directory) or ROOT/*.jpg (flat = unlabeled)
  cub          ROOT/{images.txt,image_class_labels.txt,classes.txt,images/} (or ROOT/CUB_200_2011/...);
               classes 1-100 -> OUT/train, 101-200 -> OUT/test
  cars196      ROOT/cars_annos.mat + ROOT/car_ims/; classes 1-98 -> OUT/train, 99-196 -> OUT/test
  inshop       ROOT/[Eval/]list_eval_partition.txt + ROOT/[Img/]img/...; OUT/{train,query,gallery}
               (query and gallery share one class-id space)
  nabirds      ROOT/{images.txt,image_class_labels.txt,classes.txt,images/}  -> unlabeled, truth in json
  compcars     ROOT/[data/]image/<make>/<model>/<year>/*.jpg               -> unlabeled, truth in json
  fashion200k  ROOT/labels/*.txt (path<TAB>score<TAB>description) + ROOT/women/... -> unlabeled
  img2dataset  ROOT/<digits>.tar written by img2dataset: validated and indexed in place (no copy);
               OUT/index.json points at ROOT's tars
Single-split formats write OUT/<prefix>-%06d.tar; re-running skips finished shards."""


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
        help="multi-split formats: which split to write (default all); single-split formats: the shard name prefix",
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
    w.add_argument("--no-progress", action="store_true")
    ix = sub.add_parser("index", help="rebuild index.json of a shard directory from its tars")
    ix.add_argument("shard_dir")
    cp = sub.add_parser("check-pseudo", help="verify pl-%%06d.npz files against their image shards")
    cp.add_argument("unlabeled_dir")
    cp.add_argument("pseudo_dir")
    return p


def unvalidated_img2dataset(shard_dir: str | os.PathLike[str]) -> str | None:
    """When `shard_dir` holds img2dataset shards (<digits>.tar) without the index.json that
    `write --format img2dataset` writes after decoding every image once: the command that does it.
    None for any other directory (slade_dist's own shards, an index from that command, no tars)."""
    d = Path(shard_dir)
    if not d.is_dir() or not any(IMG2DATASET_TAR.fullmatch(p.name) for p in d.glob("*.tar")):
        return None
    try:
        index = json.loads((d / "index.json").read_text())
    except (OSError, ValueError):  # missing or unreadable: a scan would write one, unvalidated
        index = {}
    if isinstance(index, dict) and index.get("format") == "img2dataset":
        return None
    return f"python -m slade_dist.data write --format img2dataset --root {d} --out {d}"


def describe_unvalidated(key: str, shard_dir: str, command: str) -> str:
    """The refusal the stage commands and the launcher print for unvalidated img2dataset output."""
    return (
        f"{key}: {shard_dir} holds img2dataset output that was never validated (corrupt images and "
        f"truncated tars would go unnoticed): run `{command}` once (decodes every image, writes "
        f"index.json beside the tars, copies nothing), or point {key} at the --out directory of an "
        "earlier `write --format img2dataset`"
    )


def main(argv: list[str] | None = None) -> int:
    """The shard tools; a user error ends them with one line and exit code 2 (errors.py). Every
    ValueError of the converters is about the dataset or the arguments, so it counts as one here."""
    return exit_on_user_error(_main, argv, PROG, also=(ValueError,))


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "write":
        return _write(args)
    if args.cmd == "index":
        return _index(args.shard_dir)
    if args.cmd == "check-pseudo":
        return _check_pseudo(args.unlabeled_dir, args.pseudo_dir)
    return 1


def _write(args: argparse.Namespace) -> int:
    # imported here: the launcher imports this module for unvalidated_img2dataset, without torch
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
            f"rejected" + (f", {idx['num_classes']} classes" if "num_classes" in idx else "")
        )
    return 0


def _index(shard_dir: str) -> int:
    from .shards import INDEX_FILE, read_index

    (Path(shard_dir) / INDEX_FILE).unlink(missing_ok=True)
    idx = read_index(shard_dir)
    print(json.dumps({"shards": len(idx["shards"]), "total": idx["total"], "kind": idx["kind"]}))
    return 0


def _check_pseudo(unlabeled_dir: str, pseudo_dir: str) -> int:
    from .pseudo_join import check_zip
    from .readers import resolve_shards

    n = sum(check_zip(s, pseudo_dir) for s in resolve_shards(unlabeled_dir))
    print(f"ok: {n} pseudo-labeled samples zip with their image shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
