"""Streamed HVG selection: scanpy's ``highly_variable_genes`` in passes over row chunks.

The in-memory path (:func:`evoformer.data.hvg.select_hvg_in_memory`) loads the whole
[N, G] matrix and runs ``sc.pp.filter_genes`` -> ``sc.pp.filter_cells`` ->
(counts: ``normalize_total(target_sum=1e4)`` + ``log1p``) -> ``highly_variable_genes``.
Here the matrix is read from disk in row chunks (:class:`ExpressionFiles`, one or several
.h5ad files) and only per-gene accumulators [T, G] (T = numba threads), the cells' masks
and counts [N] and one chunk are held:

pass 1  validate every value; per gene, the cells expressing it (``filter_genes``).
pass 2  per cell, the genes it expresses among the kept genes (``filter_cells``; the
        filters are local to a row once the kept genes are known), library size,
        normalise + log1p, and the per-gene sums behind the means and variances
        (seurat: of ``expm1`` of the log data; cell_ranger: of the log data;
        seurat_v3: of the counts).
pass 3  seurat_v3 only: the per-gene sums of the counts clipped at the loess fit.
pass 4  (:func:`write_hvg_h5ad`) the log1p-normalised selected genes, appended to the
        output file.

The arithmetic replicates scanpy 1.11 operation for operation so that the statistics are
bit-identical, hence the same genes and ranks (ties included):

- library sizes: a float64 sum per row stored as float32, divided by 1e4 in float32, the
  data divided by it in float32, ``log1p`` (and seurat's ``expm1``) in float32;
- means/variances (``_get_mean_var`` on CSR): row r of the filtered matrix goes to the
  partial sum r % T (T = ``numba.get_num_threads()``, scanpy's thread stride), values added
  as float64 and their squares computed in float32; partials summed in order; variance
  ``E[x^2] - E[x]^2`` scaled by n / (n - 1);
- seurat / cell_ranger: dispersion = var / mean (zero means set to 1e-12; seurat: log
  dispersion with zeros as NaN, log1p of the means), genes binned by mean (seurat: 20
  equal-width ``pd.cut`` bins; cell_ranger: the 10th, 15th, ..., 100th percentiles),
  normalised by the bin's mean and standard deviation (seurat; a one-gene bin gets 1) or
  median and MAD (cell_ranger); the ``n_top_genes``-th highest normalised dispersion is
  the cut-off (NaN last), ``dispersions_norm`` is stored as float32;
- seurat_v3: loess (scikit-misc, span 0.3, degree 2) of log10 variance on log10 mean of
  the non-constant genes, counts clipped at ``sqrt(N) * reg_std + mean`` summed in cell
  order, normalised variance ranked by a double argsort;
- ``hvg_rank``: 1 = highest score (float32 ``dispersions_norm`` or ``variances_norm``),
  ties in input gene order.

The result depends on T exactly as scanpy's does (float summation order).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import h5py
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import norm

from evoformer.data.datasets import DatasetSpec, ExpressionFiles, read_h5_elem
from evoformer.errors import InputError
from evoformer.io import atomic_path

log = logging.getLogger(__name__)

FLAVORS = ("seurat", "cell_ranger", "seurat_v3")
TARGET_SUM = 1e4
SEURAT_BINS = 20  # scanpy's n_bins default (flavor seurat)
LOESS_SPAN = 0.3  # scanpy's span default (flavor seurat_v3)
# The loess fit needs span * genes >= degree + 1 points in a neighbourhood; scikit-misc
# crashes the process (not an exception) on a handful of points.
MIN_LOESS_GENES = 10
_MAD_SCALE = float(norm.ppf(0.75))  # statsmodels' mad: median(|a - median(a)| / 0.6745)


def score_column(flavor: str) -> str:
    """The genes-table column that ranks the HVGs of ``flavor``."""
    return "variances_norm" if flavor == "seurat_v3" else "dispersions_norm"


def check_hvg_args(spec: DatasetSpec, n_top_genes: int, flavor: str) -> None:
    """Raise InputError for an unknown flavor, seurat_v3 on log data or a bad n_hvg."""
    if flavor not in FLAVORS:
        raise InputError(f"hvg.flavor={flavor!r}: expected one of {', '.join(FLAVORS)}")
    if flavor == "seurat_v3" and spec.value_type != "counts":
        raise InputError(
            f"hvg.flavor=seurat_v3 ranks raw counts, but dataset '{spec.name}' has value_type "
            f"{spec.value_type}; use flavor seurat or cell_ranger"
        )
    if (
        isinstance(n_top_genes, bool)
        or not isinstance(n_top_genes, int | np.integer)
        or n_top_genes < 1
    ):
        raise InputError(f"n_hvg={n_top_genes!r}: expected a positive integer")


# ---------------------------------------------------------------- compiled kernels
@numba.njit(cache=True, nogil=True)
def _row_sums_f32(indptr, data, out):  # pragma: no cover - compiled
    """out[i] = float64 sum of row i's values, stored in out's dtype (float32)."""
    for i in range(indptr.shape[0] - 1):
        count = 0.0
        for j in range(indptr[i], indptr[i + 1]):
            count += data[j]
        out[i] = count


@numba.njit(cache=True, nogil=True)
def _add_mean_var(indptr, indices, data, first_row, sums, squares):  # pragma: no cover
    """Add rows first_row, first_row+1, ... (float32 data) to the partial sums [T, G]:
    row r into partial r % T; values as float64, squares computed in float32."""
    n_threads = sums.shape[0]
    for k in range(indptr.shape[0] - 1):
        t = (first_row + k) % n_threads
        for j in range(indptr[k], indptr[k + 1]):
            value = data[j]
            sums[t, indices[j]] += value
            squares[t, indices[j]] += value * value


@numba.njit(cache=True, parallel=True)
def _finish_mean_var(sums, squares, n_rows):  # pragma: no cover - compiled
    """Per-gene mean and biased variance [G] from the partial sums [T, G]."""
    n_genes = sums.shape[1]
    means = np.zeros(n_genes)
    variances = np.zeros(n_genes)
    for c in numba.prange(n_genes):
        total = sums[:, c].sum()
        means[c] = total / n_rows
        variances[c] = squares[:, c].sum() / n_rows - (total / n_rows) ** 2
    return means, variances


@numba.njit(cache=True, nogil=True)
def _add_clipped(indices, data, clip, sums, squares):  # pragma: no cover - compiled
    """Per-gene sums of min(value, clip[gene]) and of its square, in storage order."""
    for i in range(data.shape[0]):
        gene = indices[i]
        element = min(np.float64(data[i]), clip[gene])
        squares[gene] += element**2
        sums[gene] += element


# ---------------------------------------------------------------- per-chunk steps
def _normalise_log1p(x: sp.csr_matrix) -> sp.csr_matrix:
    """normalize_total(target_sum=1e4) + log1p of a float32 CSR block of counts, in place."""
    library = np.zeros(x.shape[0], dtype=np.float32)
    _row_sums_f32(x.indptr, x.data, library)
    scale = library / TARGET_SUM
    scale = scale + (scale == 0)
    x.data = x.data / np.repeat(scale, np.diff(x.indptr))
    np.log1p(x.data, out=x.data)
    return x


@dataclass
class _Filtered:
    """A chunk restricted to the kept genes and the kept cells."""

    x: sp.csr_matrix  # [kept cells of the chunk, kept genes] float32
    keep: np.ndarray  # [chunk cells] bool: cells kept by filter_cells
    n_genes: np.ndarray  # [chunk cells] genes expressed among the kept genes


def _filter_chunk(
    x: sp.csr_matrix,
    gene_index: np.ndarray | None,
    min_genes_per_cell: int,
    use: np.ndarray | None = None,
) -> _Filtered:
    """x [chunk cells, G] -> the kept genes and cells; use [chunk cells] bool: the cells the
    caller lets in at all (None: all)."""
    if gene_index is not None:
        x = x[:, gene_index]
        x.sort_indices()
    n_genes = np.diff(x.indptr)
    keep = n_genes >= min_genes_per_cell if min_genes_per_cell > 0 else np.ones(len(n_genes), bool)
    if use is not None:
        keep &= use
    if not keep.all():
        x = x[keep]
    return _Filtered(x, keep, n_genes)


# ---------------------------------------------------------------- statistics
def _mad(values: pd.Series) -> float:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return np.nan
    center = np.median(a, axis=0, keepdims=True)
    return float(np.median(np.abs(a - center) / _MAD_SCALE, axis=0))


def _dispersion_stats(
    mean: np.ndarray, var: np.ndarray, flavor: str, where: str
) -> tuple[pd.DataFrame, np.ndarray]:
    """seurat / cell_ranger: (means, dispersions, dispersions_norm float64) per gene."""
    mean = mean.copy()
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        if flavor == "seurat":
            dispersion[dispersion == 0] = np.nan
            dispersion = np.log(dispersion)
            mean = np.log1p(mean)
    table = pd.DataFrame({"means": mean, "dispersions": dispersion})
    if flavor == "seurat":
        bins: int | np.ndarray = SEURAT_BINS
    else:
        bins = np.r_[-np.inf, np.percentile(mean, np.arange(10, 105, 5)), np.inf]
        if np.unique(bins).size != bins.size:
            raise InputError(
                f"{where}: hvg.flavor=cell_ranger bins genes by the percentiles of their mean "
                f"expression, but {len(mean)} genes give equal percentiles (too few genes or "
                "too many with the same mean); use more genes, hvg.min_cells_per_gene or "
                "flavor seurat"
            )
    mean_bin = pd.cut(table["means"], bins=bins)
    grouped = table.groupby(mean_bin, observed=True)["dispersions"]
    if flavor == "seurat":
        stats = grouped.agg(avg="mean", dev="std")
        lone = stats["dev"].isnull()  # one gene in the bin: normalised dispersion 1
        stats.loc[lone, "dev"] = stats.loc[lone, "avg"]
        stats.loc[lone, "avg"] = 0
    else:
        stats = grouped.agg(avg="median", dev=_mad)
    per_gene = stats.loc[mean_bin].set_index(table.index)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm_disp = (table["dispersions"] - per_gene["avg"]) / per_gene["dev"]
    return table, norm_disp.to_numpy(dtype=np.float64)


def _top_by_dispersion(
    norm_disp: np.ndarray, n_top_genes: int, flavor: str, where: str
) -> np.ndarray:
    """scanpy's n_top_genes cut-off: genes at or above the n-th highest (NaN excluded)."""
    ranked = norm_disp[~np.isnan(norm_disp)]
    if ranked.size < n_top_genes:
        raise InputError(
            f"{where}: only {ranked.size} genes could be ranked by hvg.flavor={flavor}, "
            f"n_hvg={n_top_genes} asked for (too few cells or genes with a defined "
            "normalised dispersion)"
        )
    cutoff = np.sort(ranked)[::-1][n_top_genes - 1]
    selected = np.nan_to_num(norm_disp, nan=-np.inf) >= cutoff
    if selected.sum() != n_top_genes:
        raise InputError(
            f"{where}: {int(selected.sum())} genes tie at the n_hvg={n_top_genes} cut-off of "
            f"hvg.flavor={flavor} (normalised dispersion {cutoff:.6g}); choose another n_hvg "
            "or flavor"
        )
    return selected


