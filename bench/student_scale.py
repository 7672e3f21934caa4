"""Benchmark: what web.yaml's student step costs per GPU: pair-work memory and FLOPs per image.

The student's unlabeled terms (basis.PairBlock, L_SD, Eq. 7 mining, the MS loss on the mined pairs)
work on this rank's rows (anchors) against the global batch (candidates): B_rank x B_global
entries per rank. The baseline is the previous cross-rank loss, which built the B_global x
B_global matrix on every rank. Both are measured, not modelled: one process runs the real terms
forward + backward at B unlabeled rows (anchors = candidates = B), in a fresh subprocess whose
peak RSS above its start is the pair work; bytes per pair entry follow, and the web shape (512
anchors x 32,768 candidates per rank, configs/web.yaml) has exactly 4096^2 entries, the size of
the full-size measurement. FLOPs per image: torch's FlopCounterMode over one ResNet-50 embedder
training step at 224 px (forward + backward), the count the GPU-hour arithmetic in
docs/SCALING.md uses.
  python bench/student_scale.py            # B = 4096 (the web shape's entries), ~2 GB
  python bench/student_scale.py --quick    # B = 1024, extrapolated
Last line: one JSON object {"bench", "ours": GiB per rank at web.yaml's step, "baseline": GiB per
rank of the global x global matrix, "unit", "ratio", "flops_per_image", ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WEB_RANKS, WEB_UNLABELED, WEB_LABELED, CLASSES, DIM = 64, 32768, 256, 100, 128


def pair_work(b: int) -> None:
    """The student's unlabeled terms at b rows, forward + backward; prints peak RSS growth (bytes)."""
    import torch

    from slade_dist.basis import FeatureBasis
    from slade_dist.losses import MultiSimilarityLoss

    torch.manual_seed(0)
    emb = torch.randn(b, DIM, requires_grad=True)
    pl = torch.arange(b) // 4  # K = 4 rows per pseudo-class
    basis = FeatureBasis(CLASSES, DIM)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    block = basis.pair_block(emb, pl)
    sd, _ = basis.sd_loss(block)
    basis.sd_loss(block)  # twice: the second seeds nothing and mines with the batch's thresholds
    pos, neg = basis.mine_pairs(block)
    loss = sd + MultiSimilarityLoss()(emb, pos_pairs=pos, neg_pairs=neg)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rows": b, "bytes": peak - before, "mined": int(pos.shape[1] + neg.shape[1])}))


def measure(b: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--pair-work", str(b)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def flops_per_image(size: int = 224) -> float:
    """Forward + backward FLOPs of one ResNet-50 embedder image (FlopCounterMode, batch 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from slade_dist.config import ModelConfig
    from slade_dist.models import build_embedder

    model = build_embedder(ModelConfig(backbone="resnet50", embed_dim=128, freeze_bn=True)).train()
    x = torch.randn(2, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="B = 1024 instead of 4096")
    ap.add_argument("--pair-work", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pair_work:
        return pair_work(args.pair_work)
    b = 1024 if args.quick else 4096
    m = measure(b)
    per_entry = m["bytes"] / (b * b)
    per_rank = WEB_UNLABELED // WEB_RANKS
    ours = per_entry * per_rank * WEB_UNLABELED / 2**30
    baseline = per_entry * WEB_UNLABELED * WEB_UNLABELED / 2**30
    flops = flops_per_image()
    images = 30500 * (WEB_UNLABELED + WEB_LABELED)
    print(f"pair work at B = {b}: {m['bytes'] / 2**20:.0f} MiB peak ({per_entry:.1f} bytes per pair entry)")
    print(f"web.yaml student, per rank: {per_rank} x {WEB_UNLABELED} entries -> {ours:.2f} GiB")
    print(f"previous cross-rank loss, per rank: {WEB_UNLABELED} x {WEB_UNLABELED} entries -> {baseline:.1f} GiB")
    print(f"ResNet-50 training FLOPs per 224 px image (fwd + bwd): {flops / 1e9:.2f} GFLOP")
    print(f"a round: {images:.3g} images, {images * flops:.3g} FLOP")
    print(
        json.dumps(
            {
                "bench": "student_scale",
                "ours": round(ours, 3),
                "baseline": round(baseline, 2),
                "unit": "GiB of pair work per rank at web.yaml's student step (512 x 32,768 vs 32,768^2)",
                "ratio": round(ours / baseline, 5),
                "bytes_per_pair_entry": round(per_entry, 1),
                "measured_rows": b,
                "flops_per_image": round(flops),
                "images_per_round": images,
                "round_flop": float(f"{images * flops:.4g}"),
                "entries_check": math.isclose(per_rank * WEB_UNLABELED, 4096**2),
            }
        )
    )


if __name__ == "__main__":
    main()
