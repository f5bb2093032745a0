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
memory). Within a chunk, cells are grouped by their number of non-zeros; each group's
non-zeros are padded into one [cells, width] block and sorted row-wise by numpy (a
vectorised SIMD sort), and a compiled numba kernel replays numpy's quantile
interpolation and the digitisation element by element (a few nanoseconds per value).
With ``n_threads`` > 1 the groups run in parallel and the uniforms are drawn while the
groups sort; the result does not depend on the number of threads or the chunking.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from evoformer.data.datasets import read_h5_elem
from evoformer.errors import InputError
from evoformer.io import atomic_path, write_text_atomic

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


@numba.njit(cache=True, nogil=True)
def _bin_sorted_rows(
    indptr, data, cells, sorted_rows, q, u, deterministic, up, bins, edges
):  # pragma: no cover - compiled
    """Edges and bins for the rows ``cells``; writes bins[nnz] and edges[C, m] in place.

    sorted_rows[j, :n]: row cells[j]'s non-zeros ascending. q: [m] linspace(0, 1, m).
    u: [nnz] uniforms aligned with data (unused when deterministic).
    up: work array in the data dtype, length a multiple of 16 >= m, filled with +inf.

    Edges replay numpy's "linear" quantile exactly: virtual index (n-1)*q, neighbours
    floor / floor+1 (the last value at or past the end) and numpy's two-sided lerp,
    with the difference taken in the data dtype and the rest in float64.
    ``left`` = #edges <= x (np.digitize) is counted against ``up``, the edges rounded up
    to the data dtype (for float32 x: e <= x iff up(e) <= x), which vectorises; ``right``
    = #edges < x differs from it only when x equals an edge, and is then the index of
    the first edge of that run of equal edges.
    """
    m = q.shape[0]
    pad = up[up.shape[0] - 1]  # +inf in the data dtype
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
                gamma = v - p
                a = s[p]
                b = s[p + 1]
                diff = b - a
                if gamma >= 0.5:
                    e[k] = b - diff * (1 - gamma)
                else:
                    e[k] = a + diff * gamma
            up[k] = e[k]
            if up[k] < e[k]:
                up[k] = np.nextafter(up[k], pad)
            below[k + 1] = below[k] if k > 0 and e[k] == e[k - 1] else k
        for i in range(lo, lo + n):
            x = data[i]
            left = 0
            for k in range(up.shape[0]):
                left += up[k] <= x
            if left > 0 and e[left - 1] == x:
                right = below[left]
                if deterministic:
                    bins[i] = (right + left + 2) // 2
                else:
                    bins[i] = np.int64(np.ceil(u[i] * (right - left) + left))
            else:
                bins[i] = left


# Cells binned together in one padded [cells, width] block; cells are grouped by their
# number of non-zeros, so a block's width (its longest cell) wastes little padding.
_CELLS_PER_GROUP = 512


