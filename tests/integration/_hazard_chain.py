"""The process tests/integration/test_hazards.py runs under a memory cap: it caps its own address
space (resource.setrlimit(RLIMIT_AS), inherited by every command it starts and by their loader
workers), writes the hazard corpus (tests/_hazards.py), converts it with the real CLI
(`python -m slade_dist.data write`), runs the whole chain (`python -m slade_dist pipeline`), and
prints one JSON object: each command's exit status and stderr tail, what the corpus holds, and the
peak RSS of the commands (getrusage(RUSAGE_CHILDREN): the largest of them, loader workers included).

  python -m tests.integration._hazard_chain PLAN.json   (PLAN: {"root", "cap_gb", "overrides"})
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from tests import _hazards as H

REPO = Path(__file__).resolve().parents[2]


def cli(module: str, *args: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500
    )
    return {"rc": r.returncode, "stderr": r.stderr[-6000:], "stdout": r.stdout[-3000:]}


def unlabeled_tars(root: Path) -> dict:
    """img2dataset-style tars (jpg + json + txt): photos and every hazard; the last tar cut inside
    an image member. Returns the keys of the hazards the contract refuses, and the cut tar's name."""
    from slade_dist.data.shards import write_shard  # torch-free

    root.mkdir(parents=True)
    refused, n = [], 0
    hazards = list(H.HAZARDS.items())
    for t in range(3):
        rows = []
        for j in range(10):
            key = f"{t:05d}{j:04d}"
            rows.append({"__key__": key, "jpg": H.photo_jpeg(100 * t + j, j % 6), "json": b"{}", "txt": b"a photo"})
        for name, (make, ok) in hazards[t::3]:
            key = f"{t:05d}9{n:03d}"
            n += 1
            rows.append({"__key__": key, "jpg": make(), "json": json.dumps({"hazard": name}).encode(), "txt": b""})
            if not ok:
                refused.append(key)
        write_shard(root / f"{t:05d}.tar", rows)
    cut = root / "00002.tar"
    at = H.cut_points(cut)["inside_image"]
    cut.write_bytes(cut.read_bytes()[:at])
    return {"refused": refused, "cut": cut.name}


def bomb_shard(test_dir: Path) -> int:
    """Bombs in the labeled test split (as a set built elsewhere would hold them): eval meets them."""
    from slade_dist.data.shards import read_index, write_index, write_shard

    names = ("aspect_1000000x1.png", "pixels_10000x10000.png", "animated_gif_as.jpg")
    rows = [{"__key__": f"bomb{i}", "png": H.HAZARDS[n][0](), "cls": "0"} for i, n in enumerate(names)]
    n = write_shard(test_dir / "test-000099.tar", rows)
    idx = read_index(test_dir)
    shards = [*idx.pop("shards"), {"name": "test-000099.tar", "count": n}]
    idx.pop("total")
    write_index(test_dir, shards, idx.pop("kind"), **idx)
    return n


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    cap = int(plan["cap_gb"] * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    root = Path(plan["root"])
    src, shards = root / "src", root / "shards"
    out: dict = {"corpus": {}, "steps": {}}
    out["corpus"]["train"] = H.class_root(src / "train", classes=6, per_class=6, seed=0)
    out["corpus"]["test"] = H.class_root(src / "test", classes=4, per_class=5, seed=50, hazards=False)
    out["corpus"]["flat"] = H.flat_root(src / "flat")
    out["corpus"]["unlabeled"] = unlabeled_tars(src / "i2d")
    write = ("slade_dist.data", "write", "--no-progress", "--format")
    steps = out["steps"]
    steps["flat_refused"] = cli(*write, "imagefolder", "--root", str(src / "flat"), "--out", str(shards / "flat0"))
    steps["flat"] = cli(
        *write, "imagefolder", "--root", str(src / "flat"), "--out", str(shards / "flat"), "--split", "unlabeled"
    )
    steps["train"] = cli(*write, "imagefolder", "--root", str(src / "train"), "--out", str(shards / "train"))
    steps["test"] = cli(
        *write, "imagefolder", "--root", str(src / "test"), "--out", str(shards / "test"), "--split", "test"
    )
    out["corpus"]["test_bombs"] = bomb_shard(shards / "test") if steps["test"]["rc"] == 0 else 0
    steps["unlabeled"] = cli(*write, "img2dataset", "--root", str(src / "i2d"), "--out", str(shards / "unl"))
    steps["pipeline"] = cli("slade_dist", "pipeline", *plan["overrides"])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
