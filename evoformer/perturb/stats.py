"""Per-group means and variances of an HVG h5ad, streamed over row chunks.

Every perturbation statistic (condition means, DE scores, baselines, metrics) needs only each
group's number of cells, per-gene mean and per-gene variance: :func:`group_stats` reads ``X``
([N, G] CSR, the ``hvg`` stage output) in row chunks and accumulates, per group, the float64
sums and sums of squares of every gene. Memory: two ``[K, G]`` float64 accumulators plus one
chunk; never a dense ``[N, G]``.

Variance convention (scanpy's ``_get_mean_var``, used by ``rank_genes_groups``): the unbiased
estimator ``(sum x^2 - n mean^2) / (n - 1)``, 0 for a group of one cell, NaN for an empty group;
rounding below 0 is clipped to 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from evoformer.data.binning import _chunks, _read_csr_rows
from evoformer.data.datasets import open_h5ad, read_h5_elem
from evoformer.errors import InputError


@dataclass
class GroupStats:
    """Per-group cell counts, means and variances over the genes (float64).

    Attributes:
        names: ``[K]`` group names.
        n: ``[K]`` cells per group (int64).
        mean: ``[K, G]`` per-gene means (NaN for an empty group).
        var: ``[K, G]`` per-gene unbiased variances (module docstring).
    """

    names: list[str]
    n: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    def index(self, name: str) -> int:
        """Row of group ``name`` (KeyError naming it when absent)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"group {name!r} not in the statistics") from None

    @classmethod
    def from_sums(
        cls, names: list[str], n: np.ndarray, sums: np.ndarray, squares: np.ndarray
    ) -> GroupStats:
        """From counts ``[K]``, sums ``[K, G]`` and sums of squares ``[K, G]``."""
        n = np.asarray(n, np.int64)
        nf = n.astype(np.float64)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums / nf
            var = np.where(nf > 1, (squares - nf * mean * mean) / np.maximum(nf - 1, 1), 0.0)
        var = np.where(nf > 0, np.maximum(var, 0.0), np.nan)
        return cls(list(names), n, mean, var)

    @classmethod
    def from_dense(cls, x: np.ndarray, labels: np.ndarray, names: list[str]) -> GroupStats:
        """Exact statistics of a dense ``x [N, G]`` (reference for tests and small data)."""
        x = np.asarray(x, np.float64)
        labels = np.asarray(labels)
        k = len(names)
        n = np.array([(labels == i).sum() for i in range(k)], np.int64)
        sums = np.stack([x[labels == i].sum(0) for i in range(k)]) if k else np.zeros((0, 0))
        squares = np.stack([(x[labels == i] ** 2).sum(0) for i in range(k)]) if k else sums
        return cls.from_sums(names, n, sums, squares)


def group_stats(
    path: str | os.PathLike,
    labels: np.ndarray,
    names: list[str],
    rows_per_chunk: int | None = None,
) -> GroupStats:
    """Stream ``X`` of an h5ad and accumulate per-group statistics.

    Args:
        path: the h5ad; ``X`` must be CSR (as the ``hvg`` stage writes it).
        labels: ``[N]`` group index of every row, ``-1`` = skip the row.
        names: ``[K]`` group names (``labels`` take values in ``-1..K-1``).
        rows_per_chunk: fixed chunk height (tests); default: chunks of about 8M non-zeros
            (:func:`evoformer.data.binning._chunks`).

    Returns:
        :class:`GroupStats` over ``K`` groups and the file's ``G`` genes.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    labels = np.asarray(labels, np.int64)
    k = len(names)
    with h5py.File(path, "r") as f:
        group = f.get("X")
        if not isinstance(group, h5py.Group) or group.attrs.get("encoding-type") != "csr_matrix":
            raise InputError(f"{path}: X must be a CSR matrix (as the hvg stage writes it)")
        n_cells, n_genes = (int(v) for v in group.attrs["shape"])
        if labels.shape != (n_cells,):
            raise InputError(f"{path}: {n_cells} cells, but {labels.shape[0]} group labels")
        if labels.size and (labels.min() < -1 or labels.max() >= k):
            raise InputError(f"{path}: group labels outside -1..{k - 1}")
        indptr = group["indptr"][:].astype(np.int64)
        sums = np.zeros((k, n_genes))
        squares = np.zeros((k, n_genes))
        counts = np.bincount(labels[labels >= 0], minlength=k).astype(np.int64)
        if rows_per_chunk is None:
            chunks = _chunks(indptr, n_genes)
        else:
            starts = range(0, n_cells, max(1, rows_per_chunk))
            chunks = [(s, min(n_cells, s + rows_per_chunk)) for s in starts]
        for start, stop in chunks:
            lab = labels[start:stop]
            keep = np.flatnonzero(lab >= 0)
            if keep.size == 0:
                continue
            block = _read_csr_rows(group, indptr, start, stop, n_genes).astype(np.float64)
            if block.nnz and not np.isfinite(block.data).all():
                raise InputError(f"{path}: X has non-finite values (cells {start}..{stop - 1})")
            # [K, rows] indicator of the kept rows' groups, times the block: per-group sums
            member = sp.csr_matrix((np.ones(keep.size), (lab[keep], keep)), shape=(k, stop - start))
            sums += (member @ block).toarray()
            squares += (member @ block.multiply(block)).toarray()
    return GroupStats.from_sums(names, counts, sums, squares)


#: The hvg.h5ad obs column holding each cell's canonical condition (written by the hvg stage).
CONDITION_KEY = "condition"


def read_hvg_obs(path: str | os.PathLike) -> tuple[list[str], list[str], list[str]]:
    """``(cell ids [N], conditions [N], genes [G])`` of an HVG h5ad (no expression read)."""
    path = Path(path)
    with open_h5ad(path) as f:
        obs, var = read_h5_elem(f["obs"]), read_h5_elem(f["var"])
    if CONDITION_KEY not in obs.columns:
        raise InputError(f"{path}: obs has no {CONDITION_KEY!r} column")
    cells = obs.index.astype(str).tolist()
    conditions = obs[CONDITION_KEY].astype(str).tolist()
    genes = var.index.astype(str).tolist()
    if len(set(genes)) != len(genes):
        raise InputError(f"{path}: duplicate gene symbols in var")
    if len(set(cells)) != len(cells):
        raise InputError(f"{path}: duplicate cell ids in obs")
    return cells, conditions, genes


#: The hvg.h5ad obs column of each cell's perturbation type (written by the hvg stage; empty
#: for control cells).
TYPE_KEY = "perturbation_type"


def read_hvg_types(path: str | os.PathLike) -> pd.Series:
    """Each cell's perturbation type (:data:`evoformer.perturb.layouts.TYPES`; NaN for
    controls), indexed by cell id, from an HVG h5ad."""
    path = Path(path)
    with open_h5ad(path) as f:
        obs = read_h5_elem(f["obs"])
    if TYPE_KEY not in obs.columns:
        raise InputError(f"{path}: obs has no {TYPE_KEY!r} column")
    types = obs[TYPE_KEY]
    return pd.Series(types.to_numpy(dtype=object), index=obs.index.astype(str), name=TYPE_KEY)
