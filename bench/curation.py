"""Benchmark: the curate stage on the demo with planted copies, against hash-only curation.

One round of configs/demo.yaml with `demo.planted_test_copies` edited copies of test images and
`demo.duplicate_groups` planted duplicate groups mixed into the unlabeled shards (data/demo.py;
their identity is read back from planted.json here, never by a stage): curate -> pretrain ->
teacher -> embed -> cluster -> eval (the teacher). Measured against planted.json:
- ours: share of planted test copies the curate stage removed; share of the other unlabeled
  images (neither a planted copy nor in a planted group) it removed (for a test set, or as a
  duplicate); share of planted duplicate groups left with
  exactly one member in the pool; planted groups with two members in the student's member index.
- baseline: byte-identical matching only (what a hash check gives): the planted copies whose
  bytes equal their test image's, and duplicate groups whose copies are all byte-identical.
- balance: the cluster stage again at each curate.cluster_cap of --caps: precision of the
  same-cluster pairs the student draws (P x K draws are cluster-weighted by kept members; pairs of
  two kept members of one cluster, against the hidden labels), the largest cluster's share and
  the members the cap leaves out.
- rates (the figures docs/SCALING.md extrapolates from), one thread: copy signatures per second of
  500x375 photo-like JPEGs (decode at a reduced scale, colour histogram, thumbnail), pixel checks
  per second (copy_match of pairs that are not copies: the full search, then the colours), and FAISS IndexFlatIP
  GFLOP/s on 512-d histograms (2 x d FLOP per distance).
- student (--student): the student of round 1 on the default clusters (curate.cluster_cap 0): the
  precision of its pseudo-positive pairs and of both Eq. 7 readings' mined pairs against the hidden
  classes (its DONE.json `truth_precision`, train/student.py TruthPrecision) and its MAP@R / P@1
  on the test classes (bench/_demo.py metrics_of, the eval stage's numbers); --alternatives: the
  same for each named alternative pseudo-label setting (ALTERNATIVES: the cluster stage and the
  student rerun on the same teacher), so each comparison is paired within a seed.
--seeds N: the whole measure on N demos (demo.seed = run.seed = 0 .. N-1: other classes, images,
  planted copies and training draws), reported per seed and as mean +- std.
--quick: the demo at 32 px (bench/_demo.py "quick"), 30 pretrain / 100 teacher / 100 student steps.
--rates-only: only the rates.
The last line is one JSON object {"bench": "curation", "ours": planted test copies removed (share,
mean over seeds), "baseline": the hash check's share, "unit", "ratio", "per_seed", "students", ...}.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _demo import DEMO, ROOT, metrics_of, prepare_data, summarise

from slade_dist.config import load_config
from slade_dist.data.curation import KEPT, NEAR_TEST, SAME_BYTES, decisions_path, read_decisions
from slade_dist.data.demo import read_planted
from slade_dist.data.pseudo_index import ClusterIndex
from slade_dist.data.shards import shard_paths
from slade_dist.data.tars import TarSamples
from slade_dist.pseudo import embed as embed_files
from slade_dist.runner import run_stage
from slade_dist.stages import RunLayout

QUICK_STEPS = ["pretrain.steps=30", "train.teacher_steps=100", "train.student_steps=100"]
# alternative pseudo-label settings measured beside the defaults (--alternatives): each reruns the
# cluster stage and the student from the same teacher
ALTERNATIVES: dict[str, list[str]] = {
    "no_curation": ["curate.enabled=false"],
    "k50": ["pseudo.k=50"],
    "k200": ["pseudo.k=200"],
    "dist50": ["data.pseudo_max_dist_percentile=50"],
}


def prepare(bench_dir: Path, quick: bool, copies: int, groups: int, seed: int = 0) -> list[str]:
    """The planted demo of a seed (seed 0: the demo's own draw, in the directory it always had)."""
    planted = [f"demo.planted_test_copies={copies}", f"demo.duplicate_groups={groups}"]
    if seed:
        planted.append(f"demo.seed={seed}")
    return prepare_data(bench_dir, quick, demo=planted, tag="-planted" + (f"-s{seed}" if seed else ""))


def decisions(run_dir: Path, unlabeled: Path) -> dict[str, tuple[int, int]]:
    """key -> (reason, group) of every unlabeled sample (a decisions file has a row per tar sample)."""
    cur_dir = RunLayout(run_dir).stage_dir("curate")
    out = {}
    for shard in shard_paths(unlabeled):
        d = read_decisions(decisions_path(cur_dir, shard))
        keys = [s["__key__"] for s in TarSamples(shard)]
        out.update({k: (int(r), int(g)) for k, r, g in zip(keys, d["reason"], d["group"])})
    return out


def measure(decided: dict[str, tuple[int, int]], planted: dict[str, Any]) -> dict[str, Any]:
    copies = planted["test_copies"]
    copy_keys = {c["key"] for c in copies}
    group_keys = {k for g in planted["duplicate_groups"] for k in g["keys"]}
    # others: neither a planted copy nor in a planted group (which member represents a group is the
    # stage's choice: its first row, not necessarily the planted original)
    others = [k for k in decided if k not in copy_keys and k not in group_keys]
    removed_copies = [c for c in copies if decided[c["key"]][0] != KEPT]
    exact = [c for c in copies if c["edit"] == "same bytes"]
    collapsed = [g for g in planted["duplicate_groups"] if sum(decided[k][0] == KEPT for k in g["keys"]) == 1]
    hash_groups = [g for g in planted["duplicate_groups"] if all(e in ("original", "same bytes") for e in g["edits"])]
    missed = [c for c in copies if decided[c["key"]][0] == KEPT]
    return {
        "test_copies": len(copies),
        "test_copies_removed": len(removed_copies) / max(len(copies), 1),
        "test_copies_removed_edited": sum(c["edit"] != "same bytes" for c in removed_copies)
        / max(sum(c["edit"] != "same bytes" for c in copies), 1),
        "hash_only_removed": len(exact) / max(len(copies), 1),
        "missed_copies": [c["edit"] for c in missed][:20],
        "others": len(others),
        "others_removed": sum(decided[k][0] != KEPT for k in others) / max(len(others), 1),
        "others_removed_for_tests": sum(decided[k][0] in (NEAR_TEST, SAME_BYTES) for k in others) / max(len(others), 1),
        "others_removed_as_duplicates": sum(decided[k][0] == 3 for k in others) / max(len(others), 1),
        "duplicate_groups": len(planted["duplicate_groups"]),
        "groups_collapsed": len(collapsed) / max(len(planted["duplicate_groups"]), 1),
        "groups_not_collapsed": [_group_fate(g, decided) for g in planted["duplicate_groups"] if g not in collapsed],
        "hash_only_groups_collapsed": len(hash_groups) / max(len(planted["duplicate_groups"]), 1),
    }


def _group_fate(group: dict[str, Any], decided: dict[str, tuple[int, int]]) -> str:
    """Why a planted group did not end with exactly one kept member."""
    reasons = [decided[k][0] for k in group["keys"]]
    kept = sum(r == KEPT for r in reasons)
    if kept > 1:
        return f"{kept} members kept (a copy missed)"
    if any(r in (NEAR_TEST, SAME_BYTES) for r in reasons):
        return "removed as copies of a test image"
    outside = {decided[k][1] for k in group["keys"]} - {-1}
    return f"joined to a group represented by pool row {sorted(outside)} outside the planted group"


def member_truth(run_dir: Path, unlabeled: Path, cfg: Any) -> tuple[ClusterIndex, dict[tuple[int, int], str]]:
    """The member index and (tar position, key crc) -> key of every embedded sample."""
    layout = RunLayout(run_dir)
    index = ClusterIndex.open(
        layout.stage_dir("cluster", 1), cfg.data.pseudo_max_dist_percentile, cfg.data.pseudo_min_cluster_size
    )
    key_of = {}
    for pos, shard in enumerate(shard_paths(unlabeled)):
        for key in embed_files.read_keys(layout.stage_dir("embed", 1), shard):
            key_of[(pos, zlib.crc32(key.encode()))] = key
    return index, key_of


def index_facts(index: ClusterIndex, key_of: dict, truth: dict[str, int], group_of: dict[str, int]) -> dict[str, Any]:
    """Pair precision of the student's same-cluster draws, groups with two index members."""
    weighted, weight, same_group = 0.0, 0.0, 0
    for c in np.flatnonzero(index.kept >= 2):
        entries = index.entries(int(c), np.arange(int(index.kept[c])))
        keys = [key_of[(int(e["shard"]), int(e["crc"]))] for e in entries]
        n = len(keys)
        counts = Counter(truth[k] for k in keys)
        p = sum(v * (v - 1) for v in counts.values()) / (n * (n - 1))
        weighted += n * p  # a cluster is drawn in proportion to its kept members
        weight += n
        groups = Counter(group_of[k] for k in keys if k in group_of)
        same_group += sum(v > 1 for v in groups.values())
    share = float(index.kept.max() / max(index.kept.sum(), 1))
    return {
        "pair_precision": weighted / max(weight, 1),
        "largest_share": share,
        "members": int(index.kept.sum()),
        "groups_with_two_members": same_group,
    }


def hidden_truth(run_dir: Path, unlabeled: Path) -> dict[str, int]:
    layout = RunLayout(run_dir)
    out = {}
    for shard in shard_paths(unlabeled):
        keys = embed_files.read_keys(layout.stage_dir("embed", 1), shard)
        labels = embed_files.read_hidden_labels(layout.stage_dir("embed", 1), shard)
        out.update({k: int(v) for k, v in zip(keys, labels)})
    return out


def rates(seconds: float = 5.0) -> dict[str, float]:
    """Single-thread rates of the curate stage's three kinds of work (module docstring)."""
    import io

    import faiss
    from PIL import Image

    from slade_dist.data.copies import HIST_DIM, copy_match, signature

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    jpgs = []
    for _ in range(16):  # photo-like: smooth gradients + texture (as bench/scale.py's embed rate)
        yy, xx = np.mgrid[0:375, 0:500]
        base = np.stack([(xx * rng.uniform(0.2, 0.5) + yy * rng.uniform(0.1, 0.4)) % 255] * 3, -1)
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + rng.normal(0, 20, (375, 500, 3)), 0, 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=90
        )
        jpgs.append(buf.getvalue())
    out: dict[str, float] = {}
    t0, n = time.time(), 0
    sigs = []
    while time.time() - t0 < seconds:
        sigs.append(signature(jpgs[n % len(jpgs)]))
        n += 1
    out["signatures_per_s"] = n / (time.time() - t0)
    thumbs = [t[:h, :w] for _, t, (h, w) in sigs[:16]]
    t0, n = time.time(), 0
    while time.time() - t0 < seconds:
        copy_match(thumbs[n % 16], thumbs[(n + 1) % 16], 0.75, 3.0)
        n += 1
    out["pixel_checks_per_s"] = n / (time.time() - t0)
    db = rng.random((100_000, HIST_DIM), dtype=np.float32)
    q = rng.random((2_000, HIST_DIM), dtype=np.float32)
    index = faiss.IndexFlatIP(HIST_DIM)
    index.add(db)
    t0 = time.time()
    index.search(q, 8)
    out["flat_ip_gflops"] = 2 * HIST_DIM * len(db) * len(q) / (time.time() - t0) / 1e9
    return {k: round(v, 2) for k, v in out.items()}