def bin_csr_rows(
    x: sp.csr_matrix,
    n_bins: int,
    tie_mode: str = "random",
    rng: np.random.RandomState | None = None,
    n_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Bin the non-zeros of a block of cells.

    x: [C, G] CSR with sorted indices, non-negative float32/float64 values.
    rng: the RandomState stream (``tie_mode="random"``); it advances by ``x.nnz`` draws,
        so consecutive blocks continue one stream exactly as a per-cell loop would.
    n_threads: groups of cells processed in parallel (the result does not depend on it).
    Returns (bins, edges): bins [nnz] int64 aligned with ``x.data`` (values 1..n_bins-1),
    edges [C, n_bins-1] float64 (all zero for a row without non-zeros).
    """
    if not x.has_sorted_indices:
        raise ValueError("bin_csr_rows needs a CSR block with sorted indices (x.sort_indices())")
    check_n_bins(n_bins)
    _check_tie_mode(tie_mode)
    m = n_bins - 1
    q = np.linspace(0, 1, m)
    indptr = x.indptr.astype(np.int64)
    data = x.data if x.data.dtype in (np.float32, np.float64) else x.data.astype(np.float64)
    n = np.diff(indptr)
    edges = np.zeros((x.shape[0], m), dtype=np.float64)
    bins = np.empty(x.nnz, dtype=np.int64)
    if tie_mode == "random" and rng is None:
        raise ValueError("tie_mode='random' needs an rng")
    order = np.argsort(n, kind="stable")
    order = order[n[order] > 0]
    groups = [order[g : g + _CELLS_PER_GROUP] for g in range(0, len(order), _CELLS_PER_GROUP)]
    deterministic = tie_mode == "deterministic"

    def sort_group(cells: np.ndarray) -> np.ndarray:
        padded = np.empty((len(cells), int(n[cells[-1]])), dtype=data.dtype)
        _pad_rows(indptr, data, cells, padded)
        padded.sort(axis=1)
        return padded

    def bin_group(cells: np.ndarray, sorted_rows: np.ndarray, u: np.ndarray) -> None:
        up = np.full(-(-m // 16) * 16, np.inf, dtype=data.dtype)
        _bin_sorted_rows(indptr, data, cells, sorted_rows, q, u, deterministic, up, bins, edges)

    def draw() -> np.ndarray:
        return np.empty(0) if deterministic else rng.random_sample(x.nnz)

    if n_threads > 1:
        # the uniforms are drawn (GIL released) while the groups are sorted
        with ThreadPoolExecutor(n_threads) as pool:
            u_future = pool.submit(draw)
            sorted_groups = list(pool.map(sort_group, groups))
            u = u_future.result()
            list(pool.map(bin_group, groups, sorted_groups, [u] * len(groups)))
    else:
        u = draw()
        for cells in groups:
            bin_group(cells, sort_group(cells), u)
    return bins, edges


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
    ``edges.npy`` [N, n_bins-1] float32; ``expression.npy`` [N, L] float32, the log1p value
    of each token (0 for zeros and padding; what expression-space metrics score against);
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
        with contextlib.ExitStack() as stack:
            tmp_values = stack.enter_context(atomic_path(out_dir / "values.npy"))
            tmp_index = stack.enter_context(atomic_path(out_dir / "gene_index.npy"))
            tmp_edges = stack.enter_context(atomic_path(out_dir / "edges.npy"))
            tmp_expr = stack.enter_context(atomic_path(out_dir / "expression.npy"))
            open_memmap = np.lib.format.open_memmap
            values = open_memmap(tmp_values, mode="w+", dtype=vdtype, shape=(n_cells, max_len))
            expression = open_memmap(
                tmp_expr, mode="w+", dtype=np.float32, shape=(n_cells, max_len)
            )
            edges = open_memmap(tmp_edges, mode="w+", dtype=np.float32, shape=(n_cells, n_bins - 1))
            index_shape = (1, n_genes) if include_zero_genes else (n_cells, max_len)
            gene_index = open_memmap(tmp_index, mode="w+", dtype=gdtype, shape=index_shape)
            if include_zero_genes:
                gene_index[0] = np.arange(n_genes)
            for start, stop in _chunks(indptr, max_len):
                block = _read_csr_rows(group, indptr, start, stop, n_genes)
                if block.nnz and (not np.isfinite(block.data).all() or block.data.min() < 0):
                    raise InputError(
                        f"{hvg_path}: X has negative or non-finite values (cells {start}..{stop - 1})"
                    )
                bins, cell_edges = bin_csr_rows(block, n_bins, tie_mode, rng, n_threads=n_threads)
                edges[start:stop] = cell_edges
                rows = np.repeat(np.arange(stop - start), np.diff(block.indptr))
                cols = (
                    block.indices
                    if include_zero_genes
                    else np.arange(block.nnz) - block.indptr[:-1][rows]
                )
                chunk = np.zeros((stop - start, max_len), dtype=vdtype)
                chunk[rows, cols] = bins
                values[start:stop] = chunk
                chunk_expr = np.zeros((stop - start, max_len), dtype=np.float32)
                chunk_expr[rows, cols] = block.data
                expression[start:stop] = chunk_expr
                if not include_zero_genes:
                    slot = cols
                    chunk_index = np.full((stop - start, max_len), -1, dtype=gdtype)
                    chunk_index[rows, slot] = block.indices
                    gene_index[start:stop] = chunk_index
            for array in (values, gene_index, edges, expression):
                array.flush()
            del values, gene_index, edges, expression

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
