"""FAISS-exact k-means assignment with less distance work: the NMI clustering, same result as FAISS.

Owns `faiss_kmeans_assign(x, k, seed, niter)`: the final assignment that
`faiss.Kmeans(d, k, niter=niter, seed=seed, min_points_per_centroid=1).train(x)` followed by
`km.index.search(x, 1)` gives on the CPU (metrics.kmeans_assign; PML's AccuracyCalculator NMI does
the same FAISS call). Why: FAISS recomputes all n x k distances at each of the niter + 1 assignments
(100,000 x 128 to 1,000 clusters: ~5.5 s here, bench/eval.py), while after the first iterations few
centroids move and few points can change cluster. Same Lloyd iterations, same float32 centroids
bit for bit, fewer distances; about 0.5x FAISS's time at that size with the fused kernel.
Tests: tests/unit/test_lloyd.py (real FAISS: identical assignments and centroids on several data
sets and niter values, the None cases, NMI, the near-tie and early-stop paths; fused and
portable).

Guarantee: the returned int64 array (length n) equals FAISS's assignment, given the facts below
about faiss 1.15 (checked by the tests) and one statistical assumption (early stop, below: the
chance of a wrong answer is modelled below 1e-9 per iteration). Returns None instead, and the
caller runs FAISS, when: x is not a 2-D float32 array or has NaN/Inf; n <= k (FAISS throws, or
copies x when n == k); n > 256 k (FAISS subsamples with its RNG); a cluster becomes empty (FAISS
splits one with its RNG); seed < 0 or >= 2**31 (time-seeded / not a C int); niter < 0; the
objective went up at a step where FAISS's stop rule matters. Scope: FAISS's CPU search (faiss-cpu,
or faiss-gpu with no GPU); GPU FAISS rounds differently. `stats` (optional dict) gets counters and
the final centroids.

How each FAISS step is reproduced (faiss 1.15 Clustering.cpp, utils/distances.cpp):
- Initial centroids: from FAISS itself (`faiss.Kmeans(..., niter=0)`, i.e. x[rand_perm[:k]]).
- Centroid update: FAISS adds the members in float32 in point order, then multiplies by
  float(1 / count). A CSR (cluster x point, ones) product accumulates in the same order, so the
  centroids are FAISS's bit for bit while the assignments are; only clusters whose member list
  changed are recomputed (same members, same bits).
- Assignment. Per point, float64 bounds on true distances: u >= distance to its centroid, l <= the
  distance to every other centroid. FAISS's rounded distances rank the own centroid first whenever
  l^2 - u^2 > 2B, B a rigorous bound on a float32 squared distance's error
  (1.5 (gamma_d + 3 u32)(|x| + max|c|)^2). After an update, distances to unchanged centroids are
  unchanged: the changed centroids that moved more than tau get their distances to every point
  (one GEMM: exact u if it is the own one, l = min(l, the others)); the others lower l by their
  largest shift (triangle inequality) and give the exact own distance. tau (or "recompute all")
  minimises an estimate of the work on a sample. Points not proven get all k distances (numpy
  float32 GEMM); where the best two are within 4B of each other the rounding decides, so FAISS
  itself is asked: its BLAS distances depend on a row's offset in its 4096-query block
  (`distance_compute_blas_query_bs`) and on that block's length, not on the other rows, so those
  points are searched at their own offsets in a batch with the same block layout (FAISS's
  distances and ties bit for bit; checked by the tests).
- The "all k distances" passes and the movers' distances use the fused kernel of _kernels.c when
  it is available (native.py): GEMM and running nearest / second-nearest search in AVX registers,
  no n x k matrix in memory; else numpy's GEMM and argmin. Its float32 sums run in another order
  than BLAS's, which B covers (it bounds any summation order), and near-ties go to FAISS either
  way: the same answer.
- Early stop: FAISS 1.15 stops after iteration i when its objective (float32 sum of the n
  distances, in point order) equals iteration i-1's. From our estimates of FAISS's distances
  (within 2B each) we test whether the two float32 sums can be equal: the change against float32
  rounding noise (6 sigma, errors independent), then a model of the rounding grid of the partial
  sums that leaves only boundary cases uncertain. If they can, and stopping there would change
  the answer, FAISS's objectives are recomputed with its own search (exact). We stop ourselves
  when no point changes cluster (all later iterations are then identical).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from slade_dist.eval import native

__all__ = ["faiss_kmeans_assign", "MAX_POINTS_PER_CENTROID"]

MAX_POINTS_PER_CENTROID = 256  # faiss.ClusteringParameters default: above k * 256 points FAISS subsamples
_U32 = 2.0 ** -24               # float32 unit roundoff
_CHUNK = 2048                   # rows per GEMM block (larger blocks: BLAS thread overhead amortised)
_SAFETY = 1.5                   # extra factor on the rigorous rounding bound
_SIGMAS = 6.0                   # early-stop test: margin on float32 rounding noise (independent errors)
_DENSE_COST = 1.0               # cost of recomputing all distances (1 = n x k), vs the mover options
_TAU_QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)  # candidate mover thresholds (quantiles of the shifts)
_DECAY_PENALTY = 2.0            # lowering l has a cost in later iterations too


def faiss_kmeans_assign(x: np.ndarray, k: int, seed: int, niter: int = 20, *,
                        stats: dict[str, Any] | None = None) -> np.ndarray | None:
    """FAISS k-means (niter iterations, `seed`) then each point's nearest centroid, as FAISS (CPU)
    computes it: int64 array of length n, or None when this cannot be guaranteed (see module doc)."""
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype != np.float32:
        return None
    n, d = x.shape
    k, niter, seed = int(k), int(niter), int(seed)
    if d < 1 or k < 1 or niter < 0 or not 0 <= seed < 2 ** 31 or n <= k or n > k * MAX_POINTS_PER_CENTROID:
        return None
    x = np.ascontiguousarray(x)
    if not np.isfinite(x).all():
        return None
    return _Lloyd(x, k, seed, niter, stats if stats is not None else {}).run()


class _Lloyd:
    def __init__(self, x: np.ndarray, k: int, seed: int, niter: int, stats: dict[str, Any]):
        import faiss  # lazily, as metrics.py

        self.faiss, self.x, self.k, self.niter, self.stats = faiss, x, k, niter, stats
        self.n, self.d = x.shape
        km = faiss.Kmeans(self.d, k, niter=0, seed=seed, min_points_per_centroid=1)
        km.train(x)
        c0 = np.array(km.centroids, dtype=np.float32).reshape(k, self.d)
        xsq = np.empty(self.n)
        for lo in range(0, self.n, 8192):
            xb = x[lo:lo + 8192].astype(np.float64)
            xsq[lo:lo + 8192] = np.einsum("ij,ij->i", xb, xb)
        self.xsq, self.xnorm = xsq, np.sqrt(xsq)
        gamma = self.d * _U32 / (1.0 - self.d * _U32)
        self.bcoef = _SAFETY * (gamma + 3.0 * _U32)
        self.buf = np.empty((min(_CHUNK, self.n), k), dtype=np.float32)
        self.index = None  # FAISS index holding the current centroids (built on demand)
        # FAISS's exhaustive search path and block structure (read now: process-global settings)
        self.bs = int(faiss.cvar.distance_compute_blas_query_bs)
        self.blas = self.n * self.d >= int(faiss.cvar.distance_compute_blas_threshold)
        self.sample = np.linspace(0, self.n - 1, min(self.n, 4096)).astype(np.int64)
        self.lib = native.kernels()  # fused GEMM + top-2 (native.py), or None: numpy GEMMs
        self.xp = native.pack_rows(self.lib, x, self.lib.mr) if self.lib is not None else None
        self._set_centroids(c0)
        stats.update(iterations=0, converged=False, recomputed=[], tau=[], ambiguous=0, faiss_batches=0,
                     risky=[], stop_test_stage2=0, exact_checks=0, stopped_early_at=None,
                     centroids=None)

    # ---------------------------------------------------------------- distances
    def _set_centroids(self, c: np.ndarray) -> None:
        self.c = c
        self.negc2 = -2.0 * c  # exact (power of two): x @ negc2.T == -2 (x @ c.T) bitwise
        self.cn = np.einsum("ij,ij->i", c, c)
        self.cmax = float(np.sqrt((c.astype(np.float64) ** 2).sum(1)).max())
        self.bound = self.bcoef * (self.xnorm + self.cmax) ** 2  # per point: |float32 sq. dist - exact| <= bound
        self.index = None
        self.cp = native.pack_rows(self.lib, self.negc2, self.lib.nr) if self.lib is not None else None

    def _native_min2(self, rows: np.ndarray | None, cols: np.ndarray | None,
                     skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fused kernel: per point (rows; None: all), the smallest and second smallest float32
        x . (-2 c) + |c|^2 over the centroids `cols` (None: all; returned indices are positions in
        cols), leaving out skip[i] (a position, -1: none). The same float32 values as the numpy
        path up to summation order, which the bound B covers."""
        m = self.n if rows is None else rows.shape[0]
        mr, nr = self.lib.mr, self.lib.nr
        cp = self.cp if cols is None else native.pack_rows(self.lib, np.ascontiguousarray(self.negc2[cols]), nr)
        w = self.k if cols is None else cols.shape[0]
        add = np.full(w + 2 * nr, np.inf, np.float32)  # +inf past the last column (kernel contract)
        add[:w] = self.cn if cols is None else self.cn[cols]
        best = np.full(m, np.inf, np.float32)
        second = np.full(m, np.inf, np.float32)
        best_j = np.full(m, -1, np.int64)
        skip = None if skip is None else np.ascontiguousarray(skip, dtype=np.int64)
        step = max(mr, -(-m // (4 * native.usable_cpus())) // mr * mr)
        fp = np.dtype(np.float32).itemsize

        def chunk(lo: int) -> None:
            hi = min(m, lo + step)
            if rows is None:
                xp, a = None, self.xp.ctypes.data + lo * self.d * fp
            else:
                xp = native.pack_rows(self.lib, self.x[rows[lo:hi]], mr)
                a = xp.ctypes.data
            self.lib.min2_tile(a, cp.ctypes.data, self.d, hi - lo, w, add.ctypes.data, 0,
                               None if skip is None else skip.ctypes.data + lo * 8,
                               best.ctypes.data + lo * fp, best_j.ctypes.data + lo * 8,
                               second.ctypes.data + lo * fp)

        with ThreadPoolExecutor(native.usable_cpus()) as pool:
            list(pool.map(chunk, range(0, m, step)))
        return best_j, best, second

    def _top2(self, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All k distances (float32 GEMM) of rows (None: all points): nearest centroid and the two
        smallest squared distances (float64)."""
        xsq = self.xsq if rows is None else self.xsq[rows]
        if self.lib is not None:
            i1, v1, v2 = self._native_min2(rows, None)
            return i1, v1 + xsq, v2 + xsq
        m = self.n if rows is None else rows.shape[0]
        i1 = np.empty(m, dtype=np.int64)
        v1 = np.empty(m, dtype=np.float32)
        v2 = np.empty(m, dtype=np.float32)
        wt = self.negc2.T
        for lo in range(0, m, _CHUNK):
            hi = min(m, lo + _CHUNK)
            xb = self.x[lo:hi] if rows is None else self.x[rows[lo:hi]]
            b = self.buf[:hi - lo]
            np.matmul(xb, wt, out=b)
            b += self.cn
            am = b.argmin(axis=1)
            r = np.arange(hi - lo)
            v1[lo:hi] = b[r, am]
            b[r, am] = np.inf
            v2[lo:hi] = b.min(axis=1)
            i1[lo:hi] = am
        return i1, v1 + xsq, v2 + xsq

    def _exact_dist(self, rows: np.ndarray, cl: np.ndarray) -> np.ndarray:
        """Euclidean distances x[rows] - c[cl] in float64 (exact up to ~1e-16 relative), nudged up."""
        out = np.empty(rows.shape[0])
        for lo in range(0, rows.shape[0], 8192):
            diff = self.x[rows[lo:lo + 8192]].astype(np.float64) - self.c[cl[lo:lo + 8192]]
            out[lo:lo + 8192] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        return out * (1.0 + 1e-12) + 1e-300

    # ---------------------------------------------------------------- FAISS's own decisions
    def _faiss_index(self):
        if self.index is None:
            self.index = self.faiss.IndexFlatL2(self.d)
            self.index.add(self.c)
        return self.index

    def _faiss_decide(self, pts: np.ndarray) -> np.ndarray:
        """FAISS's nearest centroid for points `pts`, exactly as its search over all of x finds it.

        BLAS path: FAISS multiplies 4096-query blocks (the last one shorter) by the centroids, and
        a row's float results depend on its offset in the block and on the block's length (not on
        the other rows). So each point is searched at its own offset inside a block of the same
        length (several points per batch, one per offset), and the batch is long enough to take
        the BLAS path (nx * d >= distance_compute_blas_threshold) too."""
        index = self._faiss_index()
        if not self.blas:  # per-pair SIMD path: a point's distances do not depend on the batch
            self.stats["faiss_batches"] += 1
            return index.search(self.x[pts], 1)[1].reshape(-1)
        bs, d = self.bs, self.d
        nfull, tail = divmod(self.n, bs)
        rows_needed = math.ceil(int(self.faiss.cvar.distance_compute_blas_threshold) / d)
        off = pts % bs
        in_tail = pts // bs >= nfull
        has_tail = bool(in_tail.any())
        has_full = not in_tail.all()
        tail_rows = tail if has_tail else 0
        m = 0  # full blocks per batch
        if has_full or tail_rows < rows_needed:
            m = min(nfull, max(1, math.ceil((rows_needed - tail_rows) / bs)))
            if m * bs + tail_rows < rows_needed:  # only when n itself is that small: search it all
                tail_rows = tail
        key = np.where(in_tail, bs + off, off)
        order = np.argsort(key, kind="stable")
        ks = key[order]
        rank = np.empty_like(pts)
        rank[order] = np.arange(pts.shape[0]) - np.searchsorted(ks, ks)
        per = max(m, 1)
        batch = np.where(in_tail, 0, rank // per)
        row = np.where(in_tail, m * bs + off, (rank % per) * bs + off)
        buf = np.zeros((m * bs + tail_rows, d), dtype=np.float32)
        out = np.empty(pts.shape[0], dtype=np.int64)
        for b in range(int(batch.max()) + 1):
            sel = np.flatnonzero(batch == b)
            buf[row[sel]] = self.x[pts[sel]]
            out[sel] = index.search(buf, 1)[1][row[sel], 0]
            self.stats["faiss_batches"] += 1
        return out

    def _faiss_objective(self, c: np.ndarray) -> np.float32:
        """FAISS's iteration objective for centroids c: float32 sum of its distances, in order."""
        index = self.faiss.IndexFlatL2(self.d)
        index.add(c)
        dist = index.search(self.x, 1)[0].reshape(-1)
        self.stats["exact_checks"] += 1
        return np.cumsum(dist, dtype=np.float32)[-1]

    # ---------------------------------------------------------------- assignment
    def _kept(self, idx, u: np.ndarray, l: np.ndarray) -> np.ndarray:
        """True where the bounds prove FAISS keeps the point's cluster (its rounding included)."""
        return (l > 0) & (l * l - u * u > 2.0 * self.bound[idx])

    def _recompute(self, rows: np.ndarray | None) -> None:
        """All k distances for rows (None: all points): new a, u, l; near-ties decided by FAISS."""
        i1, g1, g2 = self._top2(rows)
        bnd = self.bound if rows is None else self.bound[rows]
        pick, lo2 = i1, g2
        u = np.sqrt(g1 + bnd) * (1.0 + 1e-12)
        amb = np.flatnonzero(g2 - g1 <= 4.0 * bnd)
        if amb.size:
            pts = amb if rows is None else rows[amb]
            dec = self._faiss_decide(pts)
            self.stats["ambiguous"] += int(amb.size)
            other = np.flatnonzero(dec != i1[amb])
            if other.size:  # FAISS's rounding picked another centroid than our float32 GEMM
                pick, lo2 = i1.copy(), g2.copy()
                pick[amb] = dec
                lo2[amb[other]] = g1[amb[other]]  # i1, the overall minimum, is now among the others
                u[amb[other]] = self._exact_dist(pts[other], dec[other])
                g1 = g1.copy()
                g1[amb[other]] = u[amb[other]] ** 2
        l = np.sqrt(np.maximum(lo2 - bnd, 0.0)) * (1.0 - 1e-12)
        if rows is None:
            self.a, self.u, self.l, self.dis = pick, u, l, np.maximum(g1, 0.0)
        else:
            self.a[rows], self.u[rows], self.l[rows], self.dis[rows] = pick, u, l, np.maximum(g1, 0.0)

    def _step(self, changed: np.ndarray, c_old: np.ndarray) -> np.ndarray:
        """Reassign after the centroids `changed` moved; returns the points whose cluster changed.

        Distances to unchanged centroids are unchanged. The changed centroids that moved more than
        tau get their distance to every point computed (one GEMM): u = the own one, l = min(l,
        the others); the others lower l by their largest shift and raise u by the own shift
        (triangle inequality). tau trades that GEMM against the points left unproven, which get
        all k distances. When most centroids changed, all points get all k distances directly."""
        k = self.k
        shift = np.zeros(k)
        if changed.size:
            diff = self.c[changed].astype(np.float64) - c_old[changed]
            shift[changed] = np.sqrt(np.einsum("ij,ij->i", diff, diff)) * (1.0 + 1e-12)
        pick = self._pick_movers(shift, changed)
        if pick is None:  # all k distances of every point: cheapest, and refreshes every bound
            old = self.a
            self._recompute(None)
            self.stats["recomputed"].append(self.n)
            return np.flatnonzero(self.a != old)
        movers, decay = pick
        self.l -= decay
        small = np.zeros(k, dtype=bool)  # moved, but by at most tau
        small[changed] = True
        small[movers] = False
        drift = np.flatnonzero(small[self.a])
        if drift.size:  # own centroid moved a little: exact distance (u, and the objective estimate)
            self.u[drift] = self._exact_dist(drift, self.a[drift])
            self.dis[drift] = self.u[drift] ** 2
        if movers.size:
            self._mover_distances(movers)
        fail = np.flatnonzero(~self._kept(slice(None), self.u, self.l))
        if fail.size:  # tighten u with the exact distance to the current centroid
            self.u[fail] = self._exact_dist(fail, self.a[fail])
            fail = fail[~self._kept(fail, self.u[fail], self.l[fail])]
        self.stats["recomputed"].append(int(fail.size))
        if not fail.size:
            return fail
        old = self.a[fail].copy()
        self._recompute(fail)
        return fail[self.a[fail] != old]

    def _pick_movers(self, shift: np.ndarray, changed: np.ndarray) -> tuple[np.ndarray, float] | None:
        """Movers = changed centroids with shift > tau; tau minimises (movers / k) + penalty *
        (fraction of points the lowered l would leave unproven), estimated on a sample; None when
        recomputing all distances (cost 1) is cheaper."""
        if not changed.size:
            return changed, 0.0
        s = self.sample
        us = self._exact_dist(s, self.a[s])
        ls = self.l[s]
        bs = 2.0 * self.bound[s]
        cs = np.sort(shift[changed])
        best = None
        for q in _TAU_QUANTILES:
            j = int(q * (cs.size - 1)) if q < 1.0 else cs.size - 1
            tau = 0.0 if q == 0.0 else cs[j]
            h = int(np.count_nonzero(shift > tau))
            decay = float(cs[cs <= tau].max()) if q > 0.0 else 0.0
            lt = ls - decay
            fail = float(np.mean(~((lt > 0) & (lt * lt - us * us > bs))))
            cost = h / self.k + _DECAY_PENALTY * fail
            if best is None or cost < best[0]:
                best = (cost, tau, decay)
        cost, tau, decay = best
        if cost >= _DENSE_COST:
            self.stats["tau"].append(None)
            return None
        self.stats["tau"].append(round(float(tau), 5))
        return np.flatnonzero(shift > tau), decay

    def _mover_distances(self, movers: np.ndarray) -> None:
        """Distances of every point to the moved centroids: u = the own one where the own
        centroid moved; l = min(l, the others) (l stays valid for the centroids that did not move)."""
        n, h = self.n, movers.size
        col = np.full(self.k, -1, dtype=np.int64)
        col[movers] = np.arange(h)
        own_col = col[self.a]
        if self.lib is not None:
            self._native_mover_distances(movers, own_col)
            return
        wt = self.negc2[movers].T
        cn = self.cn[movers]
        step = max(_CHUNK, (1 << 22) // max(h, 1))
        buf = np.empty((min(step, n), h), dtype=np.float32)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            b = buf[:hi - lo]
            np.matmul(self.x[lo:hi], wt, out=b)
            b += cn
            oc = own_col[lo:hi]
            ownrow = np.flatnonzero(oc >= 0)
            xsq, bnd = self.xsq[lo:hi], self.bound[lo:hi]
            if ownrow.size:
                gown = b[ownrow, oc[ownrow]].astype(np.float64) + xsq[ownrow]
                self.u[lo + ownrow] = np.sqrt(gown + bnd[ownrow]) * (1.0 + 1e-12)
                self.dis[lo + ownrow] = np.maximum(gown, 0.0)
                b[ownrow, oc[ownrow]] = np.inf
            m = b.min(axis=1).astype(np.float64) + xsq
            lm = np.sqrt(np.maximum(m - bnd, 0.0)) * (1.0 - 1e-12)
            np.minimum(self.l[lo:hi], lm, out=self.l[lo:hi])

    def _native_mover_distances(self, movers: np.ndarray, own_col: np.ndarray) -> None:
        """_mover_distances with the fused kernel: the others' minimum leaves the own column out;
        the own distance is one float32 dot product per point (any order: B covers it)."""
        _, others, _ = self._native_min2(None, movers, skip=own_col)
        ownrow = np.flatnonzero(own_col >= 0)
        if ownrow.size:
            own = self.a[ownrow]
            g = np.empty(ownrow.size, np.float32)
            for lo in range(0, ownrow.size, 8192):
                pts, cl = ownrow[lo:lo + 8192], own[lo:lo + 8192]
                g[lo:lo + 8192] = np.einsum("ij,ij->i", self.x[pts], self.negc2[cl]) + self.cn[cl]
            gown = g.astype(np.float64) + self.xsq[ownrow]
            self.u[ownrow] = np.sqrt(gown + self.bound[ownrow]) * (1.0 + 1e-12)
            self.dis[ownrow] = np.maximum(gown, 0.0)
        m = others.astype(np.float64) + self.xsq
        lm = np.sqrt(np.maximum(m - self.bound, 0.0)) * (1.0 - 1e-12)
        np.minimum(self.l, lm, out=self.l)

    # ---------------------------------------------------------------- main loop
    def run(self) -> np.ndarray | None:
        import scipy.sparse as sp

        k, n, x = self.k, self.n, self.x
        self._recompute(None)
        self.stats["recomputed"].append(n)
        sums = np.zeros((k, self.d), dtype=np.float32)
        cent_moved = np.ones(k, dtype=bool)  # centroids that changed at the last update
        risky: list[tuple[int, np.ndarray, np.ndarray]] = []  # (i, C_{i-1}, C_i)
        after: dict[int, np.ndarray] = {}                     # i -> a_{i+1} for risky i
        c_prev = a_prev = dis_prev = bound_prev = None
        for i in range(self.niter):  # FAISS iteration i: self.a is a_i (against C_i = self.c)
            if i == 0:
                moved_clusters = np.arange(k)
            else:
                if self.moved.size == 0:  # a_i == a_{i-1}: every later iteration is identical
                    self.stats["converged"] = True
                    break
                moved_clusters = np.unique(np.concatenate([a_prev[self.moved], self.a[self.moved]]))
            counts = np.bincount(self.a, minlength=k)
            if counts.min() == 0:
                return None  # FAISS would split a cluster with its own RNG
            if 1 <= i <= self.niter - 2:  # FAISS stops when iteration i's objective equals i-1's
                changed_pos = cent_moved[self.a] | (self.a != a_prev)
                if self._may_stop(dis_prev, bound_prev, changed_pos):
                    risky.append((i, c_prev, self.c))
                    self.stats["risky"].append(i)
            # float32 sums of the clusters whose member list changed, in FAISS's order (CSR rows)
            member = np.zeros(k, dtype=bool)
            member[moved_clusters] = True
            pts = np.flatnonzero(member[self.a])
            pts = pts[np.argsort(self.a[pts], kind="stable")]
            indptr = np.concatenate([[0], np.cumsum(counts[moved_clusters])])
            csr = sp.csr_matrix((np.ones(pts.size, dtype=np.float32), pts, indptr),
                                shape=(moved_clusters.size, n))
            sums[moved_clusters] = csr @ x
            c_new = self.c.copy()  # C_{i+1} = sum * float(1 / count), as FAISS
            inv = np.float32(1.0) / counts[moved_clusters].astype(np.float32)
            c_new[moved_clusters] = sums[moved_clusters] * inv[:, None]
            c_prev, a_prev, dis_prev, bound_prev = self.c, self.a.copy(), self.dis.copy(), self.bound
            cent_moved = np.zeros(k, dtype=bool)
            cent_moved[moved_clusters] = True
            self._set_centroids(c_new)
            self.moved = self._step(moved_clusters, c_prev)
            self.stats["iterations"] = i + 1
            if risky and risky[-1][0] == i:
                after[i] = self.a.copy()
        self.stats["centroids"] = self.c  # C_niter (= FAISS's km.centroids), unless FAISS stopped early
        return self._resolve_early_stop(self.a, risky, after)

    def _may_stop(self, old: np.ndarray, bound_old: np.ndarray, changed: np.ndarray) -> bool:
        """Could FAISS's objective (float32 sum of its distances in point order) be the same for
        the previous and the current iteration? `old` / `self.dis`: our estimates of FAISS's
        distances (each within 2 bound of it); `changed`: the positions whose distance changed.

        Stage 1: the change of the sum against float32 accumulation noise (6 sigma, rounding
        errors as independent) plus the estimates' error. Stage 2: where the partial sums stay in
        one binade (spacing h), a + P rounds to P + round_h(a), so the two sums differ by
        sum over changed positions of round_h(new) - round_h(old), exactly except at binade
        crossings and round-half-even ties (margins), and where an estimate lies within its
        error of a rounding boundary (6 sigma again)."""
        new = self.dis
        pos = np.flatnonzero(changed)
        if not pos.size:
            return True
        err = 2.0 * np.maximum(self.bound[pos], bound_old[pos])
        total = float(new.sum())
        hmax = float(np.spacing(np.float32(total * 1.01 + 1.0)))
        delta = float((new[pos] - old[pos]).sum())
        if abs(delta) > _SIGMAS * hmax * math.sqrt(pos.size / 6.0 + 1.0) + 4.0 * hmax + float(err.sum()):
            return False
        self.stats["stop_test_stage2"] += 1
        pre_n, pre_o = np.cumsum(new), np.cumsum(old)
        band = 8.0 * math.sqrt(self.n) * hmax + 4.0 * float(np.maximum(self.bound, bound_old).sum())
        before = np.minimum(pre_n - new, pre_o - old)[pos] - band
        after = np.maximum(pre_n, pre_o)[pos] + band
        e_lo = np.floor(np.log2(np.maximum(before, 1e-300)))
        e_hi = np.floor(np.log2(np.maximum(after, 1e-300)))
        clean = (before > 0) & (e_lo == e_hi)
        h = np.exp2(e_hi - 23.0)  # float32 spacing of both partial sums there
        vn, vo = new[pos], old[pos]
        qn, qo = vn / h, vo / h
        amb = ((np.abs(qn - np.floor(qn) - 0.5) <= err / h) | (np.abs(qo - np.floor(qo) - 0.5) <= err / h)
               | (vn <= err) | (vo <= err))
        sure = clean & ~amb
        d_est = float(((np.round(qn[sure]) - np.round(qo[sure])) * h[sure]).sum())
        d_est += float((vn[~sure] - vo[~sure]).sum())
        unc = (_SIGMAS * math.sqrt(float((h[clean & amb] ** 2).sum())) + 2.0 * float(err[~sure].sum())
               + 2.0 * float(h[~clean].sum())     # changed positions near a crossing
               + 8.0 * hmax                       # binade crossings elsewhere (sum of h over binades <= 2 hmax)
               + 20.0 * hmax)                     # round-half-even ties (~1 expected per sum)
        return abs(d_est) <= unc

    def _resolve_early_stop(self, final: np.ndarray, risky: list, after: dict) -> np.ndarray | None:
        relevant = [i for i, _, _ in risky if not np.array_equal(after[i], final)]
        if not relevant:
            return final
        last = max(relevant)
        cache: dict[int, np.float32] = {}
        for i, c_before, c_at in risky:
            if i > last:
                break
            if i - 1 not in cache:
                cache[i - 1] = self._faiss_objective(c_before)
            cache[i] = self._faiss_objective(c_at)
            if cache[i] == cache[i - 1]:
                self.stats["stopped_early_at"] = i
                self.stats["centroids"] = None  # FAISS's are C_{i+1}, not kept
                return after[i]
            if cache[i] > cache[i - 1]:
                return None  # objective went up: FAISS's stop rule for that case is not pinned down
        return final
