"""Compiled (numba) selection primitives of the collator's batch kernels (fm/_kernels.py): the hashed uniforms of
`fm.data.collator.hashed_uniform` kept as their 53-bit integers (the float is that integer / 2⁵³, so the order is
the same), the k smallest keys in (key, index) order by a bucket pass over the keys' top bits (expected O(n): the
keys are uniform), and masking as a threshold selection. tests/test_kernels.py checks them against the numpy path.
"""
from __future__ import annotations

import numpy as np
from numba import njit


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


@njit(cache=True, nogil=True, inline="always")
def _splitmix(x):
    x = x + _GOLDEN
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@njit(cache=True, nogil=True, inline="always")
def _hash53(base, cell, position):
    """hashed_uniform(...) * 2⁵³ as an integer (`base` = splitmix of the seed word)."""
    h = _splitmix(base ^ np.uint64(cell))
    return _splitmix(h ^ np.uint64(position)) >> _S11


@njit(cache=True, nogil=True)
def _smallest(keys, n, k, out, count, perm, sk):
    """out[:k] = indices of the k smallest keys[:n] (53-bit uniform integers), in (key, index) order;
    returns whether two of the keys sorted there are equal.

    A stable scatter into ~n buckets by the key's top bits leaves every key within its bucket of its
    sorted place, so one insertion sort pass over the scattered keys finishes the order with almost no
    moves (and few mispredicted branches). `count` needs >= n + 2 entries (power-of-two bucket count
    <= 2·n), `perm` and `sk` n each."""
    if k <= 0:
        return False
    bits = 0
    while (1 << bits) < n:
        bits += 1
    nb = 1 << bits
    shift = np.uint64(53 - bits)
    for b in range(nb + 1):
        count[b] = 0
    for i in range(n):
        count[np.int64(keys[i] >> shift) + 1] += 1
    for b in range(nb):
        count[b + 1] += count[b]
    for i in range(n):
        key = keys[i]
        b = np.int64(key >> shift)
        pos = count[b]
        sk[pos] = key
        perm[pos] = i
        count[b] = pos + 1
    # only the buckets up to the one holding sorted position k - 1 matter
    last = k
    while last < n and (sk[last] >> shift) == (sk[k - 1] >> shift):
        last += 1
    tie = False
    for x in range(1, last):
        v = sk[x]
        if sk[x - 1] >= v:
            if sk[x - 1] == v:
                tie = True
                continue
            i = perm[x]
            y = x - 1
            while y >= 0 and sk[y] > v:
                sk[y + 1] = sk[y]
                perm[y + 1] = perm[y]
                y -= 1
            if y >= 0 and sk[y] == v:
                tie = True
            sk[y + 1] = v
            perm[y + 1] = i
    for x in range(k):
        out[x] = perm[x]
    return tie


@njit(cache=True, nogil=True)
def _most_expressed(counts, genes, count_bits, lo, n, keys, sel, k):
    """sel[:k] = positions (in counts[lo:lo+n]) of a cell's k most expressed genes, ties by gene id ascending, as
    inference chooses them (count bits descending, -0.0 as 0.0; a stable sort of one uint64 key per gene).
    Returns 1 on a negative/NaN count or a gene id outside [0, 2^32) (the caller falls back), else 0."""
    for p in range(n):
        v = counts[lo + p]
        g = genes[lo + p]
        if not (v >= 0) or g < 0 or g >= 1 << 32:
            return 1
        bits = np.uint64(count_bits[lo + p])
        if v == 0:  # -0.0 orders as 0.0
            bits = np.uint64(0)
        keys[p] = ((np.uint64(0xFFFFFFFF) - bits) << np.uint64(32)) | np.uint64(g)
    order = np.argsort(keys[:n], kind="mergesort")
    for c in range(k):
        sel[c] = order[c]
    return 0


@njit(cache=True, nogil=True)
def _hash_positions(h, n, out):
    """out[p] = _hash53 of (cell, p) for p < n, h = splitmix(base ^ cell) (a loop of its own: it vectorises)."""
    for p in range(n):
        out[p] = _splitmix(h ^ np.uint64(p)) >> _S11


@njit(cache=True, nogil=True)
def _hash_genes(h, genes, n, out):
    """out[c] = _hash53 of (cell, genes[c]) for c < n, h = splitmix(base ^ cell)."""
    for c in range(n):
        out[c] = _splitmix(h ^ np.uint64(genes[c])) >> _S11


@njit(cache=True, nogil=True)
def _threshold(keys, t, nm, count, tmp):
    """The nm-th smallest of keys[:t] (0 < nm < t; 53-bit uniform integers) as (T, below, equal): `below` keys
    are < T, `equal` keys == T, below < nm <= below + equal. A count of the keys' top bits finds T's bucket;
    only that bucket (~1 key) is sorted."""
    bits = 0
    while (1 << bits) < t:
        bits += 1
    nb = 1 << bits
    shift = np.uint64(53 - bits)
    for b in range(nb):
        count[b] = 0
    for c in range(t):
        count[np.int64(keys[c] >> shift)] += 1
    cum = 0
    bucket = 0
    while cum + count[bucket] < nm:
        cum += count[bucket]
        bucket += 1
    nt = 0
    for c in range(t):
        key = keys[c]
        if np.int64(key >> shift) == bucket:
            tmp[nt] = key
            nt += 1
    for x in range(1, nt):  # insertion sort of the bucket
        v = tmp[x]
        y = x - 1
        while y >= 0 and tmp[y] > v:
            tmp[y + 1] = tmp[y]
            y -= 1
        tmp[y + 1] = v
    T = tmp[nm - cum - 1]
    below = cum
    equal = 0
    for x in range(nt):
        if tmp[x] < T:
            below += 1
        elif tmp[x] == T:
            equal += 1
    return T, below, equal


@njit(cache=True, nogil=True)
def _mask_row(mkeys, t, n_mask, sel, ke, n, count, tmp, masked, values, mask_value):
    """Mask the min(n_mask, t) tokens of a row with the smallest keys mkeys[:t] (columns: ke kept expressed genes,
    sel[c] the row position of column c's gene, then zero genes); equal keys go by token order (expressed genes
    by row position, then zero genes), the numpy path's order."""
    nm = min(n_mask, t)  # mask_ratio > 1: every token
    if nm <= 0:
        return
    if nm >= t:
        for c in range(t):
            masked[c] = True
            values[c] = mask_value
        return
    T, below, equal = _threshold(mkeys, t, nm, count, tmp)
    if below + equal == nm:  # every key == T is in
        for c in range(t):  # branch-free: the hits are random
            hit = mkeys[c] <= T
            masked[c] = hit
            values[c] = mask_value if hit else values[c]
        return
    for c in range(t):
        if mkeys[c] < T:
            masked[c] = True
            values[c] = mask_value
    # nm - below of the keys == T, the first in token order
    for _ in range(nm - below):
        best = -1
        best_rank = 0
        for c in range(t):
            if mkeys[c] == T and not masked[c]:
                rank = sel[c] if c < ke else n + c
                if best < 0 or rank < best_rank:
                    best = c
                    best_rank = rank
        masked[best] = True
        values[best] = mask_value
