"""The curate stage's entry: `run`, what it writes and what it reports.

Order: the test images (references.py), the thresholds (calibration.py), each unlabeled shard
scanned against them (scan.py), near-duplicate groups among what is left (dedup.py), then each rank
writes its shards' decisions (data/curation.py: `cur-%06d.npz`, what the cluster stage reads) and
rank 0 the removed list (`decontaminated.tsv`: every removed-for-test image, its structure score,
colour difference and the test image it copies), TensorBoard `tb/curate` and, last, `curate.json`
(the summary: counts per test set and reason, thresholds and where they came from, the groups,
timings; its presence marks a complete curation). A rerun keeps the per-shard scans made against
the same test sets with the same thresholds (`scan.json`) and redoes the rest.
Tests: tests/unit/test_curate.py, tests/integration/test_curate_multirank.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ... import dist
from ...config import Config
from ...data.curation import (
    DUPLICATE,
    KEPT,
    NEAR_TEST,
    REASONS,
    SAME_BYTES,
    SUMMARY_FILE,
    UNREADABLE,
    decisions_path,
    write_decisions,
    write_removed_list,
)
from ...data.shards import unlabeled_pool
from ...fileio import atomic_write_json
from ...provenance import shard_dir_id
from ...stages import RunLayout
from ...tb import TBWriter
from .calibration import PairCheck, calibrate
from .dedup import DUP, DUPLICATES_FILE, groups_of, near_duplicates
from .references import TestImages, load_test_images, required_test_sets
from .scan import PoolShard, scan_pool
from .search import summed, summed_int

FINGERPRINT_FILE = "scan.json"


def run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Curate the unlabeled pool; every rank calls it (collectives inside)."""
    t0 = time.time()
    layout = RunLayout(run_dir)
    out_dir = layout.stage_dir("curate")
    shards = unlabeled_pool(cfg.data.unlabeled_shards, "curate")
    sets = required_test_sets(cfg)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    tests = load_test_images(sets)
    report = calibrate(tests, out_dir, cfg)
    check = PairCheck(report["candidate_radius"], report["match_threshold"], report["colour_threshold"], cfg)
    if dist.is_main():
        _reset(out_dir, _fingerprint(sets, shards, check, cfg))
    dist.barrier()
    t_scan = time.time()
    pool = scan_pool(shards, out_dir, tests, check, cfg)
    t_scan = time.time() - t_scan
    t_dedup = time.time()
    groups: dict[str, Any] = {"enabled": False}
    dup = np.zeros(0, DUP)
    if cfg.curate.dedup:
        groups = {"enabled": True, **near_duplicates(pool, check, out_dir, cfg)}
        dup = np.load(out_dir / DUPLICATES_FILE)
    t_dedup = time.time() - t_dedup
    removed_rows, counts = _write_decisions(pool, dup, tests, out_dir)
    summary = _summary(cfg, tests, report, groups, counts, len(shards))
    summary["pixel_checks"] = summed_int(check.checked)
    summary["seconds"] = {"scan": round(t_scan, 2), "dedup": round(t_dedup, 2), "total": round(time.time() - t0, 2)}
    if dist.is_main():
        write_removed_list(out_dir, removed_rows)
        _tensorboard(layout.tb_dir("curate"), report, summary)
        atomic_write_json(out_dir / SUMMARY_FILE, {**summary, "token": f"{time.time_ns()}-{os.getpid()}"}, indent=1)
    dist.barrier()
    dist.get_logger().info(_closing_line(summary))
    return summary


def _fingerprint(sets: dict[str, str], shards: list[Path], check: PairCheck, cfg: Config) -> dict[str, Any]:
    """What a shard's scan depends on: a rerun with the same keeps the scans."""
    return {
        "tests": {name: shard_dir_id(d) for name, d in sets.items()},
        "shards": [p.name for p in shards],
        "check": [
            check.radius,
            check.threshold,
            check.colour_threshold,
            check.min_area,
            check.max_rotation,
            cfg.curate.candidates,
        ],
        "hash_check": cfg.curate.hash_check,
    }


