"""Stage 2: per-cell value binning as in scGPT, without a per-cell Python loop.

For each cell the non-zero values get bins ``1 .. n_bins-1`` and zeros stay bin 0.
The cell's bin edges are the quantiles of its non-zero values at
``linspace(0, 1, n_bins - 1)`` (numpy's default "linear" quantile), and a value gets a
bin between ``np.digitize(x, edges, right=True)`` (exclusive) and ``np.digitize(x, edges)``
(inclusive); the two differ only when the value equals one or more edges (ties, which
count-derived data has in plenty). Tie modes:

``random``
    The bin is drawn uniformly from that range as scGPT draws it,
    ``ceil(u * (right - left) + left)`` with one uniform ``u`` per non-zero value taken
    in cell-major, gene-minor order from ``np.random.RandomState(seed)`` -- the stream
    that ``np.random.seed(seed)`` followed by scGPT's per-cell loop consumes. The output
    equals scGPT's bit for bit (:func:`reference_binning` is that loop, the yardstick
    for the tests and ``benchmarks/bench_binning.py``).
``deterministic``
    No random numbers: a tied value takes the middle of its range (rounded up).

How, without a per-cell Python loop: the matrix is read in row chunks (bounded
memory). The uniforms come from a compiled MT19937 that replays numpy's generator bit for
bit (:func:`fill_uniforms`, ~4x ``RandomState.random_sample``). Each row is binned by
compiled numba kernels on one of two paths with the same result:

* distinct values (count-derived data: a cell's non-zeros take few distinct values, each
  a log1p of a scaled count): one pass hashes every value to its distinct id and counts;
  only the d distinct values are sorted; the quantile's order statistics are read off the
  running counts; each distinct value's digitisation is merged against the edges once,
  and a second pass writes every value's bin from its id and its own uniform;
* sorting (rows with more than ~20% distinct values, e.g. continuous data): rows are
  grouped by their number of non-zeros, each group padded into one [cells, width] block
  and sorted row-wise by numpy (a vectorised SIMD sort); a kernel replays numpy's
  quantile interpolation and digitises each value by a branch-free binary search.

Explicitly stored zeros are not non-zeros (bin 0, no draw), as in scGPT. With
``n_threads`` > 1, rows are binned in parallel while one thread draws the uniforms part
by part ahead of them; the result does not depend on the number of threads or the
chunking.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from evoformer.data.arrays import slot_dtype
from evoformer.data.datasets import read_h5_elem
from evoformer.errors import InputError
from evoformer.io import atomic_path, npy_rows_writer, write_text_atomic

log = logging.getLogger(__name__)

TIE_MODES = ("random", "deterministic")

# Non-zeros read and binned per chunk (~100 MiB of temporaries), whatever the number of cells.
_NONZEROS_PER_CHUNK = 1 << 23


def values_dtype(n_bins: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds bins ``0 .. n_bins-1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if n_bins - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise InputError(f"n_bins={n_bins} is too large")


def gene_index_dtype(n_genes: int) -> np.dtype:
    """Smallest signed integer dtype that holds gene indices ``0 .. n_genes-1`` and -1."""
    for dt in (np.int8, np.int16, np.int32):
        if n_genes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def check_n_bins(n_bins: int) -> None:
    """Raise :class:`InputError` unless ``n_bins`` >= 3 (bin 0 plus at least two value bins)."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 3:
        raise InputError(
            f"n_bins={n_bins!r}: need an integer >= 3 (bin 0 for zeros, at least 2 value bins)"
        )


def _check_tie_mode(tie_mode: str) -> None:
    if tie_mode not in TIE_MODES:
        raise InputError(f"binning.tie_mode={tie_mode!r}: expected one of {', '.join(TIE_MODES)}")


# MT19937 as numpy's RandomState runs it (N = 624 words of state, M = 397).
_MT_N = 624
_MT_M = 397