def student_row(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """The round-1 student trained afresh: truth precision of its pairs, MAP@R / P@1, seconds."""
    t0 = time.time()
    run_stage(cfg, "student", force=True)
    layout = RunLayout(run_dir)
    truth = json.loads(layout.done_file("student", 1).read_text())["result"]["truth_precision"]
    return {
        "truth_precision": truth,
        **metrics_of(layout.stage_dir("student", 1) / "final.pt", cfg),
        "seconds": round(time.time() - t0, 1),
    }


def students(cfg: Any, over: list[str], run_dir: Path, alternatives: list[str]) -> dict[str, dict[str, Any]]:
    """The defaults' student, then each alternative's (the cluster stage rerun with it first);
    the defaults' clusters are restored last."""
    rows = {"defaults": student_row(cfg, run_dir)}
    print(f"  student defaults: {rows['defaults']}", flush=True)
    for name in alternatives:
        acfg = load_config(DEMO, [*over, *ALTERNATIVES[name]])
        run_stage(acfg, "cluster", force=True)
        rows[name] = student_row(acfg, run_dir)
        print(f"  student {name}: {rows[name]}", flush=True)
    if alternatives:
        run_stage(cfg, "cluster", force=True)
    return rows


def one_seed(args: argparse.Namespace, seed: int, alternatives: list[str]) -> dict[str, Any]:
    """The curate stage and the chain on the planted demo of one seed, measured."""
    bench_dir = Path(args.dir)
    data = prepare(bench_dir, args.quick, args.copies, args.groups, seed)
    run_dir = bench_dir / f"curation-{'quick' if args.quick else 'demo'}{f'-s{seed}' if seed else ''}"
    over = [*data, f"run.dir={run_dir}", f"run.seed={seed}", "run.rounds=1", "run.round=1", "curate.enabled=true"]
    over += QUICK_STEPS if args.quick else []
    cfg = load_config(DEMO, over)
    seconds = {}
    layout = RunLayout(run_dir)
    unlabeled = Path(cfg.data.unlabeled_shards)
    planted = read_planted(cfg.demo.out)
    for stage in ("curate", "pretrain", "teacher", "embed", "cluster", "eval"):
        t0 = time.time()
        run_stage(cfg, stage, force=stage == "curate")  # the curate code may have changed: measured afresh
        seconds[stage] = round(time.time() - t0, 1)
        print(f"  seed {seed} {stage}: {seconds[stage]}s", flush=True)
        if stage == "curate":
            res = measure(decisions(run_dir, unlabeled), planted)
            print(f"  seed {seed} curation: " + json.dumps({k: v for k, v in res.items() if k != "others"}), flush=True)
    rows = students(cfg, over, run_dir, alternatives) if args.student else {}
    teacher = metrics_of(layout.stage_dir("teacher") / "final.pt", cfg)
    eval_curation = json.loads((layout.stage_dir("eval") / "metrics.json").read_text()).get("curation")
    curate_done = json.loads(layout.done_file("curate").read_text())["result"]
    truth = hidden_truth(run_dir, unlabeled)
    group_of = {k: g for g, grp in enumerate(planted["duplicate_groups"]) for k in grp["keys"]}
    balance = {}
    for cap in [float(c) for c in args.caps.split(",")]:
        ccfg = load_config(DEMO, [*over, f"curate.cluster_cap={cap}"])
        run_stage(ccfg, "cluster")
        index, key_of = member_truth(run_dir, unlabeled, ccfg)
        balance[str(cap)] = index_facts(index, key_of, truth, group_of)
        print(f"  seed {seed} cluster_cap {cap}: {balance[str(cap)]}", flush=True)
    for name, v in res.items():
        print(f"  seed {seed} {name:32s} {v}")
    return {
        "seed": seed,
        "measures": res,
        "thresholds": {k: curate_done[k] for k in ("candidate_radius", "match_threshold", "colour_threshold")},
        "pixel_checks": curate_done["pixel_checks"],
        "curate_seconds": curate_done["seconds"],
        "curate_done": {k: curate_done[k] for k in ("pool", "kept", "removed", "per_test_set")},
        "calibration": curate_done["calibration"],
        "eval_curation": eval_curation,
        "teacher": teacher,
        "students": rows,
        "balance": balance,
        "seconds": seconds,
    }


def student_table(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per student row: MAP@R and P@1 mean +- std over seeds, and the same for the precision of
    its pseudo-positive pairs and of the agreement reading's positives."""
    runs = [s["students"] for s in per_seed if s["students"]]
    if not runs:
        return {}
    table = summarise(runs)
    for name in table:
        for key in ("pseudo_pos", "agreement_pos", "literal_pos"):
            vals = [float(r[name]["truth_precision"][key]["precision"]) for r in runs]
            table[name][f"{key}_precision"] = round(float(np.mean(vals)), 4)
            table[name][f"{key}_precision_std"] = round(float(np.std(vals, ddof=1)), 4) if len(vals) > 1 else 0.0
        table[name]["map_at_r_per_seed"] = [round(r[name]["map_at_r"], 4) for r in runs]
        table[name]["pseudo_pos_precision_per_seed"] = [
            float(r[name]["truth_precision"]["pseudo_pos"]["precision"]) for r in runs
        ]
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 px demo, short stages")
    ap.add_argument("--copies", type=int, default=200, help="demo.planted_test_copies")
    ap.add_argument("--groups", type=int, default=100, help="demo.duplicate_groups")
    ap.add_argument("--caps", default="0,2,3,4,6", help="curate.cluster_cap values measured (0: none)")
    ap.add_argument("--dir", default=str(ROOT / "runs" / "bench"), help="where data and runs go")
    ap.add_argument("--rates-only", action="store_true", help="only the single-thread rates")
    ap.add_argument(
        "--student", action="store_true", help="also train the round-1 student: truth precision of its pairs, MAP@R"
    )
    ap.add_argument("--seeds", type=int, default=1, help="demos measured: demo.seed = run.seed = 0 .. N-1")
    ap.add_argument(
        "--alternatives",
        default="",
        help=f"with --student: comma-separated alternative pseudo-label settings ({', '.join(ALTERNATIVES)})",
    )
    args = ap.parse_args()
    alternatives = [a for a in args.alternatives.split(",") if a]
    if set(alternatives) - set(ALTERNATIVES) or (alternatives and not args.student):
        ap.error(f"--alternatives needs --student and names of {', '.join(ALTERNATIVES)} (got {alternatives})")
    measured = rates()
    print(f"  rates (1 thread): {measured}", flush=True)
    if args.rates_only:
        print(json.dumps({"bench": "curation", "ours": None, "baseline": None, "unit": "rates only", "ratio": None,
                          "rates": measured}))  # fmt: skip
        return
    per_seed = [one_seed(args, seed, alternatives) for seed in range(args.seeds)]
    table = student_table(per_seed)
    for name, row in table.items():
        print(
            f"{name:12s} MAP@R {row['map_at_r']:.4f} +- {row['map_at_r_std']:.4f}  pseudo-positive precision "
            f"{row['pseudo_pos_precision']:.4f} +- {row['pseudo_pos_precision_std']:.4f}"
        )
    mean = {k: float(np.mean([s["measures"][k] for s in per_seed])) for k in MEAN_MEASURES}
    print(
        json.dumps(
            {
                "bench": "curation",
                "ours": round(mean["test_copies_removed"], 4),
                "baseline": round(mean["hash_only_removed"], 4),
                "unit": "share of planted test copies removed, mean over seeds (ours: colour-histogram search + "
                "pixel check + hash; baseline: hash only)",
                "ratio": round(mean["test_copies_removed"] / max(mean["hash_only_removed"], 1e-9), 3),
                "others_removed": round(mean["others_removed"], 5),
                "groups_collapsed": round(mean["groups_collapsed"], 4),
                "hash_only_groups_collapsed": round(mean["hash_only_groups_collapsed"], 4),
                "seeds": args.seeds,
                "students": table,
                "per_seed": per_seed,
                "rates": measured,
                "quick": args.quick,
            }
        )
    )


MEAN_MEASURES = ("test_copies_removed", "hash_only_removed", "others_removed", "groups_collapsed",
                 "hash_only_groups_collapsed")  # fmt: skip


if __name__ == "__main__":
    main()