def _loess_fit(mean: np.ndarray, var: np.ndarray, where: str) -> np.ndarray:
    """log10 variance fitted on log10 mean by loess, [G]; 0 for constant genes."""
    from skmisc.loess import loess

    not_const = var > 0
    if not_const.sum() < MIN_LOESS_GENES:
        raise InputError(
            f"{where}: hvg.flavor=seurat_v3 fits variance against mean over the genes that "
            f"vary, but only {int(not_const.sum())} do (needs {MIN_LOESS_GENES}); use more "
            "cells/genes or flavor seurat"
        )
    fitted = np.zeros(len(var), dtype=np.float64)
    model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=LOESS_SPAN, degree=2)
    try:
        model.fit()
    except ValueError as exc:
        raise InputError(
            f"{where}: hvg.flavor=seurat_v3: the loess fit of variance on mean failed over "
            f"{int(not_const.sum())} genes ({str(exc).strip()[:120]}); use more cells/genes "
            "or flavor seurat"
        ) from None
    fitted[not_const] = model.outputs.fitted_values
    return fitted


@dataclass
class HvgSelection:
    """What :func:`select_hvg_streamed` decided; :func:`write_hvg_h5ad` writes it out."""

    spec: DatasetSpec
    flavor: str
    n_top_genes: int
    min_cells_per_gene: int
    min_genes_per_cell: int
    genes: pd.DataFrame  # one row per kept gene: scanpy's statistics, highly_variable, hvg_rank
    gene_keep: np.ndarray  # [G] bool: genes kept by min_cells_per_gene (or always kept)
    cell_keep: np.ndarray  # [N] bool: cells used and kept by min_genes_per_cell
    n_genes_per_cell: np.ndarray  # [N] int64: kept genes each cell expresses
    cells: np.ndarray | None = None  # [N] bool: the cells the caller let in (None: all)
    n_added: int = 0  # always-kept genes added to the HVGs beyond the top n_top_genes

    @property
    def n_cells_used(self) -> int:
        """Cells the selection saw (all, or those of ``cells``)."""
        return len(self.cell_keep) if self.cells is None else int(self.cells.sum())

    @property
    def selected(self) -> np.ndarray:
        """[G] bool: the HVGs among all genes of the dataset."""
        out = np.zeros(len(self.gene_keep), dtype=bool)
        out[np.flatnonzero(self.gene_keep)] = self.genes["highly_variable"].to_numpy(bool)
        return out