@numba.njit(cache=True, nogil=True)
def _mt_twist(key):  # pragma: no cover - compiled
    """Regenerate the 624-word MT19937 state in place (numpy's ``mt19937_gen``).

    Written as three loops without a wrap-around index so that the compiler vectorises
    them: words i < N-M read the old word i+M, the next N-M-1 read the new word i+M-N.
    """
    upper = np.uint32(0x80000000)
    lower = np.uint32(0x7FFFFFFF)
    matrix_a = np.uint32(0x9908B0DF)
    one = np.uint32(1)
    zero = np.uint32(0)
    for i in range(_MT_N - _MT_M):
        y = (key[i] & upper) | (key[i + 1] & lower)
        key[i] = key[i + _MT_M] ^ (y >> one) ^ ((zero - (y & one)) & matrix_a)
    for i in range(_MT_N - _MT_M, _MT_N - 1):
        y = (key[i] & upper) | (key[i + 1] & lower)
        key[i] = key[i + _MT_M - _MT_N] ^ (y >> one) ^ ((zero - (y & one)) & matrix_a)
    y = (key[_MT_N - 1] & upper) | (key[0] & lower)
    key[_MT_N - 1] = key[_MT_M - 1] ^ (y >> one) ^ ((zero - (y & one)) & matrix_a)


@numba.njit(cache=True, nogil=True, inline="always")
def _mt_temper(y):  # pragma: no cover - compiled
    y ^= y >> np.uint32(11)
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    y ^= y >> np.uint32(18)
    return y


@numba.njit(cache=True, nogil=True, inline="always")
def _mt_double(a, b):  # pragma: no cover - compiled
    """numpy's 53-bit double from two tempered words (``mt19937_next_double``)."""
    return ((a >> np.uint32(5)) * 67108864.0 + (b >> np.uint32(6))) / 9007199254740992.0


