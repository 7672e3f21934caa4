"""slade_dist.eval.native (compile at first use, cache, fall back) and the compiled kernels of
slade_dist/eval/_kernels.c called directly: the packed layout, the threshold filter with its
overflow report, and the running top-2 search, against numpy."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from slade_dist.eval import knn, native

needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and no memo; the memo is dropped again afterwards."""
    monkeypatch.setenv("SLADE_DIST_CACHE", str(tmp_path))
    monkeypatch.delenv("SLADE_DIST_NATIVE", raising=False)
    native.forget()
    yield tmp_path
    native.forget()


@pytest.fixture
def lib():
    native.forget()
    got = native.kernels()
    if got is None:
        pytest.skip("kernels unavailable (no C compiler or no AVX2/FMA)")
    return got


@needs_cc
def test_compiles_once_into_the_cache_then_reuses_it(fresh):
    assert native.kernels() is not None
    built = list((fresh / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left behind
    stamp = built[0].stat().st_mtime_ns
    native.forget()
    assert native.kernels() is not None
    assert list((fresh / "native").iterdir()) == built and built[0].stat().st_mtime_ns == stamp


def test_failing_compiler_falls_back_with_a_warning_and_knn_stays_exact(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    with caplog.at_level(logging.WARNING, logger="slade_dist.eval.native"):
        assert native.kernels() is None
    assert "unavailable" in caplog.text and "failed" in caplog.text
    assert not list((fresh / "native").glob("*.so"))
    x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    vals, idx = knn.exact_topk(x, x, 5, symmetric=True, tile=64, sample_size=32)
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    assert np.abs(vals - -np.sort(-sims, axis=1)[:, :5]).max() < 1e-4


def test_missing_compiler_and_opt_out_give_none(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    assert native.kernels() is None
    native.forget()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("SLADE_DIST_NATIVE", "0")
    assert native.kernels() is None
    assert not (fresh / "native").exists()  # opting out compiles nothing


def test_pack_rows_layout(lib):
    x = np.arange(13 * 5, dtype=np.float32).reshape(13, 5)
    out = native.pack_rows(lib, x, 6).reshape(3, 5, 6)  # [sliver][k][row]
    want = np.zeros((18, 5), np.float32)
    want[:13] = x
    assert (out == want.reshape(3, 6, 5).transpose(0, 2, 1)).all()


def _filter(lib, q, r, theta_r, theta_c, both, cap):
    """simfilter_tile on one whole tile; returns its code and the two kept (row, value, ref) sets."""
    pad = 64
    tr = np.concatenate([theta_r, np.full(pad, np.inf, np.float32)])
    tc = np.concatenate([theta_c, np.full(pad, np.inf, np.float32)])
    qp, rp = native.pack_rows(lib, q, lib.mr), native.pack_rows(lib, r, lib.nr)
    kr, kc = knn._Kept(cap), knn._Kept(cap)
    counts = np.zeros(2, np.int64)
    (rr, rv, rf), (cr, cv, cf) = kr.arrays, kc.arrays
    rc = lib.simfilter_tile(qp.ctypes.data, rp.ctypes.data, q.shape[1], q.shape[0], r.shape[0],
                            tr.ctypes.data, tc.ctypes.data, int(both),
                            rr.ctypes.data, rv.ctypes.data, rf.ctypes.data, cap, 1000,
                            cr.ctypes.data, cv.ctypes.data, cf.ctypes.data, cap, 2000, counts.ctypes.data)
    return rc, kr.take(int(counts[0])), kc.take(int(counts[1]))


def test_simfilter_keeps_exactly_the_values_above_their_thresholds(lib):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((53, 40)).astype(np.float32)  # ragged: 53 = 8 x 6 + 5, 37 = 2 x 16 + 5
    r = rng.standard_normal((37, 40)).astype(np.float32)
    sims = q.astype(np.float64) @ r.T.astype(np.float64)
    # thresholds between two well-separated similarities, so float32 rounding cannot matter
    theta_r = np.array([_gap_threshold(row, 4) for row in sims], np.float32)
    theta_c = np.array([_gap_threshold(col, 3) for col in sims.T], np.float32)
    rc, (rows, vals, refs), (c_rows, c_vals, c_refs) = _filter(lib, q, r, theta_r, theta_c, True, 4096)
    assert rc == 0
    assert set(zip(rows.tolist(), (refs - 1000).tolist())) == set(zip(*np.nonzero(sims > theta_r[:, None])))
    assert set(zip((c_refs - 2000).tolist(), c_rows.tolist())) == set(zip(*np.nonzero(sims > theta_c[None, :])))
    assert np.abs(vals - sims[rows, refs - 1000]).max() < 1e-4
    assert np.abs(c_vals - sims[c_refs - 2000, c_rows]).max() < 1e-4
    # without `both` only the row side; a negative threshold keeps every real column, no padding
    rc, (rows, _, refs), (c_rows, _, _) = _filter(lib, q, r, np.full(53, -1e9, np.float32), theta_c, False, 4096)
    assert rc == 0 and len(rows) == 53 * 37 and len(c_rows) == 0 and (refs - 1000).max() == 36


def test_simfilter_reports_overflow_instead_of_writing_past_the_arrays(lib):
    q = np.ones((12, 8), np.float32)
    rc, _, _ = _filter(lib, q, q, np.zeros(12, np.float32), np.zeros(12, np.float32), True, 100)
    assert rc == -1  # 144 values pass, room for 100


def _gap_threshold(v: np.ndarray, keep: int) -> float:
    """A value between the keep-th and (keep+1)-th largest of v, at the widest gap near there."""
    s = np.sort(v)[::-1]
    gaps = s[keep - 1:keep + 3] - s[keep:keep + 4]
    j = keep - 1 + int(np.argmax(gaps))
    return float((s[j] + s[j + 1]) / 2)


def test_min2_matches_numpy_over_column_ranges_with_a_skipped_column(lib):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((61, 24)).astype(np.float32)
    c = rng.standard_normal((45, 24)).astype(np.float32)
    negc2, cn = -2.0 * c, np.einsum("ij,ij->i", c, c)
    skip = rng.integers(-1, 45, 61).astype(np.int64)
    best = np.full(61, np.inf, np.float32)
    second = np.full(61, np.inf, np.float32)
    best_j = np.full(61, -1, np.int64)
    xp = native.pack_rows(lib, x, lib.mr)
    for lo, hi in [(0, 20), (20, 45)]:  # two calls continue one search
        cp = native.pack_rows(lib, np.ascontiguousarray(negc2[lo:hi]), lib.nr)
        add = np.full(hi - lo + 32, np.inf, np.float32)
        add[:hi - lo] = cn[lo:hi]
        lib.min2_tile(xp.ctypes.data, cp.ctypes.data, 24, 61, hi - lo, add.ctypes.data, lo, skip.ctypes.data,
                      best.ctypes.data, best_j.ctypes.data, second.ctypes.data)
    dist = x.astype(np.float64) @ negc2.T.astype(np.float64) + cn
    dist[np.arange(61)[skip >= 0], skip[skip >= 0]] = np.inf
    order = np.argsort(dist, axis=1)
    assert (best_j == order[:, 0]).all()
    assert np.abs(best - dist[np.arange(61), order[:, 0]]).max() < 1e-3
    assert np.abs(second - dist[np.arange(61), order[:, 1]]).max() < 1e-3


def test_topj_keeps_each_rows_j_largest_in_order(lib):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((29, 16)).astype(np.float32)
    r = rng.standard_normal((70, 16)).astype(np.float32)
    r[40] = r[3]  # an exact tie inside every row
    best = np.full((29, 5), -np.inf, np.float32)
    qp, rp = native.pack_rows(lib, q, lib.mr), native.pack_rows(lib, r, lib.nr)
    lib.topj_tile(qp.ctypes.data, rp.ctypes.data, 16, 29, 70, 5, best.ctypes.data)
    want = -np.sort(-(q.astype(np.float64) @ r.T.astype(np.float64)), axis=1)[:, :5]
    assert np.abs(best - want).max() < 1e-4
    assert (np.diff(best, axis=1) <= 0).all()