def select_hvg_streamed(
    files: ExpressionFiles,
    n_top_genes: int,
    flavor: str = "seurat",
    min_cells_per_gene: int = 0,
    min_genes_per_cell: int = 0,
    cells: np.ndarray | None = None,
    always_keep: np.ndarray | None = None,
) -> HvgSelection:
    """Select the ``n_top_genes`` most variable genes of ``files`` without loading it.

    Same filters, order, statistics, genes and ranks as
    :func:`evoformer.data.hvg.select_hvg_in_memory` (scanpy in memory); peak memory is
    one row chunk plus [T, G] and [N] arrays. Raises InputError for bad values (pass 1
    validates every file), no cells left, cells without expression, n_hvg larger than
    the kept genes, and datasets too small for the flavor's statistics.

    cells: [N] bool, the only cells used (every statistic and filter as if the others were
    not in the files; None: all). always_keep: [G] bool, genes exempt from
    ``min_cells_per_gene`` and added to the HVGs when not among the top ``n_top_genes``
    (hvg_rank n_top_genes + 1, ... by score, NaN last); the genes table then has a column
    ``perturbed`` marking them. Both None: exactly scanpy's selection.
    """
    spec = files.spec
    where = f"dataset '{spec.name}'"
    check_hvg_args(spec, n_top_genes, flavor)
    n_cells, n_genes = files.n_cells, files.n_genes
    if cells is not None and cells.shape != (n_cells,):
        raise ValueError(f"cells: expected [{n_cells}] bool, got {cells.shape}")
    if always_keep is not None and always_keep.shape != (n_genes,):
        raise ValueError(f"always_keep: expected [{n_genes}] bool, got {always_keep.shape}")

    # pass 1: validation; cells expressing each gene
    gene_cells = np.zeros(n_genes, dtype=np.int64)
    for chunk in files.chunks(validate=True):
        x = chunk.x if cells is None else chunk.x[cells[chunk.start : chunk.stop]]
        gene_cells += np.bincount(x.indices, minlength=n_genes)
    gene_keep = (
        gene_cells >= min_cells_per_gene if min_cells_per_gene > 0 else np.ones(n_genes, bool)
    )
    if always_keep is not None:
        exempt = int((always_keep & ~gene_keep).sum())
        gene_keep = gene_keep | always_keep
        if exempt:
            log.info(
                "%s: %d perturbed genes expressed in fewer than %d cells kept all the same",
                where,
                exempt,
                min_cells_per_gene,
            )
    n_kept_genes = int(gene_keep.sum())
    if min_cells_per_gene > 0:
        log.info(
            "%s: %d genes expressed in fewer than %d cells dropped",
            where,
            n_genes - n_kept_genes,
            min_cells_per_gene,
        )
    if n_top_genes > n_kept_genes:
        raise InputError(
            f"n_hvg={n_top_genes} is larger than the {n_kept_genes} genes of {where}"
            + (
                f" left after hvg.min_cells_per_gene={min_cells_per_gene}"
                if min_cells_per_gene
                else ""
            )
        )
    if n_kept_genes < 2:
        raise InputError(
            f"{where}: 1 gene"
            + (
                f" left after hvg.min_cells_per_gene={min_cells_per_gene}"
                if min_cells_per_gene
                else ""
            )
            + "; HVG selection ranks genes against each other and needs at least 2"
        )
    gene_index = None if gene_keep.all() else np.flatnonzero(gene_keep)

    # pass 2: cell filter, library sizes, normalisation, per-gene sums
    n_threads = numba.get_num_threads()
    sums = np.zeros((n_threads, n_kept_genes))
    squares = np.zeros((n_threads, n_kept_genes))
    cell_keep = np.zeros(n_cells, dtype=bool)
    n_genes_per_cell = np.zeros(n_cells, dtype=np.int64)
    n_rows = 0
    n_empty, first_empty = 0, None
    for chunk in files.chunks():
        use = None if cells is None else cells[chunk.start : chunk.stop]
        part = _filter_chunk(chunk.x, gene_index, min_genes_per_cell, use)
        cell_keep[chunk.start : chunk.stop] = part.keep
        n_genes_per_cell[chunk.start : chunk.stop] = part.n_genes
        empty = np.diff(part.x.indptr) == 0
        if empty.any():
            if first_empty is None:
                first_empty = chunk.start + int(np.flatnonzero(part.keep)[np.argmax(empty)])
            n_empty += int(empty.sum())
        if n_empty:  # an error below: skip the arithmetic, keep counting
            continue
        x = part.x
        if spec.value_type == "counts" and flavor != "seurat_v3":
            x = _normalise_log1p(x)
        if flavor == "seurat":
            x = x.copy()
            x.data = np.expm1(x.data)
        _add_mean_var(x.indptr, x.indices, x.data, n_rows, sums, squares)
        n_rows += x.shape[0]
    n_kept_cells = int(cell_keep.sum())
    if n_kept_cells == 0:
        raise InputError(
            f"{where}: no cells left after hvg.min_genes_per_cell={min_genes_per_cell}"
        )
    if n_empty:
        raise InputError(
            f"{where}: {n_empty} cells have no expression (e.g. {files.cell_ids[first_empty]!r}); "
            "drop them or set hvg.min_genes_per_cell: 1"
        )
    if n_kept_cells < 2:
        raise InputError(
            f"{where}: {n_kept_cells} cell left for HVG selection; gene variances need at least 2"
        )
    mean, var = _finish_mean_var(sums, squares, n_kept_cells)
    var *= n_kept_cells / (n_kept_cells - 1)
    del sums, squares

    var_table = pd.DataFrame(index=pd.Index(files.gene_ids[gene_keep], name="gene_id"))
    if min_cells_per_gene > 0:
        var_table["n_cells"] = gene_cells[gene_keep]
    if flavor == "seurat_v3":
        selected, columns = _seurat_v3(
            files, mean, var, gene_index, cell_keep, n_kept_cells, n_top_genes, where
        )
    else:
        table, norm_disp = _dispersion_stats(mean, var, flavor, where)
        selected = _top_by_dispersion(norm_disp, n_top_genes, flavor, where)
        columns = {
            "highly_variable": selected,
            "means": table["means"].to_numpy(),
            "dispersions": table["dispersions"].to_numpy(),
            "dispersions_norm": norm_disp.astype(np.float32),
        }
    for name, values in columns.items():
        var_table[name] = values
    score = var_table[score_column(flavor)].to_numpy(dtype=float)
    rank = pd.Series(np.where(selected, score, -np.inf), index=var_table.index).rank(
        ascending=False, method="first"
    )
    var_table["hvg_rank"] = np.where(selected, rank.to_numpy(), 0).astype(int)
    n_added = 0
    if always_keep is not None:
        forced = always_keep[gene_keep]
        added = forced & ~selected
        n_added = int(added.sum())
        extra = pd.Series(np.where(added, np.nan_to_num(score, nan=-np.inf), -np.inf)).rank(
            ascending=False, method="first"
        )
        var_table["highly_variable"] = selected | forced
        var_table.loc[added, "hvg_rank"] = n_top_genes + extra.to_numpy()[added].astype(int)
        var_table["perturbed"] = forced
    return HvgSelection(
        spec=spec,
        flavor=flavor,
        n_top_genes=int(n_top_genes),
        min_cells_per_gene=int(min_cells_per_gene),
        min_genes_per_cell=int(min_genes_per_cell),
        genes=var_table,
        gene_keep=gene_keep,
        cell_keep=cell_keep,
        n_genes_per_cell=n_genes_per_cell,
        cells=cells,
        n_added=n_added,
    )