@numba.njit(cache=True, nogil=True)
def _mt_uniforms(key, pos, out):  # pragma: no cover - compiled
    """Fill out[n] with ``RandomState.random_sample`` draws from state (key[624], pos).

    Advances key in place and returns the new pos: the draws and the final state equal
    numpy's bit for bit. Whole 624-word blocks are twisted, tempered and converted in
    vectorisable loops (~4x numpy's one-word-at-a-time generator).
    """
    n = out.shape[0]
    tempered = np.empty(_MT_N, np.uint32)
    i = 0
    # one word at a time until the state is exhausted (pos == N: a block boundary)
    while i < n and pos != _MT_N:
        a = _mt_temper(key[pos])
        pos += 1
        if pos == _MT_N:
            _mt_twist(key)
            pos = 0
        b = _mt_temper(key[pos])
        pos += 1
        out[i] = _mt_double(a, b)
        i += 1
    # whole blocks: 624 words give 312 doubles
    while n - i >= _MT_N // 2:
        _mt_twist(key)
        for k in range(_MT_N):
            tempered[k] = _mt_temper(key[k])
        for k in range(_MT_N // 2):
            out[i + k] = _mt_double(tempered[2 * k], tempered[2 * k + 1])
        i += _MT_N // 2
    # the tail (pos == N here whenever the loop above ran)
    while i < n:
        if pos == _MT_N:
            _mt_twist(key)
            pos = 0
        a = _mt_temper(key[pos])
        pos += 1
        if pos == _MT_N:
            _mt_twist(key)
            pos = 0
        b = _mt_temper(key[pos])
        pos += 1
        out[i] = _mt_double(a, b)
        i += 1
    return pos


def fill_uniforms(
    rng: np.random.RandomState,
    outs: list[np.ndarray],
    ready: list[threading.Event] | None = None,
) -> None:
    """Fill the float64 arrays ``outs`` in turn with ``rng.random_sample`` draws, bit for bit.

    One stream: the arrays together receive what ``rng.random_sample(sum of lengths)``
    returns, and ``rng`` ends in the state that call leaves. For the MT19937 generator of
    a legacy RandomState the draws run in the compiled :func:`_mt_uniforms` (~4x
    numpy's speed) on a copy of the state, written back at the end; any other bit
    generator falls back to ``rng.random_sample``. ready: an event per array, set once
    that array is filled (all are set, even on an error, so no waiter hangs).
    """
    try:
        state = rng.get_state(legacy=False)
        if state.get("bit_generator") != "MT19937":
            for k, out in enumerate(outs):
                out[:] = rng.random_sample(len(out))
                if ready:
                    ready[k].set()
            return
        key = np.array(state["state"]["key"], dtype=np.uint32)
        pos = int(state["state"]["pos"])
        for k, out in enumerate(outs):
            pos = _mt_uniforms(key, pos, out)
            if ready:
                ready[k].set()
        state["state"] = {"key": key, "pos": int(pos)}
        rng.set_state(state)
    finally:
        for event in ready or ():
            event.set()


def random_sample(rng: np.random.RandomState, n: int) -> np.ndarray:
    """``rng.random_sample(n)`` bit for bit (same draws, same final state), but faster.

    Returns [n] float64 in [0, 1); see :func:`fill_uniforms`.
    """
    out = np.empty(n, dtype=np.float64)
    fill_uniforms(rng, [out])
    return out


@numba.njit(cache=True, nogil=True)
def _pad_rows(indptr, data, cells, out):  # pragma: no cover - compiled
    """out[j, :n] = non-zeros of row cells[j] (gene order); out[j, n:] = +inf."""
    for j in range(cells.shape[0]):
        lo = indptr[cells[j]]
        n = indptr[cells[j] + 1] - lo
        for i in range(n):
            out[j, i] = data[lo + i]
        for i in range(n, out.shape[1]):
            out[j, i] = np.inf


@numba.njit(cache=True, nogil=True, inline="always")
def _replay_quantile(n, qk, a, b):  # pragma: no cover - compiled
    """numpy's "linear" quantile at qk of n sorted values, given the order statistics
    a = s[floor(v)] and b = s[floor(v) + 1] at v = (n-1)*qk (unused when v >= n-1).

    The difference is taken in the data dtype, the rest in float64, and the lerp is
    numpy's two-sided one, so the result equals np.quantile's bit for bit.
    """
    v = (n - 1) * qk
    gamma = v - np.floor(v)
    diff = b - a
    if gamma >= 0.5:
        return b - diff * (1 - gamma)
    return a + diff * gamma


@numba.njit(cache=True, nogil=True)
def _bin_rows_distinct(
    indptr, data, keys, rows, q, u, deterministic, cap_frac, min_cap, bins, edges, fallback
):  # pragma: no cover - compiled
    """Edges and bins of ``rows`` from their distinct values, without sorting the rows.

    keys: [nnz] the bit patterns of data (uint32/uint64 view): for positive floats their
    unsigned order is the value order, and 0 marks an empty hash slot. u: [nnz] uniforms
    aligned with data (unused when deterministic). Writes bins[nnz] and edges[C, m].

    Count-derived expression has few distinct values per cell (log1p of a library-size
    scaled count: ~5% of a cell's non-zeros in the benchmark data). Per row: one pass
    hashes each value to its distinct id (open addressing) and counts; the distinct
    values are sorted (d of them, not n); the quantile's order statistics are read off
    the running counts, each distinct value's ``left`` (#edges <= x) and ``right``
    (#edges < x) are merged against the edges, and a second pass writes every value's
    bin from its id -- scGPT's ``ceil(u * (right - left) + left)`` with the value's own
    uniform, so ties draw exactly as in the reference. A row with more than
    ``max(min_cap, cap_frac * n)`` distinct values is left alone and its index appended
    to ``fallback`` (the sorting path does it faster); returns the number appended.
    """
    m = q.shape[0]
    max_n = 0
    for r in rows:
        max_n = max(max_n, indptr[r + 1] - indptr[r])
    cap_max = max(min_cap, np.int64(max_n * cap_frac))
    log_table = 1
    while (1 << log_table) < 2 * cap_max:  # load factor <= 1/2
        log_table += 1
    mask = (1 << log_table) - 1
    shift = np.uint64(64 - log_table)
    mult = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing
    table_key = np.zeros(mask + 1, keys.dtype)
    table_id = np.empty(mask + 1, np.int32)
    slot = np.empty(cap_max, np.int64)  # distinct id -> its hash slot (to clear the table)
    value = np.empty(cap_max, data.dtype)  # distinct id -> value
    key_of = np.empty(cap_max, keys.dtype)
    counts = np.empty((4, cap_max), np.int32)  # 4 interleaved counters: no store chains
    order = np.empty(cap_max, np.int64)  # ascending rank -> distinct id
    count = np.empty(cap_max, np.int64)  # ascending rank -> copies
    left_of = np.empty(cap_max, np.float64)
    span_of = np.empty(cap_max, np.float64)  # right - left (<= 0)
    det_of = np.empty(cap_max, np.int64)
    vid = np.empty(max_n, np.int32)  # value -> distinct id
    n_fallback = 0
    for r in rows:
        lo = indptr[r]
        n = indptr[r + 1] - lo
        if n == 0:
            continue
        cap = max(min_cap, np.int64(n * cap_frac))
        d = 0
        complete = True
        for i in range(n):
            key = keys[lo + i]
            h = np.int64((np.uint64(key) * mult) >> shift)
            t = table_key[h]
            while t != key and t != 0:
                h = (h + 1) & mask
                t = table_key[h]
            if t == 0:
                if d == cap:
                    complete = False
                    break
                table_key[h] = key
                table_id[h] = d
                slot[d] = h
                value[d] = data[lo + i]
                key_of[d] = key
                counts[0, d] = 0
                counts[1, d] = 0
                counts[2, d] = 0
                counts[3, d] = 0
                d += 1
            idx = table_id[h]
            counts[i & 3, idx] += 1
            vid[i] = idx
        for j in range(d):
            table_key[slot[j]] = 0
        if not complete:
            fallback[n_fallback] = r
            n_fallback += 1
            continue
        # distinct ids in ascending value order (insertion sort for few, else argsort)
        if d <= 48:
            for j in range(d):
                k = j
                while k > 0 and key_of[order[k - 1]] > key_of[j]:
                    order[k] = order[k - 1]
                    k -= 1
                order[k] = j
        else:
            order[:d] = np.argsort(key_of[:d])
        for j in range(d):
            idx = order[j]
            count[j] = counts[0, idx] + counts[1, idx] + counts[2, idx] + counts[3, idx]
        # the order statistics s[p], s[p+1] of the sorted row, walking the running counts
        e = edges[r]
        j = 0
        first = 0  # rank of the first copy of the j-th distinct value
        for k in range(m):
            v = (n - 1) * q[k]
            if v >= n - 1:
                e[k] = value[order[d - 1]]
                continue
            p = np.int64(np.floor(v))
            while first + count[j] <= p:
                first += count[j]
                j += 1
            a = value[order[j]]
            b = a if p + 1 < first + count[j] else value[order[j + 1]]
            e[k] = _replay_quantile(n, q[k], a, b)
        # left = #edges <= x and right = #edges < x (np.digitize's two sides) by merging
        kl = 0
        kr = 0
        for j in range(d):
            idx = order[j]
            x = np.float64(value[idx])
            while kl < m and e[kl] <= x:
                kl += 1
            while kr < m and e[kr] < x:
                kr += 1
            left_of[idx] = kl
            span_of[idx] = kr - kl
            det_of[idx] = (min(kr + 1, kl) + kl + 1) // 2
        if deterministic:
            for i in range(n):
                bins[lo + i] = det_of[vid[i]]
        else:
            for i in range(n):
                idx = vid[i]
                bins[lo + i] = np.int64(np.ceil(u[lo + i] * span_of[idx] + left_of[idx]))
    return n_fallback


@numba.njit(cache=True, nogil=True)
def _bin_sorted_rows(
    indptr, data, cells, sorted_rows, q, u, deterministic, up, bins, edges
):  # pragma: no cover - compiled
    """Edges and bins for the rows ``cells`` from their sorted values (the fallback path).

    sorted_rows[j, :n]: row cells[j]'s non-zeros ascending. q: [m] linspace(0, 1, m).
    u: [nnz] uniforms aligned with data (unused when deterministic).
    up: work array in the data dtype of length P, a power of two > m and >= 64, +inf-filled.
    Writes bins[nnz] and edges[C, m] in place.

    ``left`` = #edges <= x (np.digitize) is a branch-free binary search of ``up``, the
    edges rounded up to the data dtype (for x in that dtype, e <= x iff up(e) <= x; the
    +inf padding is never <= a finite x, so left <= m); its last six levels are unrolled
    with constant steps. ``right`` = #edges < x differs from it only when x equals an
    edge, and is then the index of the first edge of that run of equal edges.
    """
    m = q.shape[0]
    size = up.shape[0]
    pad = up[size - 1]  # +inf in the data dtype
    below = np.empty(m + 1, np.int64)  # below[k + 1]: #edges < e[k]
    below[0] = 0
    for j in range(cells.shape[0]):
        r = cells[j]
        lo = indptr[r]
        n = indptr[r + 1] - lo
        s = sorted_rows[j]
        e = edges[r]
        for k in range(m):
            v = (n - 1) * q[k]
            if v >= n - 1:
                e[k] = s[n - 1]
            else:
                p = np.int64(np.floor(v))
                e[k] = _replay_quantile(n, q[k], s[p], s[p + 1])
            up[k] = e[k]
            if up[k] < e[k]:
                up[k] = np.nextafter(up[k], pad)
            below[k + 1] = below[k] if k > 0 and e[k] == e[k - 1] else k
        for i in range(lo, lo + n):
            x = data[i]
            left = 0
            step = size >> 1
            while step >= 64:
                left += step if up[left + step - 1] <= x else 0
                step >>= 1
            for step in (32, 16, 8, 4, 2, 1):
                left += step if up[left + step - 1] <= x else 0
            if left > 0 and e[left - 1] == x:
                right = below[left]
                if deterministic:
                    bins[i] = (right + left + 2) // 2
                else:
                    bins[i] = np.int64(np.ceil(u[i] * (right - left) + left))
            else:
                bins[i] = left


# Cells binned together in one padded [cells, width] block by the sorting path; cells
# are grouped by their number of non-zeros, so a block's width wastes little padding.
_CELLS_PER_GROUP = 512
# A row goes to the sorting path when it has more than max(_MIN_DISTINCT_CAP,
# _DISTINCT_FRACTION * n) distinct values (there sorting d values costs more than
# sorting the row with numpy's SIMD sort).
_DISTINCT_FRACTION = 0.2
_MIN_DISTINCT_CAP = 32
# Rows per task of the distinct-value path when n_threads > 1.
_ROWS_PER_TASK = 1024


def bin_csr_rows(
    x: sp.csr_matrix,
    n_bins: int,
    tie_mode: str = "random",
    rng: np.random.RandomState | None = None,
    n_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Bin the non-zeros of a block of cells.

    x: [C, G] CSR with sorted indices, non-negative float32/float64 values (explicitly
        stored zeros are not non-zeros: they get bin 0 and draw nothing, as in scGPT).
    rng: the RandomState stream (``tie_mode="random"``); it advances by one draw per
        non-zero, so consecutive blocks continue one stream exactly as a per-cell loop would.
    n_threads: rows processed in parallel (the result does not depend on it).
    Returns (bins, edges): bins [nnz] int64 aligned with ``x.data`` (values 1..n_bins-1),
    edges [C, n_bins-1] float64 (all zero for a row without non-zeros).
    """
    if not x.has_sorted_indices:
        raise ValueError("bin_csr_rows needs a CSR block with sorted indices (x.sort_indices())")
    check_n_bins(n_bins)
    _check_tie_mode(tie_mode)
    if tie_mode == "random" and rng is None:
        raise ValueError("tie_mode='random' needs an rng")
    data = x.data if x.data.dtype in (np.float32, np.float64) else x.data.astype(np.float64)
    lowest = data.min() if len(data) else 1.0
    if not lowest > 0 and (data == 0).any():
        # explicitly stored zeros: bin the block without them (scGPT's row.nonzero())
        keep = data != 0
        row_of = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
        indptr = np.zeros(x.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of[keep], minlength=x.shape[0]), out=indptr[1:])
        nz = sp.csr_matrix((data[keep], x.indices[keep], indptr), shape=x.shape)
        nz.has_sorted_indices = True
        kept, edges = bin_csr_rows(nz, n_bins, tie_mode, rng, n_threads)
        bins = np.zeros(x.nnz, dtype=np.int64)
        bins[keep] = kept
        return bins, edges
    m = n_bins - 1
    q = np.linspace(0, 1, m)
    indptr = x.indptr.astype(np.int64)
    data = np.ascontiguousarray(data)
    edges = np.zeros((x.shape[0], m), dtype=np.float64)
    bins = np.empty(x.nnz, dtype=np.int64)
    deterministic = tie_mode == "deterministic"
    rows = np.flatnonzero(np.diff(indptr) > 0)
    # tasks of consecutive rows; their values, and so their uniforms, are consecutive too
    parts = [rows[i : i + _ROWS_PER_TASK] for i in range(0, len(rows), _ROWS_PER_TASK)]
    bounds = [int(indptr[part[0]]) for part in parts] + [x.nnz]
    u = np.empty(0 if deterministic else x.nnz, dtype=np.float64)
    u_parts = [u[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    ready = [threading.Event() for _ in parts]
    if deterministic:
        for event in ready:
            event.set()
    keys = None
    if lowest > 0:  # positive floats: bit order = value order, and no key is 0
        keys = data.view(np.uint32 if data.dtype == np.float32 else np.uint64)

    def distinct(k: int) -> np.ndarray:
        """Bin part k by the distinct-value path; returns the rows left to the sort path."""
        ready[k].wait()
        fallback = np.empty(len(parts[k]), dtype=np.int64)
        n_left = _bin_rows_distinct(
            indptr, data, keys, parts[k], q, u, deterministic,
            _DISTINCT_FRACTION, _MIN_DISTINCT_CAP, bins, edges, fallback,
        )  # fmt: skip
        return fallback[:n_left]

    if n_threads > 1:
        with ThreadPoolExecutor(n_threads) as pool:
            # the first worker draws the uniforms part by part while the others bin
            drawn = None if deterministic else pool.submit(fill_uniforms, rng, u_parts, ready)
            left = list(pool.map(distinct, range(len(parts)))) if keys is not None else [rows]
            if drawn is not None:
                drawn.result()
            _bin_sorting(indptr, data, np.concatenate([rows[:0], *left]), q, u, deterministic,
                         bins, edges, pool)  # fmt: skip
    else:
        if not deterministic:
            fill_uniforms(rng, u_parts, ready)
        left = [distinct(k) for k in range(len(parts))] if keys is not None else [rows]
        _bin_sorting(indptr, data, np.concatenate([rows[:0], *left]), q, u, deterministic,
                     bins, edges, None)  # fmt: skip
    return bins, edges


def _bin_sorting(
    indptr: np.ndarray,
    data: np.ndarray,
    rows: np.ndarray,
    q: np.ndarray,
    u: np.ndarray,
    deterministic: bool,
    bins: np.ndarray,
    edges: np.ndarray,
    pool: ThreadPoolExecutor | None,
) -> None:
    """The sorting path for ``rows`` (non-empty): rows grouped by length, each group
    padded into one [cells, width] block and sorted row-wise by numpy's SIMD sort, then
    edges and bins by :func:`_bin_sorted_rows`."""
    if not len(rows):
        return
    n = indptr[rows + 1] - indptr[rows]
    order = rows[np.argsort(n, kind="stable")]
    groups = [order[g : g + _CELLS_PER_GROUP] for g in range(0, len(order), _CELLS_PER_GROUP)]
    m = q.shape[0]
    search_size = max(64, 1 << m.bit_length())  # a power of two > m

    def bin_group(cells: np.ndarray) -> None:
        width = int(indptr[cells[-1] + 1] - indptr[cells[-1]])
        padded = np.empty((len(cells), width), dtype=data.dtype)
        _pad_rows(indptr, data, cells, padded)
        padded.sort(axis=1)
        up = np.full(search_size, np.inf, dtype=data.dtype)
        _bin_sorted_rows(indptr, data, cells, padded, q, u, deterministic, up, bins, edges)

    list(pool.map(bin_group, groups) if pool else map(bin_group, groups))


def reference_binning(
    x: np.ndarray | sp.spmatrix, n_bins: int, rng: np.random.RandomState | int
) -> tuple[np.ndarray, np.ndarray]:
    """The straightforward per-cell loop of scGPT's binning (the yardstick).

    x: [N, G] non-negative expression (sparse input is densified 1024 rows at a time,
    as scGPT densifies the whole matrix). rng: a RandomState or a seed for one;
    ``np.random.RandomState(seed)`` gives the stream of ``np.random.seed(seed)`` +
    ``np.random.rand`` that scGPT uses. Returns bins [N, G] int64 and edges
    [N, n_bins-1] float64 (zeros for an all-zero cell, which draws nothing).
    """
    if not isinstance(rng, np.random.RandomState):
        rng = np.random.RandomState(rng)
    quantiles = np.linspace(0, 1, n_bins - 1)
    out_bins, out_edges = [], []
    for start in range(0, x.shape[0], 1024):
        block = x[start : start + 1024]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        for row in block:
            binned = np.zeros_like(row, dtype=np.int64)
            if row.max() == 0:
                out_bins.append(binned)
                out_edges.append(np.zeros(n_bins - 1))
                continue
            nz = row.nonzero()
            values = row[nz]
            cell_edges = np.quantile(values, quantiles)
            left = np.digitize(values, cell_edges)
            right = np.digitize(values, cell_edges, right=True)
            u = rng.rand(len(values))
            binned[nz] = np.ceil(u * (right - left) + left).astype(np.int64)
            out_bins.append(binned)
            out_edges.append(cell_edges)
    return np.stack(out_bins), np.stack(out_edges)


def _read_csr_rows(
    group: h5py.Group, indptr: np.ndarray, start: int, stop: int, n_genes: int
) -> sp.csr_matrix:
    lo, hi = int(indptr[start]), int(indptr[stop])
    block = sp.csr_matrix(
        (group["data"][lo:hi], group["indices"][lo:hi], indptr[start : stop + 1] - lo),
        shape=(stop - start, n_genes),
    )
    block.sort_indices()
    return block


def _chunks(indptr: np.ndarray, row_width: int) -> list[tuple[int, int]]:
    """Row ranges of at most ~_NONZEROS_PER_CHUNK non-zeros and output elements each."""
    n_rows = len(indptr) - 1
    max_rows = max(1, _NONZEROS_PER_CHUNK // max(1, row_width))
    chunks, start = [], 0
    while start < n_rows:
        stop = int(np.searchsorted(indptr, indptr[start] + _NONZEROS_PER_CHUNK, side="right")) - 1
        stop = min(n_rows, start + max_rows, max(stop, start + 1))
        chunks.append((start, stop))
        start = stop
    return chunks


def bin_h5ad(
    hvg_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    n_bins: int,
    include_zero_genes: bool = True,
    tie_mode: str = "random",
    seed: int = 0,
    n_threads: int = 1,
) -> dict:
    """Bin an HVG h5ad (the ``hvg`` stage output) into memory-mappable arrays.

    Reads ``X`` ([N, G] CSR, log1p-normalised) in row chunks and writes to ``out_dir``:
    ``values.npy`` [N, L], smallest unsigned dtype, bins 0..n_bins-1;
    ``gene_index.npy`` [N, L] gene index per token, -1 = padding (include_zero_genes
    false: each cell's non-zero genes in gene order, L = most non-zeros in a cell),
    or [1, G] (include_zero_genes true: L = G, every cell has every gene);
    ``edges.npy`` [N, n_bins-1] float32; ``expression_{indptr,slot,data}.npy``, the log1p
    value of each token (0 for zeros and padding; what expression-space metrics score against)
    as a CSR over the token grid (:class:`evoformer.data.arrays.TokenExpression`: the HVG
    matrix's stored values at their token positions, exact float32);
    ``cells.tsv`` (cell_id[, label]);
    ``genes.tsv`` (gene_id); ``meta.json``. Each file is written atomically.
    Returns the meta.json content.
    """
    check_n_bins(n_bins)
    _check_tie_mode(tie_mode)
    hvg_path, out_dir = Path(hvg_path), Path(out_dir)
    if not hvg_path.is_file():
        raise InputError(f"{hvg_path}: file not found")
    with h5py.File(hvg_path, "r") as f:
        obs, var = read_h5_elem(f["obs"]), read_h5_elem(f["var"])
        source = read_h5_elem(f["uns/hvg/source"]) if "uns/hvg/source" in f else None
        group = f["X"]
        if not isinstance(group, h5py.Group) or group.attrs.get("encoding-type") != "csr_matrix":
            raise InputError(f"{hvg_path}: X must be a CSR matrix (as the hvg stage writes it)")
        n_cells, n_genes = (int(v) for v in group.attrs["shape"])
        indptr = group["indptr"][:].astype(np.int64)
        per_cell = np.diff(indptr)
        if n_cells == 0 or n_genes == 0:
            raise InputError(f"{hvg_path}: no cells or no genes to bin")
        vdtype = values_dtype(n_bins)
        gdtype = gene_index_dtype(n_genes)
        max_len = n_genes if include_zero_genes else int(per_cell.max())
        rng = np.random.RandomState(seed) if tie_mode == "random" else None
        out_dir.mkdir(parents=True, exist_ok=True)
        index_shape = (1, n_genes) if include_zero_genes else (n_cells, max_len)
        nnz = int(indptr[-1])
        sdtype = slot_dtype(max_len)
        # Each output is written block by block through a file handle (npy_rows_writer), so the
        # process holds one chunk, not the outputs' pages; all appear together at the end.
        with contextlib.ExitStack() as stack:
            out = {
                name: stack.enter_context(npy_rows_writer(out_dir / name, shape, dtype))
                for name, shape, dtype in (
                    ("values.npy", (n_cells, max_len), vdtype),
                    ("gene_index.npy", index_shape, gdtype),
                    ("edges.npy", (n_cells, n_bins - 1), np.float32),
                    ("expression_indptr.npy", (n_cells + 1,), np.int64),
                    ("expression_slot.npy", (nnz,), sdtype),
                    ("expression_data.npy", (nnz,), np.float32),
                )
            }
            out["expression_indptr.npy"](indptr)
            if include_zero_genes:
                out["gene_index.npy"](np.arange(n_genes)[None, :])
            for start, stop in _chunks(indptr, max_len):
                block = _read_csr_rows(group, indptr, start, stop, n_genes)
                if block.nnz and (not np.isfinite(block.data).all() or block.data.min() < 0):
                    raise InputError(
                        f"{hvg_path}: X has negative or non-finite values (cells {start}..{stop - 1})"
                    )
                bins, cell_edges = bin_csr_rows(block, n_bins, tie_mode, rng, n_threads=n_threads)
                out["edges.npy"](cell_edges)
                rows = np.repeat(np.arange(stop - start), np.diff(block.indptr))
                cols = (
                    block.indices
                    if include_zero_genes
                    else np.arange(block.nnz) - block.indptr[:-1][rows]
                )
                chunk = np.zeros((stop - start, max_len), dtype=vdtype)
                chunk[rows, cols] = bins
                out["values.npy"](chunk)
                # the stored entries in CSR order, at their token positions (no dense copy)
                out["expression_slot.npy"](cols)
                out["expression_data.npy"](block.data)
                if not include_zero_genes:
                    chunk_index = np.full((stop - start, max_len), -1, dtype=gdtype)
                    chunk_index[rows, cols] = block.indices
                    out["gene_index.npy"](chunk_index)

    cells = pd.DataFrame({"cell_id": obs.index.astype(str)})
    if "label" in obs.columns:
        cells["label"] = obs["label"].astype(str).to_numpy()
    with atomic_path(out_dir / "cells.tsv") as tmp:
        cells.to_csv(tmp, sep="\t", index=False)
    with atomic_path(out_dir / "genes.tsv") as tmp:
        pd.DataFrame({"gene_id": var.index.astype(str)}).to_csv(tmp, sep="\t", index=False)
    meta = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_bins": n_bins,
        "include_zero_genes": bool(include_zero_genes),
        "max_len": max_len,
        "dtype": vdtype.name,
        "gene_index_dtype": gdtype.name,
        "tie_mode": tie_mode,
        "seed": seed,
        "n_empty_cells": int((per_cell == 0).sum()),
        "mean_nonzeros_per_cell": round(float(per_cell.mean()), 3),
        "source": {"hvg": str(hvg_path), "dataset": None if source is None else str(source)},
    }
    write_text_atomic(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    log.info(
        "binned %d cells x %d genes into %d bins: values [%d, %d] %s, tie_mode %s",
        n_cells,
        n_genes,
        n_bins,
        n_cells,
        max_len,
        vdtype.name,
        tie_mode,
    )
    return meta
