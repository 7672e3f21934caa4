"""Benchmark: slade_dist.eval.metrics.retrieval_metrics vs pytorch-metric-learning's
AccuracyCalculator (PML), time, memory and numbers.

Row 1 (speed and numbers, one process, the same data): n x d Gaussian-cluster embeddings with C
classes (default 100,000 x 128, 1,000 classes; --quick: 20,000). Both compute P@1, R-Precision,
MAP@R and NMI (both FAISS k-means, niter 20, the same seed); PML with k="max_bin_count" (the
setting its docs prescribe for MAP@R: its default k=None ranks the whole set, n x n, which at
this size cannot be held). Both are warmed up once on a small set before timing; --repeat
alternates them and keeps each one's best. Prints both times, the ratio and, for every metric, the
largest |ours - PML|. Both search with FAISS's default thread count.

Row 2 (memory, self-retrieval without NMI, default 300,000 x 128 with 3,000 classes; --quick:
50,000 x 128, 500 classes): each run in a fresh subprocess under an address-space cap
(RLIMIT_AS, --mem-cap-gib, default 12 GiB): ours, PML with k="max_bin_count", and PML with its
default k=None. Reports each one's wall time of the metric call, or how it failed, and its peak
RSS: during the call (VmHWM, reset by /proc/self/clear_refs once libraries and data are loaded)
and of the whole process (ru_maxrss from wait4). Then prints the memory model (validated by row 2's
figures) for 10^6 queries.

The last output line is one JSON object: {"bench": "eval", "ours", "baseline", "unit", "ratio",
"max_diff", ...row 2 figures}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slade_dist.eval.metrics import ENTRIES_PER_CHUNK_ROW, FAISS_DATABASE_BLOCK, retrieval_metrics  # noqa: E402

PAIRS = {
    "precision_at_1": "precision_at_1",
    "r_precision": "r_precision",
    "map_at_r": "mean_average_precision_at_r",
    "nmi": "NMI",
}
FAISS_DEFAULT_SEED = 1234  # PML's FaissKMeans leaves faiss.Kmeans' seed at its default
GIB = 1024**3
MIB = 1024**2


def make_embeddings(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm embeddings (as the embedder gives), classes of equal size in random order."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes)
    centers = rng.standard_normal((classes, d)).astype(np.float32)
    emb = centers[labels] + 1.6 * rng.standard_normal((n, d), dtype=np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels


def run_ours(emb: np.ndarray, labels: np.ndarray, nmi: bool = True) -> tuple[dict, float, float]:
    t, c = time.perf_counter(), time.process_time()
    out = retrieval_metrics(emb, labels, recall_k=(1, 2, 4, 8), nmi=nmi, seed=FAISS_DEFAULT_SEED)
    return out, time.perf_counter() - t, time.process_time() - c


def run_pml(emb: np.ndarray, labels: np.ndarray, k="max_bin_count", nmi: bool = True) -> tuple[dict, float, float]:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    logging.getLogger("PML").setLevel(logging.WARNING)
    include = tuple(v for name, v in PAIRS.items() if nmi or name != "nmi")
    t, c = time.perf_counter(), time.process_time()
    calc = AccuracyCalculator(include=include, k=k, device=torch.device("cpu"))
    out = calc.get_accuracy(emb, labels)
    return out, time.perf_counter() - t, time.process_time() - c


def metric_diffs(ours: dict, ref: dict) -> dict[str, float]:
    """|ours - PML| for every metric both compute (our recall@1 is PML's precision@1 too)."""
    diffs = {k: abs(ours[k] - ref[v]) for k, v in PAIRS.items() if k in ours and v in ref}
    diffs["recall_at_1"] = abs(ours["recall_at_1"] - ref["precision_at_1"])
    return diffs


def same_process_row(n: int, d: int, classes: int, repeat: int) -> dict:
    """Row 1: ours and PML on the same embeddings in this process, alternated, best of `repeat`."""
    emb, labels = make_embeddings(n, d, classes)
    print(f"row 1: {n} x {d} embeddings, {classes} classes, cpus={os.cpu_count()}", flush=True)
    small, small_labels = make_embeddings(5000, d, 50, seed=1)
    warm_ours, warm_pml = run_ours(small, small_labels)[1], run_pml(small, small_labels)[1]
    print(f"warm-up (5,000 points, once): ours {warm_ours:.2f} s, PML {warm_pml:.2f} s", flush=True)
    best = {"ours": (float("inf"), 0.0), "pml": (float("inf"), 0.0)}
    for _ in range(max(1, repeat)):  # alternate, so load changes hit both sides alike
        ours, t, c = run_ours(emb, labels)
        best["ours"] = min(best["ours"], (t, c))
        print(
            f"ours {t:8.2f} s wall {c:8.2f} s cpu  "
            + "  ".join(f"{k}={v:.5f}" for k, v in ours.items() if isinstance(v, float)),
            flush=True,
        )
        ref, t, c = run_pml(emb, labels)
        best["pml"] = min(best["pml"], (t, c))
        print(
            f"PML  {t:8.2f} s wall {c:8.2f} s cpu  " + "  ".join(f"{k}={ref[v]:.5f}" for k, v in PAIRS.items()),
            flush=True,
        )
    diffs = metric_diffs(ours, ref)
    (t_ours, c_ours), (t_ref, c_ref) = best["ours"], best["pml"]
    print("max |ours - PML| per metric: " + "  ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    print(f"ratio PML/ours = {t_ref / t_ours:.2f}x wall, {c_ref / c_ours:.2f}x cpu time", flush=True)
    return {
        "ours": round(t_ours, 3),
        "baseline": round(t_ref, 3),
        "ratio": round(t_ref / t_ours, 3),
        "ours_cpu_s": round(c_ours, 3),
        "baseline_cpu_s": round(c_ref, 3),
        "ratio_cpu": round(c_ref / c_ours, 3),
        "max_diff": max(diffs.values()),
        "max_diff_by_metric": diffs,
        "same_numbers": max(diffs.values()) == 0.0,
        "n": n,
        "dim": d,
        "classes": classes,
        "warmup_ours_s": round(warm_ours, 3),
        "warmup_baseline_s": round(warm_pml, 3),
        **{f"ours_{k}": ours[k] for k in PAIRS},
        **{f"pml_{k}": ref[v] for k, v in PAIRS.items()},
    }


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux clear_refs "5"), so it measures the call alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(which: str, n: int, d: int, classes: int, cap_gib: float) -> None:
    """One row-2 run in this (fresh) process: prints one JSON line with its result and memory."""
    cap = int(cap_gib * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # a blown allocation fails here, not the machine
    import faiss  # noqa: F401  all libraries loaded before the peak is reset: they are not the
    import torch  # noqa: F401  metric's memory, and both sides need the same ones
    from pytorch_metric_learning.utils import accuracy_calculator  # noqa: F401

    emb, labels = make_embeddings(n, d, classes)
    before, reset = _status_mib("VmRSS"), _reset_peak_rss()
    try:
        if which == "ours":
            out, wall, _ = run_ours(emb, labels, nmi=False)
        else:
            out, wall, _ = run_pml(emb, labels, k=None if which == "pml_default_k" else "max_bin_count", nmi=False)
        result = {"ok": True, "wall_s": wall, "metrics": out}
    except (MemoryError, RuntimeError) as e:  # torch/FAISS report a refused allocation as either
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    peak = _status_mib("VmHWM") if reset else float("nan")
    print(json.dumps({**result, "rss_before_mib": before, "call_peak_rss_mib": peak}))


def fresh_process_run(which: str, n: int, d: int, classes: int, cap_gib: float) -> dict:
    """Run `child` in a new interpreter; its outcome, and its process peak RSS from wait4's
    ru_maxrss (we reap it ourselves, so the figure is this child's alone)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--big-n",
        str(n),
        "--dim",
        str(d),
        "--big-classes",
        str(classes),
        "--mem-cap-gib",
        str(cap_gib),
    ]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait again
        elapsed = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("{")]
        tail = err.read().strip()[-200:]
    result = (
        json.loads(lines[-1])
        if lines
        else {
            "ok": False,
            "error": f"exit {proc.returncode}: {tail}",
            "rss_before_mib": float("nan"),
            "call_peak_rss_mib": float("nan"),
        }
    )
    return {**result, "process_s": elapsed, "process_peak_rss_mib": usage.ru_maxrss / 1024}


def ours_memory_bytes(n: int, d: int, k: int, chunk: int = 8192) -> dict[str, int]:
    """Our self-protocol footprint beyond the interpreter, k = max R_i (NMI not included: its
    k-means holds min(n, 256 C) x d sampled points, C x d centroids and n assignments)."""
    rows = max(1, min(chunk, chunk * ENTRIES_PER_CHUNK_ROW // k))
    width = k + 2  # k references + the query itself + one to settle ties at the cut
    return {
        "caller's embeddings n*d*4": n * d * 4,
        "normalised copy n*d*4": n * d * 4,
        "FAISS flat index n*d*4": n * d * 4,
        "labels, R_i, masks n*(8+8+2)": n * 18,
        "FAISS GEMM block 4096*db_block*4": 4096 * FAISS_DATABASE_BLOCK * 4,
        "FAISS reservoir (k>=100) min(rows,4096)*2*width*12": min(rows, 4096) * 2 * width * 12 if k >= 100 else 0,
        "chunk result rows*width*(4+8), sorted copy + order rows*width*20": rows * width * 32,
        "chunk metric temporaries ~rows*k*40": rows * k * 40,
    }


def pml_memory_bytes(n: int, d: int, k: int) -> dict[str, int]:
    """PML with k="max_bin_count": everything n x k at once (an estimate from reading its code,
    row 2 measures it)."""
    return {
        "caller's embeddings n*d*4 (PML's torch views share them)": n * d * 4,
        "FAISS index n*d*4": n * d * 4,
        "FAISS D, I n*(k+1)*(4+8)": n * (k + 1) * 12,
        "knn_labels float32 n*k*4": n * k * 4,
        "MAP@R: 3 bool masks, cumsum, k_idx, products int64/float64 ~n*k*(3+6*8)": n * k * 51,
    }


def print_memory_model(n: int, d: int, k: int) -> tuple[float, float]:
    print(f"memory model, self protocol, {n:.0e} queries x {d}, k = {k} (largest class - 1 = max R_i):")
    totals = []
    for name, parts in (("ours", ours_memory_bytes(n, d, k)), ("PML max_bin_count", pml_memory_bytes(n, d, k))):
        totals.append(sum(parts.values()) / GIB)
        terms = " + ".join(f"{v / MIB:.0f} MiB ({key})" for key, v in parts.items())
        print(f"  {name}: {totals[-1]:.2f} GiB = {terms}")
    return totals[0], totals[1]


def memory_row(n: int, d: int, classes: int, cap_gib: float) -> dict:
    """Row 2: ours, PML max_bin_count and PML default k, each in a fresh capped process."""
    print(
        f"row 2: {n} x {d} self-retrieval (no NMI), {classes} classes, fresh processes, "
        f"RLIMIT_AS {cap_gib} GiB; peak RSS during the call (VmHWM, libraries and data already "
        "resident) and of the whole process (wait4)",
        flush=True,
    )
    runs = {}
    for which in ("ours", "pml_max_bin_count", "pml_default_k"):
        r = runs[which] = fresh_process_run(which, n, d, classes, cap_gib)
        what = f"{r['wall_s']:8.2f} s" if r["ok"] else f"FAILED ({r['error']})"
        print(
            f"  {which:18s} {what}  call peak {r['call_peak_rss_mib']:7.0f} MiB "
            f"(+{r['call_peak_rss_mib'] - r['rss_before_mib']:.0f} over {r['rss_before_mib']:.0f})  "
            f"process peak {r['process_peak_rss_mib']:7.0f} MiB  ({r['process_s']:.1f} s)",
            flush=True,
        )
    k = n // classes - 1  # max R_i: equal classes
    model = {"ours": ours_memory_bytes(n, d, k), "pml_max_bin_count": pml_memory_bytes(n, d, k)}
    out = {"big_n": n, "big_classes": classes, "mem_cap_gib": cap_gib}
    for which, parts in model.items():  # the caller's embeddings are part of rss_before
        extra = (sum(parts.values()) - n * d * 4) / MIB
        out[f"big_{which}_model_extra_mib"] = round(extra)
        print(f"  model: {which} needs ~{extra:.0f} MiB above the caller's data at this size")
    for which, r in runs.items():
        out[f"big_{which}_s"] = round(r["wall_s"], 3) if r["ok"] else None
        out[f"big_{which}_status"] = "ok" if r["ok"] else r["error"]
        out[f"big_{which}_call_peak_rss_mib"] = round(r["call_peak_rss_mib"])
        out[f"big_{which}_call_extra_rss_mib"] = round(r["call_peak_rss_mib"] - r["rss_before_mib"])
        out[f"big_{which}_process_peak_rss_mib"] = round(r["process_peak_rss_mib"])
    ours, ref = runs["ours"], runs["pml_max_bin_count"]
    if ours["ok"] and ref["ok"]:
        diffs = metric_diffs(ours["metrics"], ref["metrics"])
        print("  max |ours - PML max_bin_count| per metric: " + "  ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
        out["big_max_diff"], out["big_max_diff_by_metric"] = max(diffs.values()), diffs
        out["big_ratio"] = round(ref["wall_s"] / ours["wall_s"], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="row 1 at 20,000, row 2 at 50,000 (about a minute)")
    ap.add_argument("--n", type=int, default=None, help="row 1 embeddings (overrides --quick)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--big-n", type=int, default=None, help="row 2 embeddings (overrides --quick; 0: skip row 2)")
    ap.add_argument("--big-classes", type=int, default=None, help="row 2 classes (default: 100 images per class)")
    ap.add_argument("--mem-cap-gib", type=float, default=12.0, help="RLIMIT_AS of each row-2 process")
    ap.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="row 1: alternate ours/PML this many times, keep each one's best (default 3 --quick, else 2)",
    )
    ap.add_argument("--child", choices=("ours", "pml_max_bin_count", "pml_default_k"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    big_n = args.big_n if args.big_n is not None else (50_000 if args.quick else 300_000)
    big_classes = args.big_classes or max(1, big_n // 100)
    if args.child:
        child(args.child, big_n, args.dim, big_classes, args.mem_cap_gib)
        return {}
    n = args.n or (20_000 if args.quick else 100_000)
    repeat = args.repeat or (3 if args.quick else 2)  # best of several: the machine may be shared
    result = {"bench": "eval", **same_process_row(n, args.dim, args.classes, repeat)}
    if big_n:
        result.update(memory_row(big_n, args.dim, big_classes, args.mem_cap_gib))
    ours_gib, pml_gib = print_memory_model(1_000_000, args.dim, 99)  # classes of 100, as in both rows
    result.update(
        {
            "unit": "s",
            "mem_model_1e6_ours_gib": round(ours_gib, 2),
            "mem_model_1e6_pml_gib": round(pml_gib, 2),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
    )
    head = {key: result.pop(key) for key in ("bench", "ours", "baseline", "unit", "ratio", "max_diff")}
    print(json.dumps({**head, **result}))
    return result


if __name__ == "__main__":
    main()
