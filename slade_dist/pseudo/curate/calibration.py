"""The curate stage's thresholds, calibrated on edited copies of test images (calibration.json).

Owns `PairCheck` (the copy decision of a candidate pair: within `candidate_radius` by colour
histogram, then data/copies.copy_score from `match_threshold`), `choose_thresholds` (the rule) and
`calibrate`: rank 0 gives `curate.calibration_images` test images one edited copy each
(data/copies.make_copy within the `curate.copy_*` ranges) and scores up to twice as many test
images against their candidates among the other test images (the hardest distinct images the check
meets); the radius keeps the `copy_quantile` of copy-to-original histogram distances. The match
threshold keeps the `copy_quantile` of copy scores; the false-positive budget is a share of IMAGES
(a pool image is removed when its best candidate passes), so the distinct side is each distinct
image's best score, and the threshold lies halfway between the two quantiles when only
`distinct_quantile` of distinct images reach a score below the copies'; when the two overlap, the
copy quantile alone and a WARNING with the expected share of distinct images flagged. Values set
in the config are used as given (and reported).
Tests: tests/unit/test_curate.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ... import dist
from ...config import Config
from ...data.copies import CopyEdits, copy_score, make_copy, signature
from ...data.tars import TarSamples, image_bytes
from ...errors import UnusableInput
from ...fileio import atomic_write_json
from .references import TestImages
from .search import FlatIndex, cut, unit_rows

CALIBRATION_FILE = "calibration.json"
QUANTILES = (0.0, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.995, 0.998, 0.999, 1.0)


def choose_thresholds(
    copy_dist: np.ndarray, copy_scores: np.ndarray, distinct_best: np.ndarray, copy_q: float, distinct_q: float
) -> dict[str, Any]:
    """Radius: keeps copy_q of the copies' histogram distances. Match threshold: keeps copy_q of the
    copies' scores; halfway between that and the score only distinct_q of the distinct images reach
    with their best candidate (distinct_best: -1 without one) when that lies below, else
    (`overlap`) the copy quantile alone."""
    if len(copy_scores) == 0:
        raise UnusableInput("curate: the calibration has no copies (too few readable test images?)")
    radius = float(np.quantile(copy_dist, copy_q))
    t_copy = float(np.quantile(copy_scores, 1.0 - copy_q))
    t_distinct = float(np.quantile(distinct_best, 1.0 - distinct_q)) if len(distinct_best) else -1.0
    overlap = t_distinct >= t_copy
    t = t_copy if overlap else (t_copy + t_distinct) / 2
    return {
        "candidate_radius": radius,
        "match_threshold": t,
        "copy_quantile_score": t_copy,
        "distinct_quantile_score": t_distinct,
        "overlap": overlap,
    }


def _describe(x: np.ndarray) -> dict[str, Any]:
    if len(x) == 0:
        return {"n": 0}
    x = np.asarray(x, dtype=np.float64)  # float32 cannot hold 40 bins of a 1e-6 range (all values equal)
    hist, edges = np.histogram(x, bins=40, range=(float(x.min()), max(float(x.max()), float(x.min()) + 1e-6)))
    return {
        "n": int(len(x)),
        "quantiles": {str(q): round(float(np.quantile(x, q)), 5) for q in QUANTILES},
        "histogram": {"edges": [round(float(e), 5) for e in edges], "counts": hist.tolist()},
    }


def copy_edits(cfg: Config) -> CopyEdits:
    c = cfg.curate
    return CopyEdits(
        min_area=c.copy_min_area,
        max_rotation=c.copy_max_rotation,
        min_scale=c.copy_min_scale,
        max_scale=c.copy_max_scale,
        min_quality=c.copy_min_quality,
    )


class PairCheck:
    """The copy decision of a candidate pair: within the radius, then the pixel check."""

    def __init__(self, radius: float, threshold: float, cfg: Config) -> None:
        self.radius, self.threshold = radius, threshold
        self.min_area, self.max_rotation = cfg.curate.copy_min_area, cfg.curate.copy_max_rotation
        self.checked = 0

    def score(self, a: np.ndarray, b: np.ndarray, stop: bool = True) -> float:
        self.checked += 1
        return copy_score(a, b, self.min_area, self.max_rotation, self.threshold if stop else 2.0)


def calibrate(tests: TestImages, out_dir: Path, cfg: Config) -> dict[str, Any]:
    """Rank 0 measures copies and distinct pairs and picks the thresholds; every rank gets them."""
    report = _calibration_report(tests, out_dir, cfg) if dist.is_main() else None
    report = dist.broadcast_object(report)
    if report["calibrated"]["overlap"] and report["match_threshold_source"] == "calibrated" and dist.is_main():
        c = report["calibrated"]
        dist.get_logger().warning(
            f"[curate] copies and distinct test images overlap: the score {1 - cfg.curate.copy_quantile:.3g} of the "
            f"copies stay under ({c['copy_quantile_score']:.4f}) is below the one {cfg.curate.distinct_quantile:.3g} "
            f"of distinct test images reach with their best candidate ({c['distinct_quantile_score']:.4f}); at "
            f"threshold {report['match_threshold']:.4f} {report['estimates']['distinct_flagged_share']:.2%} of "
            f"distinct test images would be flagged (calibration.json)"
        )
    return report


def _calibration_report(tests: TestImages, out_dir: Path, cfg: Config) -> dict[str, Any]:
    c = cfg.curate
    rng = np.random.default_rng([c.seed, 1])
    rows = np.sort(rng.choice(len(tests.keys), min(c.calibration_images, len(tests.keys)), replace=False))
    copies, edits = _copies(tests, rows, cfg, rng)
    index = FlatIndex(tests.hist)
    probe = PairCheck(2.0, 2.0, cfg)
    copy_dist = np.linalg.norm(unit_rows(copies["hist"]) - tests.hist[rows], axis=1)
    copy_scores = np.array(
        [
            probe.score(cut(t, s), tests.thumb(int(r)), stop=False)
            for t, s, r in zip(copies["thumb"], copies["shape"], rows)
        ]
    )
    queries = np.sort(rng.choice(len(tests.keys), min(2 * c.calibration_images, len(tests.keys)), replace=False))
    loose = float(np.quantile(copy_dist, c.copy_quantile)) if c.candidate_radius is None else c.candidate_radius
    distinct, distinct_best = _distinct_scores(tests, index, queries, loose, probe, c.candidates)
    cal = choose_thresholds(copy_dist, copy_scores, distinct_best, c.copy_quantile, c.distinct_quantile)
    radius = c.candidate_radius if c.candidate_radius is not None else cal["candidate_radius"]
    threshold = c.match_threshold if c.match_threshold is not None else cal["match_threshold"]
    found = _retrieved(index, unit_rows(copies["hist"]), rows, c.candidates)
    report = {
        "rule": (
            f"candidate radius = the {c.copy_quantile} quantile of copy-to-original colour-histogram distances; "
            f"match threshold = the score all but {1 - c.copy_quantile:.3g} of copies reach, placed halfway to the "
            f"score only {c.distinct_quantile} of distinct test images reach with their best candidate when that "
            f"lies below (else the copy quantile alone, with a warning). A pool image is a copy of a test image when "
            f"one of its {c.candidates} nearest test images by histogram lies within the radius and scores >= the "
            f"threshold"
        ),
        "candidate_radius": float(radius),
        "candidate_radius_source": "config" if c.candidate_radius is not None else "calibrated",
        "match_threshold": float(threshold),
        "match_threshold_source": "config" if c.match_threshold is not None else "calibrated",
        "calibrated": cal,
        "estimates": {
            "copy_recall": float(np.mean(found & (copy_dist <= radius) & (copy_scores >= threshold))),
            "copy_original_among_candidates": float(np.mean(found)),
            "distinct_flagged_share": float(np.mean(distinct_best >= threshold)) if len(distinct_best) else 0.0,
        },
        "copies": {
            "histogram_distance": _describe(copy_dist),
            "score": _describe(copy_scores),
            "edits": vars(copy_edits(cfg)),
            "examples": edits[:20],
        },
        "distinct": {
            "score": _describe(distinct),
            "best_score": _describe(distinct_best),
            "what": (
                f"pixel-check scores of {len(queries)} test images against their candidates among the other test "
                f"images (other bytes, within the radius): the hardest distinct pairs the check meets; best_score: "
                f"each image's best (-1: no candidate within the radius)"
            ),
        },
        "test_images": len(tests.keys),
    }
    atomic_write_json(out_dir / CALIBRATION_FILE, report, indent=1)
    return report


def _copies(
    tests: TestImages, rows: np.ndarray, cfg: Config, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], list[str]]:
    """One edited copy of each chosen test image, read again from its tar, and its signature."""
    wanted: dict[int, dict[str, int]] = {}
    for r in rows:
        wanted.setdefault(int(tests.shard_of[r]), {})[tests.keys[int(r)]] = int(r)
    made: dict[int, tuple] = {}
    for i in sorted(wanted):
        for sample in TarSamples(tests.shards[i]):
            r = wanted[i].get(sample.get("__key__", ""))
            if r is not None and r not in made:
                data, edit = make_copy(image_bytes(sample), rng, copy_edits(cfg))
                made[r] = (*signature(data), edit)
    order = [int(r) for r in rows]
    return {
        "hist": np.array([made[r][0] for r in order], np.float32),
        "thumb": np.array([made[r][1] for r in order], np.uint8),
        "shape": np.array([made[r][2] for r in order], np.uint8),
    }, [made[r][3] for r in order]


def _distinct_scores(
    tests: TestImages, index: FlatIndex, queries: np.ndarray, radius: float, check: PairCheck, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of each query test image against its candidates among the OTHER test images (other
    bytes, within the radius), and each query's best score (-1 without a candidate)."""
    d, nn = index.search(tests.hist[queries], k + 1)
    scores, best = [], []
    for q, ds, ns in zip(queries, d, nn):
        top = -1.0
        for dj, j in zip(ds, ns):
            if j < 0 or dj > radius or tests.byte_twin[j] == tests.byte_twin[q]:
                continue
            s = check.score(tests.thumb(int(q)), tests.thumb(int(j)), stop=False)
            scores.append(s)
            top = max(top, s)
        best.append(top)
    return np.asarray(scores, np.float32), np.asarray(best, np.float32)


def _retrieved(index: FlatIndex, hists: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Whether each copy's original is among its k nearest test images by histogram."""
    _, nn = index.search(hists, k)
    return (nn == rows[:, None]).any(axis=1)
