"""The curate stage's thresholds, calibrated on edited copies of test images (calibration.json).

Owns `PairCheck` (the copy decision of a candidate pair: within `candidate_radius` by colour
histogram, then data/copies.copy_match: a structure score from `match_threshold` AND a colour
difference up to `colour_threshold`), `choose_thresholds` (the rule) and `calibrate`: rank 0 gives
`curate.calibration_images` test images one edited copy each (data/copies.make_copy within the
`curate.copy_*` ranges) and checks up to twice as many test images against their candidates among
the other test images (the hardest distinct images the check meets); the radius is `radius_margin`
x the distance that keeps the `copy_quantile` of copy-to-original histogram distances (it only
picks what the pixel check sees). Each of the two pixel measures gets its threshold the same way
(`split_point`): the false-positive budget is a share of IMAGES (a pool image is removed when one
of its candidates passes), so the distinct side is each distinct image's best candidate on that
measure (an image without a candidate within the radius can never be flagged); the threshold keeps
the `copy_quantile` of copies and lies halfway to the value only `distinct_quantile` of distinct
images reach when that lies beyond it; when the two overlap, the copy quantile alone; when no
distinct image bounds it, as far beyond the copy quantile as the copies' median lies before it. A copy must
pass both, so the report estimates the joint rule on the same pairs (copies kept, distinct images
flagged); a WARNING when the flagged share exceeds `distinct_quantile`. Values set in the config
are used as given (and reported).
Tests: tests/unit/test_curate.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ... import dist
from ...config import Config
from ...data.copies import CopyEdits, Match, copy_match, make_copy, signature
from ...data.tars import TarSamples, image_bytes
from ...errors import UnusableInput
from ...fileio import atomic_write_json
from .references import TestImages
from .search import FlatIndex, cut, unit_rows

CALIBRATION_FILE = "calibration.json"
QUANTILES = (0.0, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.995, 0.998, 0.999, 1.0)


def split_point(
    copies: np.ndarray, distinct_best: np.ndarray, copy_q: float, distinct_q: float, copy_high: bool = True
) -> dict[str, Any]:
    """A threshold on one measure: keeps copy_q of the copies' values; halfway between that and the
    value only distinct_q of the distinct images reach with their best candidate when that lies
    beyond, else (`overlap`) the copy quantile alone. distinct_best: NaN for an image without a
    candidate (it can never be flagged); when no more than distinct_q of the images have one, the
    budget holds at any value and nothing distinct bounds the line: it lies as far beyond the copy
    quantile as that quantile lies from the copies' median (few calibration copies estimate a tail
    quantile poorly; the margin keeps the copies just beyond it). copy_high: copies score high (structure),
    else low (colour difference)."""
    sign = 1.0 if copy_high else -1.0
    c, d = sign * np.asarray(copies, np.float64), sign * np.asarray(distinct_best, np.float64)
    t_copy = float(np.quantile(c, 1.0 - copy_q))
    seen = d[np.isfinite(d)]
    allowed = distinct_q * len(d)  # distinct images the budget lets reach the threshold
    t_distinct = float(np.quantile(seen, 1.0 - allowed / len(seen))) if len(seen) > allowed else None
    overlap = t_distinct is not None and t_distinct >= t_copy
    if t_distinct is None:  # nothing distinct bounds it: as far beyond as the copies' own spread
        t = 2 * t_copy - float(np.median(c))
    else:
        t = t_copy if overlap else (t_copy + t_distinct) / 2
    return {
        "threshold": sign * t,
        "copy_quantile_value": sign * t_copy,
        "distinct_quantile_value": None if t_distinct is None else sign * t_distinct,
        "overlap": bool(overlap),
    }


def choose_thresholds(
    copy_dist: np.ndarray,
    copy_match: np.ndarray,
    distinct_best: np.ndarray,
    copy_q: float,
    distinct_q: float,
    margin: float = 1.0,
) -> dict[str, Any]:
    """Radius: margin x the distance that keeps copy_q of the copies. copy_match: (n, 2) the copies'
    (structure, colour difference); distinct_best: (m, 2) each distinct image's best candidate on
    each measure (highest structure, lowest colour difference). Each threshold by split_point."""
    if len(copy_match) == 0:
        raise UnusableInput("curate: the calibration has no copies (too few readable test images?)")
    copy_match, distinct_best = np.asarray(copy_match).reshape(-1, 2), np.asarray(distinct_best).reshape(-1, 2)
    structure = split_point(copy_match[:, 0], distinct_best[:, 0], copy_q, distinct_q)
    colour = split_point(copy_match[:, 1], distinct_best[:, 1], copy_q, distinct_q, copy_high=False)
    return {
        "candidate_radius": float(min(2.0, margin * np.quantile(copy_dist, copy_q))),
        "match_threshold": structure["threshold"],
        "colour_threshold": colour["threshold"],
        "structure": structure,
        "colour": colour,
    }


def _describe(x: np.ndarray) -> dict[str, Any]:
    x = np.asarray(x)[np.isfinite(x)]  # NaN: no candidate (counted beside)
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
    """The copy decision of a candidate pair: within the radius, then both pixel measures."""

    def __init__(self, radius: float, threshold: float, colour_threshold: float, cfg: Config) -> None:
        self.radius, self.threshold, self.colour_threshold = radius, threshold, colour_threshold
        self.min_area, self.max_rotation = cfg.curate.copy_min_area, cfg.curate.copy_max_rotation
        self.checked = 0

    def match(self, a: np.ndarray, b: np.ndarray) -> Match:
        self.checked += 1
        return copy_match(a, b, self.min_area, self.max_rotation)

    def passes(self, m: Match | np.ndarray) -> bool | np.ndarray:
        """Whether a match (or (n, 2) rows of them) is a copy."""
        m = np.asarray(m)
        return (m[..., 0] >= self.threshold) & (m[..., 1] <= self.colour_threshold)


def calibrate(tests: TestImages, out_dir: Path, cfg: Config) -> dict[str, Any]:
    """Rank 0 measures copies and distinct pairs and picks the thresholds; every rank gets them."""
    report = _calibration_report(tests, out_dir, cfg) if dist.is_main() else None
    report = dist.broadcast_object(report)
    flagged = report["estimates"]["distinct_flagged_share"]
    if flagged > cfg.curate.distinct_quantile and dist.is_main():
        dist.get_logger().warning(
            f"[curate] copies and distinct test images overlap: at structure >= {report['match_threshold']:.4f} and "
            f"colour difference <= {report['colour_threshold']:.2f}, {flagged:.2%} of distinct test images would be "
            f"flagged as copies of another (budget curate.distinct_quantile {cfg.curate.distinct_quantile:.3g}), "
            f"{report['estimates']['copy_recall']:.2%} of calibration copies found (calibration.json)"
        )
    return report


def _given_or(value: float | None, calibrated: float) -> tuple[float, str]:
    return (float(value), "config") if value is not None else (float(calibrated), "calibrated")


def _calibration_report(tests: TestImages, out_dir: Path, cfg: Config) -> dict[str, Any]:
    c = cfg.curate
    rng = np.random.default_rng([c.seed, 1])
    rows = np.sort(rng.choice(len(tests.keys), min(c.calibration_images, len(tests.keys)), replace=False))
    copies, edits = _copies(tests, rows, cfg, rng)
    index = FlatIndex(tests.hist)
    probe = PairCheck(2.0, 2.0, 0.0, cfg)
    copy_dist = np.linalg.norm(unit_rows(copies["hist"]) - tests.hist[rows], axis=1)
    copy_match = np.array(
        [probe.match(cut(t, s), tests.thumb(int(r))) for t, s, r in zip(copies["thumb"], copies["shape"], rows)],
        np.float64,
    ).reshape(-1, 2)
    queries = np.sort(rng.choice(len(tests.keys), min(2 * c.calibration_images, len(tests.keys)), replace=False))
    loose = c.candidate_radius
    if loose is None:
        loose = min(2.0, c.radius_margin * float(np.quantile(copy_dist, c.copy_quantile)))
    distinct, of_query = _distinct_matches(tests, index, queries, loose, probe, c.candidates)
    best = _best_per_query(distinct, of_query, len(queries))
    cal = choose_thresholds(copy_dist, copy_match, best, c.copy_quantile, c.distinct_quantile, c.radius_margin)
    radius, radius_source = _given_or(c.candidate_radius, cal["candidate_radius"])
    threshold, threshold_source = _given_or(c.match_threshold, cal["match_threshold"])
    colour, colour_source = _given_or(c.colour_threshold, cal["colour_threshold"])
    check = PairCheck(radius, threshold, colour, cfg)
    found = _retrieved(index, unit_rows(copies["hist"]), rows, c.candidates)
    flagged = np.zeros(len(queries), bool)
    np.logical_or.at(flagged, of_query, check.passes(distinct) & (distinct[:, 2] <= radius))
    report = {
        "rule": (
            f"candidate radius = {c.radius_margin} x the {c.copy_quantile} quantile of copy-to-original "
            f"colour-histogram distances; "
            f"match threshold (structure: gradient correlation) and colour threshold (mean RGB difference at the "
            f"best alignment) = each the value all but {1 - c.copy_quantile:.3g} of copies reach, placed halfway to "
            f"the value only {c.distinct_quantile} of distinct test images reach with their best candidate when that "
            f"lies beyond (else the copy quantile alone). A pool image is a copy of a test image when one of its "
            f"{c.candidates} nearest test images by histogram lies within the radius, scores >= the match threshold "
            f"and differs in colour by <= the colour threshold"
        ),
        "candidate_radius": radius,
        "candidate_radius_source": radius_source,
        "match_threshold": threshold,
        "match_threshold_source": threshold_source,
        "colour_threshold": colour,
        "colour_threshold_source": colour_source,
        "calibrated": cal,
        "estimates": {
            "copy_recall": float(np.mean(found & (copy_dist <= radius) & check.passes(copy_match))),
            "copy_original_among_candidates": float(np.mean(found)),
            "distinct_flagged_share": float(np.mean(flagged)) if len(flagged) else 0.0,
            "distinct_flagged_by_structure_alone": float(np.mean(np.nan_to_num(best[:, 0], nan=-1.0) >= threshold))
            if len(queries)
            else 0.0,
        },
        "copies": {
            "histogram_distance": _describe(copy_dist),
            "score": _describe(copy_match[:, 0]),
            "colour_difference": _describe(copy_match[:, 1]),
            "edits": vars(copy_edits(cfg)),
            "examples": edits[:20],
        },
        "distinct": {
            "score": _describe(distinct[:, 0]),
            "colour_difference": _describe(distinct[:, 1]),
            "best_score": _describe(best[:, 0]),
            "best_colour_difference": _describe(best[:, 1]),
            "queries": len(queries),
            "queries_with_a_candidate": int(np.isfinite(best[:, 0]).sum()),
            "what": (
                f"pixel checks of {len(queries)} test images against their candidates among the other test images "
                f"(other bytes, within the radius): the hardest distinct pairs the check meets; best_*: each image "
                f"with a candidate: its best candidate on that measure"
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


def _distinct_matches(
    tests: TestImages, index: FlatIndex, queries: np.ndarray, radius: float, check: PairCheck, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(structure, colour difference, histogram distance) of each query test image against each of
    its candidates among the OTHER test images (other bytes, within the radius), and the query
    (index into queries) of each row."""
    d, nn = index.search(tests.hist[queries], k + 1)
    rows, of_query = [], []
    for qi, (q, ds, ns) in enumerate(zip(queries, d, nn)):
        for dj, j in zip(ds, ns):
            if j < 0 or dj > radius or tests.byte_twin[j] == tests.byte_twin[q]:
                continue
            rows.append((*check.match(tests.thumb(int(q)), tests.thumb(int(j))), float(dj)))
            of_query.append(qi)
    return np.array(rows, np.float64).reshape(-1, 3), np.array(of_query, np.int64)


def _best_per_query(distinct: np.ndarray, of_query: np.ndarray, n: int) -> np.ndarray:
    """(n, 2): each query's highest structure and lowest colour difference over its candidates
    (NaN without one)."""
    best = np.tile([-np.inf, np.inf], (n, 1))
    np.maximum.at(best[:, 0], of_query, distinct[:, 0])
    np.minimum.at(best[:, 1], of_query, distinct[:, 1])
    best[~np.isfinite(best)] = np.nan
    return best


def _retrieved(index: FlatIndex, hists: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Whether each copy's original is among its k nearest test images by histogram."""
    _, nn = index.search(hists, k)
    return (nn == rows[:, None]).any(axis=1)