def _seurat_v3(
    files: ExpressionFiles,
    mean: np.ndarray,
    var: np.ndarray,
    gene_index: np.ndarray | None,
    cell_keep: np.ndarray,
    n_obs: int,
    n_top_genes: int,
    where: str,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Normalised variance of the counts (pass 3) and the top n_top_genes by it."""
    reg_std = np.sqrt(10 ** _loess_fit(mean, var, where))
    clip = reg_std * np.sqrt(n_obs) + mean
    clipped_sums = np.zeros(len(mean))
    clipped_squares = np.zeros(len(mean))
    for chunk in files.chunks():
        x = chunk.x
        if gene_index is not None:
            x = x[:, gene_index]
        x = x[cell_keep[chunk.start : chunk.stop]]
        _add_clipped(x.indices, x.data, clip, clipped_sums, clipped_squares)
    norm_var = (1 / ((n_obs - 1) * np.square(reg_std))) * (
        (n_obs * np.square(mean)) + clipped_squares - 2 * clipped_sums * mean
    )
    ranks = np.argsort(np.argsort(-norm_var.reshape(1, -1), axis=1), axis=1)[0]
    selected = ranks < n_top_genes
    hv_rank = np.where(selected, ranks, np.nan).astype(np.float32)
    return selected, {
        "highly_variable": selected,
        "highly_variable_rank": hv_rank,
        "means": mean,
        "variances": var,
        "variances_norm": norm_var.astype(np.float64),
    }


# ---------------------------------------------------------------- writing the HVG subset
def _write_elem(group: h5py.Group, key: str, value: object) -> None:
    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem
    write_elem(group, key, value)


def write_hvg_h5ad(
    files: ExpressionFiles,
    selection: HvgSelection,
    out: str | os.PathLike,
    source: str,
    obs_columns: pd.DataFrame | None = None,
    uns_hvg: dict[str, int] | None = None,
) -> tuple[int, int]:
    """Write the HVG subset (pass 4) as an .h5ad, atomically; returns (cells, cells empty).

    X: [cells, n_hvg] float32 CSR, the log1p-normalised values of the selected genes
    (the top n_top_genes and any always-kept ones) in the dataset's gene order, appended
    chunk by chunk; cells not used, dropped by the filters or without expression in the
    HVGs are left out (the latter logged). obs: label (when the dataset has one),
    source_file (several files), n_genes (with hvg.min_genes_per_cell), then the columns of
    ``obs_columns`` ([N] rows in dataset order); var: the genes table's rows of the HVGs
    without hvg_rank; uns: hvg (settings, counts, source, and ``uns_hvg``) and, for counts,
    log1p -- the layout ``AnnData.write_h5ad`` gives.
    """
    spec = files.spec
    where = f"dataset '{spec.name}'"
    obs = files.cells()
    gene_index = None if selection.gene_keep.all() else np.flatnonzero(selection.gene_keep)
    hvg_cols = np.flatnonzero(selection.genes["highly_variable"].to_numpy(bool))
    n_top = len(hvg_cols)
    written = np.zeros(files.n_cells, dtype=bool)
    indptr_parts = [np.zeros(1, dtype=np.int64)]
    nnz = 0
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        group = f.create_group("X")
        step = 1 << 18
        # index dtype as scipy picks it: int64 (indices and indptr) when the non-zeros may
        # not fit int32; their upper bound: each kept cell's expressed genes, at most n_top
        bound = np.minimum(selection.n_genes_per_cell[selection.cell_keep], n_top).sum()
        index_dtype = np.int32 if bound < np.iinfo(np.int32).max else np.int64
        data = group.create_dataset("data", (0,), maxshape=(None,), dtype="f4", chunks=(step,))
        indices = group.create_dataset(
            "indices", (0,), maxshape=(None,), dtype=index_dtype, chunks=(step,)
        )
        for chunk in files.chunks():
            use = None if selection.cells is None else selection.cells[chunk.start : chunk.stop]
            part = _filter_chunk(chunk.x, gene_index, selection.min_genes_per_cell, use)
            x = part.x
            if spec.value_type == "counts":
                x = _normalise_log1p(x)
            x = x[:, hvg_cols].astype(np.float32).tocsr()
            x.sort_indices()
            has_expr = np.diff(x.indptr) > 0
            if not has_expr.all():
                x = x[has_expr]
            rows = np.flatnonzero(part.keep)[has_expr] + chunk.start
            written[rows] = True
            data.resize((nnz + x.nnz,))
            indices.resize((nnz + x.nnz,))
            data[nnz:] = x.data
            indices[nnz:] = x.indices
            indptr_parts.append(x.indptr[1:].astype(np.int64) + nnz)
            nnz += x.nnz
        group.create_dataset("indptr", data=np.concatenate(indptr_parts).astype(index_dtype))
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([int(written.sum()), n_top], dtype=np.int64)

        n_kept = int(selection.cell_keep.sum())
        n_empty = n_kept - int(written.sum())
        if n_empty:
            log.warning(
                "%s: dropping %d cells with no expression in the %d HVGs", where, n_empty, n_top
            )
        if selection.min_genes_per_cell > 0:
            obs["n_genes"] = selection.n_genes_per_cell
        if obs_columns is not None:
            for column in obs_columns.columns:
                obs[column] = obs_columns[column].array
        obs = obs[written]
        for column in obs.columns:  # as AnnData subsetting does
            if isinstance(obs[column].dtype, pd.CategoricalDtype):
                obs[column] = obs[column].cat.remove_unused_categories()
        _write_elem(f, "obs", obs)
        var = selection.genes.drop(columns=["hvg_rank"]).iloc[hvg_cols]
        _write_elem(f, "var", var)
        uns: dict[str, object] = {
            "hvg": {
                "dataset": spec.name,
                "value_type": spec.value_type,
                "flavor": selection.flavor,
                "n_top_genes": selection.n_top_genes,
                "min_cells_per_gene": selection.min_cells_per_gene,
                "min_genes_per_cell": selection.min_genes_per_cell,
                "n_cells_input": int(files.n_cells),
                "n_cells_filtered": int(selection.n_cells_used - n_kept),
                "n_cells_empty_in_hvgs": n_empty,
                "source": source,
                **(uns_hvg or {}),
            }
        }
        if spec.value_type == "counts":
            uns["log1p"] = {"base": None}
        _write_elem(f, "uns", uns)
        for key in ("layers", "obsm", "obsp", "varm", "varp"):
            _write_elem(f, key, {})
    return int(written.sum()), n_empty


def read_hvg_source(path: str | os.PathLike) -> str | None:
    """``uns/hvg/source`` of an HVG .h5ad (the dataset file(s) it came from)."""
    with h5py.File(path, "r") as f:
        return str(read_h5_elem(f["uns/hvg/source"])) if "uns/hvg/source" in f else None