def _reset(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Rank 0, at start: the completion mark and the global steps' files always go; the per-shard
    scans stay only when made against these test sets with these thresholds and ranges."""
    for name in (SUMMARY_FILE, DUPLICATES_FILE):
        (out_dir / name).unlink(missing_ok=True)
    for p in out_dir.glob("pairs-*.npy"):
        p.unlink()
    try:
        same = json.loads((out_dir / FINGERPRINT_FILE).read_text()) == json.loads(json.dumps(fingerprint))
    except (FileNotFoundError, json.JSONDecodeError):
        same = False
    if not same:
        for p in [*out_dir.glob("scan-*.npz"), *out_dir.glob("cur-*.npz")]:
            p.unlink()
        atomic_write_json(out_dir / FINGERPRINT_FILE, fingerprint)


def _write_decisions(
    pool: list[PoolShard], dup: np.ndarray, tests: TestImages, out_dir: Path
) -> tuple[list[tuple], dict[str, Any]]:
    """Each rank writes its shards' cur-%06d.npz; returns the removed-for-test rows (gathered) and
    the counts summed over ranks."""
    rows: list[tuple] = []
    codes = (KEPT, NEAR_TEST, SAME_BYTES, DUPLICATE, UNREADABLE)
    totals = np.zeros(1 + len(codes), np.int64)  # pool, then one count per code
    per_set = np.zeros((len(tests.names), 2), np.int64)  # per test set: copies (pixel check), same bytes
    for s in pool:
        reason = s.reason.copy()
        group = groups_of(s, dup)
        reason[(reason == KEPT) & (group >= 0) & (group != s.first + np.arange(s.n))] = DUPLICATE
        write_decisions(decisions_path(out_dir, s.path), s.scan["key_id"], reason, group, s.scan["test_score"])
        totals += [s.n, *((reason == code).sum() for code in codes)]
        for i in np.flatnonzero(np.isin(reason, (NEAR_TEST, SAME_BYTES))):
            same = reason[i] == SAME_BYTES
            t_row = int(s.scan["same_row"][i] if same else s.scan["copy_row"][i])
            per_set[tests.set_of[t_row], int(same)] += 1
            rows.append((s.path.name, str(s.scan["keys"][i]), REASONS[int(reason[i])],
                         1.0 if same else float(s.scan["test_score"][i]),
                         0.0 if same else float(s.scan["test_colour"][i]),
                         tests.names[int(tests.set_of[t_row])], tests.keys[t_row]))  # fmt: skip
    totals, per_set = summed(totals), summed(per_set)
    counts = dict(zip(("pool", "kept", "near_test", "same_bytes", "duplicates", "unreadable"), map(int, totals)))
    counts["per_test_set"] = {
        name: {
            "images": int((tests.set_of == j).sum()),
            "removed": int(per_set[j].sum()),
            "copies": int(per_set[j, 0]),
            "same_bytes": int(per_set[j, 1]),
        }
        for j, name in enumerate(tests.names)
    }
    return sorted(row for part in dist.all_gather_object(rows) for row in part), counts


def _summary(
    cfg: Config,
    tests: TestImages,
    report: dict[str, Any],
    groups: dict[str, Any],
    counts: dict[str, Any],
    n_shards: int,
) -> dict[str, Any]:
    return {
        "pool": counts["pool"],
        "kept": counts["kept"],
        "removed": {k: counts[k] for k in ("near_test", "same_bytes", "duplicates")},
        "unreadable": counts["unreadable"],
        "per_test_set": counts["per_test_set"],
        "decontaminate": cfg.curate.decontaminate,
        "candidate_radius": report["candidate_radius"],
        "match_threshold": report["match_threshold"],
        "colour_threshold": report["colour_threshold"],
        "thresholds_source": {
            k: report[f"{k}_source"] for k in ("candidate_radius", "match_threshold", "colour_threshold")
        },
        "calibration": report["estimates"],
        "duplicate_groups": groups,
        "shards": n_shards,
        "world_size": dist.world_size(),
        "data": {
            "images_read": counts["pool"],
            "unreadable": counts["unreadable"],
            "test_images": len(tests.keys),
            "test_images_unreadable": tests.unreadable,
            "removed_for_tests": counts["near_test"] + counts["same_bytes"],
            "removed_duplicates": counts["duplicates"],
        },
    }


def _tensorboard(tb_dir: Path, report: dict[str, Any], summary: dict[str, Any]) -> None:
    with TBWriter(tb_dir, enabled=True) as tb:
        tb.scalars(
            {
                "curate/candidate_radius": summary["candidate_radius"],
                "curate/match_threshold": summary["match_threshold"],
                "curate/colour_threshold": summary["colour_threshold"],
                "curate/removed_copies": summary["removed"]["near_test"],
                "curate/removed_same_bytes": summary["removed"]["same_bytes"],
                "curate/removed_duplicates": summary["removed"]["duplicates"],
                "curate/kept": summary["kept"],
                **{f"curate/calibration_{k}": v for k, v in summary["calibration"].items()},
            },
            0,
        )
        tb.text(
            "curate/calibration",
            "```\n" + json.dumps({k: report[k] for k in ("rule", "calibrated")}, indent=1) + "\n```",
        )


def _closing_line(s: dict[str, Any]) -> str:
    per_set = ", ".join(f"{n}: {v['removed']}" for n, v in s["per_test_set"].items())
    g = s["duplicate_groups"]
    dups = (
        f"{g['groups']} near-duplicate groups, {s['removed']['duplicates']} removed" if g.get("enabled") else "no dedup"
    )
    for_tests = s["removed"]["near_test"] + s["removed"]["same_bytes"]
    return (
        f"[curate] pool {s['pool']}, kept {s['kept']}; removed as copies of test images {for_tests} ({per_set}; "
        f"{s['removed']['same_bytes']} same bytes); {dups}; structure >= {s['match_threshold']:.4f}, colour "
        f"difference <= {s['colour_threshold']:.2f} within {s['candidate_radius']:.4f}; "
        f"{s['pixel_checks']} pixel checks"
    )
