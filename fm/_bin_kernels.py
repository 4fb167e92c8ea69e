"""Compiled (numba) per-cell binning: scGPT's quantile edges exactly as `fm.binning.bin_csr` computes them (numpy's
'linear' quantile: float32 differences, float64 interpolation), then each value's (left + right + 1) // 2 by a
binary search over the edges. The sorted values come from a histogram of the small integer counts (most entries
of a count cell) merged with the sorted rest, or, for an all-integer cell, straight from the cumulative
histogram: no full sort per cell. Used by `bin_csr` (float32 values) and by the collator's batch kernels
(fm/_kernels.py); tests/test_kernels.py checks both against the numpy path bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_SMALL = 1024  # integer counts below this are histogrammed, not sorted


@njit(cache=True, nogil=True)
def _bin_of(x, edges):
    """(#edges <= x + #edges < x + 1) // 2 for sorted float64 edges."""
    n = edges.size
    lo, hi = 0, n  # first edge > x
    while lo < hi:
        mid = (lo + hi) >> 1
        if edges[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    left = lo
    lo, hi = 0, left  # first edge >= x (<= left)
    while lo < hi:
        mid = (lo + hi) >> 1
        if edges[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return (left + lo + 1) // 2


@njit(cache=True, nogil=True, inline="always")
def _lerp_edge(a, b, gamma):
    """numpy's 'linear' quantile between neighbouring sorted float32 values a <= b (fm.binning._bin_block)."""
    diff = np.float32(b - a)
    if gamma >= 0.5:
        return np.float64(b) - np.float64(diff) * (1.0 - gamma)
    return np.float64(a) + np.float64(diff) * gamma


@njit(cache=True, nogil=True)
def _cell_edges(hist, vmax, rest, nrest, m, s, q, edges):
    """scGPT's quantile edges (numpy's 'linear' quantile, as fm.binning._bin_block computes it) of a cell's m
    positive values: the integer ones counted in hist[1..vmax], the others in rest[:nrest] (unsorted)."""
    nq = q.size
    last = np.float64(m - 1)
    if nrest == 0:
        # only integer counts: the value at a sorted rank read from the cumulative histogram, by a cursor that only
        # moves forward (ranks asked for are non-decreasing, except a repeat of the previous edge's pair)
        k = 0
        cum = 0  # values <= k
        prev_ip = -1
        a = np.float32(0)
        b = np.float32(0)
        for e in range(nq):
            virtual = last * q[e]
            prev_f = np.floor(virtual)
            gamma = virtual - prev_f
            if virtual >= last:
                a = np.float32(vmax)
                b = a
                prev_ip = -1
            else:
                ip = np.int64(prev_f)
                if ip != prev_ip:
                    while cum <= ip:
                        k += 1
                        cum += hist[k]
                    a = np.float32(k)
                    if cum > ip + 1:
                        b = a
                    else:  # the next nonzero count after k (the cursor stays: the next edge may ask for ip + 1)
                        k2 = k + 1
                        while hist[k2] == 0:
                            k2 += 1
                        b = np.float32(k2)
                    prev_ip = ip
            edges[e] = _lerp_edge(a, b, gamma)
        return
    rs = np.sort(rest[:nrest])
    p = 0
    r = 0
    for k in range(1, vmax + 1):
        c = hist[k]
        if c:
            fk = np.float32(k)
            while r < nrest and rs[r] < fk:
                s[p] = rs[r]
                p += 1
                r += 1
            for _ in range(c):
                s[p] = fk
                p += 1
    while r < nrest:
        s[p] = rs[r]
        p += 1
        r += 1
    for e in range(nq):
        virtual = last * q[e]
        prev_f = np.floor(virtual)
        gamma = virtual - prev_f
        if virtual >= last:
            a = s[m - 1]
            b = a
        else:
            ip = np.int64(prev_f)
            a = s[ip]
            b = s[ip + 1]
        edges[e] = _lerp_edge(a, b, gamma)


@njit(cache=True, nogil=True)
def bin_csr_f32(indptr, values, q, out):
    """bin_csr for float32 values into `out` (int64). Returns 0, or 1 where a value is NaN, inf or negative
    (the caller then runs the numpy path, which raises the error)."""
    n_rows = indptr.size - 1
    nq = q.size
    maxlen = 0
    for i in range(n_rows):
        maxlen = max(maxlen, indptr[i + 1] - indptr[i])
    hist = np.zeros(_SMALL, np.int64)
    table = np.zeros(_SMALL, np.int64)
    rest = np.empty(maxlen, np.float32)
    s = np.empty(maxlen, np.float32)
    edges = np.empty(nq, np.float64)
    for i in range(n_rows):
        lo, hi = indptr[i], indptr[i + 1]
        m = 0
        nrest = 0
        vmax = 0
        for j in range(lo, hi):
            v = values[j]
            if not (v >= 0) or v == np.inf:
                for k in range(vmax + 1):
                    hist[k] = 0
                return 1
            if v > 0:
                m += 1
                if v < _SMALL and np.int64(v) == v:
                    k = np.int64(v)
                    hist[k] += 1
                    if k > vmax:
                        vmax = k
                else:
                    rest[nrest] = v
                    nrest += 1
        if m == 0:
            for j in range(lo, hi):
                out[j] = 0
            continue
        _cell_edges(hist, vmax, rest, nrest, m, s, q, edges)
        for k in range(1, vmax + 1):
            if hist[k]:
                table[k] = _bin_of(np.float64(k), edges)
                hist[k] = 0
        for j in range(lo, hi):
            v = values[j]
            if v <= 0:
                out[j] = 0
            elif v < _SMALL and np.int64(v) == v:
                out[j] = table[np.int64(v)]
            else:
                out[j] = _bin_of(np.float64(v), edges)
    return 0
