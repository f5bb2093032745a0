"""Read the binned arrays (the ``bin`` stage output) without loading the h5ad.

Training ranks open the same folder; the arrays are memory-mapped, so each rank pages
in only the cells it reads and all ranks share the page cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evoformer.errors import InputError
from evoformer.io import atomic_path

# The log1p value behind every token, as a CSR over the [N, L] token grid (TokenExpression).
EXPRESSION_FILES = ("expression_indptr.npy", "expression_slot.npy", "expression_data.npy")
BINNED_FILES = (
    "values.npy",
    "gene_index.npy",
    "edges.npy",
    *EXPRESSION_FILES,
    "cells.tsv",
    "genes.tsv",
    "meta.json",
)


def slot_dtype(length: int) -> np.dtype:
    """Smallest unsigned dtype holding token positions ``0 .. length-1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if length - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


class TokenExpression:
    """The log1p-normalised value behind each token of ``values`` [N, L], stored sparsely.

    Only the stored entries of the HVG matrix (its non-zeros) have a value; every other token
    (a zero gene, padding) is 0. Three memory-mapped arrays, a CSR over the token grid:
    ``indptr`` [N+1] int64, ``slot`` [nnz] unsigned (the token position of each entry in its
    cell's row of ``values``) and ``data`` [nnz] float32 (the value, exactly as in the HVG
    matrix: no precision is lost). On disk that is 4 + ``slot`` itemsize (1-4) bytes per
    non-zero and 8 bytes per cell, against 4 bytes per token of a dense [N, L] float32 array
    (e.g. 0.5 GiB instead of 8 GB for 1M cells x 2,000 HVGs at 4.4% non-zero).

    ``expr[rows]`` gives the dense [len(rows), L] float32 rows (rows: an int, a slice or an
    array of row indices, in any order); ``np.asarray(expr)`` the whole [N, L] (small data).
    """

    def __init__(self, indptr: np.ndarray, slot: np.ndarray, data: np.ndarray, length: int):
        self.indptr, self.slot, self.data, self.length = indptr, slot, data, int(length)

    @classmethod
    def open(cls, folder: str | os.PathLike, length: int) -> TokenExpression:
        folder = Path(folder)
        arrays = [np.load(folder / name, mmap_mode="r") for name in EXPRESSION_FILES]
        return cls(*arrays, length=length)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.indptr) - 1, self.length)

    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, rows: int | slice | np.ndarray | list[int]) -> np.ndarray:
        """Dense rows: [len(rows), L] float32 ([L] for an int). Rows index as on a dense
        array: negative from the end, a bool [N] mask selects; out of range raises IndexError."""
        if isinstance(rows, (int, np.integer)):
            return self[np.asarray([rows])][0]
        n = len(self)
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(n))
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"boolean index of shape {rows.shape} for {n} rows")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).ravel()
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        rows = np.where(rows < 0, rows + n, rows)
        start, stop = self.indptr[rows], self.indptr[rows + 1]
        counts = stop - start
        out = np.zeros((len(rows), self.length), dtype=np.float32)
        if counts.sum() == 0:
            return out
        # the entries of every requested row, in row order: start[i] + 0 .. counts[i]-1
        owner = np.repeat(np.arange(len(rows)), counts)
        offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        entries = np.repeat(start, counts) + offset
        order = np.argsort(entries, kind="stable")  # ascending reads from the memory map
        taken = np.empty(len(entries), dtype=np.int64)
        taken[order] = np.asarray(self.slot[entries[order]], dtype=np.int64)
        values = np.empty(len(entries), dtype=np.float32)
        values[order] = self.data[entries[order]]
        out[owner, taken] = values
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        dense = self[slice(None)]
        return dense if dtype is None else dense.astype(dtype)


def write_token_expression(folder: str | os.PathLike, expression: np.ndarray) -> None:
    """Write a dense [N, L] token-expression array as :class:`TokenExpression`'s files
    (small data: tests and synthetic folders; the ``bin`` stage streams them)."""
    folder = Path(folder)
    expression = np.asarray(expression, dtype=np.float32)
    rows, slots = np.nonzero(expression)
    indptr = np.zeros(len(expression) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(expression)), out=indptr[1:])
    arrays = (indptr, slots.astype(slot_dtype(expression.shape[1])), expression[rows, slots])
    for name, array in zip(EXPRESSION_FILES, arrays, strict=True):
        with atomic_path(folder / name) as tmp:
            np.save(tmp, array)


@dataclass(frozen=True)
class BinnedData:
    """A binned dataset folder.

    values: [N, L] unsigned ints, bins 0..n_bins-1 (0 = zero expression or padding).
    gene_index: [N, L] gene index per token, -1 = padding (include_zero_genes false),
        or [1, L] shared by every cell (include_zero_genes true; L = number of genes).
    edges: [N, n_bins-1] float32 per-cell bin edges.
    expression: [N, L] log1p-normalised value of each token (0 = zero or padding), stored
        sparsely (:class:`TokenExpression`; ``expression[rows]`` gives dense float32 rows).
    cells: DataFrame [N] (cell_id[, label]), row i = row i of values.
    genes: DataFrame [G] (gene_id), row g = gene index g.
    meta: the folder's meta.json.
    """

    folder: Path
    values: np.ndarray
    gene_index: np.ndarray
    edges: np.ndarray
    expression: TokenExpression
    cells: pd.DataFrame
    genes: pd.DataFrame
    meta: dict[str, Any]

    @classmethod
    def open(cls, folder: str | os.PathLike) -> BinnedData:
        """Memory-map a binned folder (read-only) and check that its files agree."""
        folder = Path(folder)
        missing = [name for name in BINNED_FILES if not (folder / name).is_file()]
        if missing:
            raise InputError(
                f"{folder}: not a binned dataset folder (missing {', '.join(missing)})"
            )
        meta = json.loads((folder / "meta.json").read_text())
        values = np.load(folder / "values.npy", mmap_mode="r")
        gene_index = np.load(folder / "gene_index.npy", mmap_mode="r")
        edges = np.load(folder / "edges.npy", mmap_mode="r")
        expression = TokenExpression.open(folder, meta["max_len"])
        cells = pd.read_csv(folder / "cells.tsv", sep="\t", dtype={"cell_id": str, "label": str})
        genes = pd.read_csv(folder / "genes.tsv", sep="\t", dtype={"gene_id": str})
        n, length = meta["n_cells"], meta["max_len"]
        expected = {
            "values.npy": (values.shape, (n, length)),
            "gene_index.npy": (gene_index.shape, (1 if meta["include_zero_genes"] else n, length)),
            "edges.npy": (edges.shape, (n, meta["n_bins"] - 1)),
            "expression_indptr.npy": (expression.indptr.shape, (n + 1,)),
            "expression_slot.npy": (expression.slot.shape, expression.data.shape),
            "expression_data.npy": (expression.data.shape, (int(expression.indptr[-1]),)),
            "cells.tsv": ((len(cells),), (n,)),
            "genes.tsv": ((len(genes),), (meta["n_genes"],)),
        }
        for name, (got, want) in expected.items():
            if tuple(got) != tuple(want):
                raise InputError(
                    f"{folder / name}: shape {tuple(got)} does not match meta.json {tuple(want)}"
                )
        return cls(folder, values, gene_index, edges, expression, cells, genes, meta)

    def __len__(self) -> int:
        return int(self.meta["n_cells"])

    @property
    def n_bins(self) -> int:
        return int(self.meta["n_bins"])

    @property
    def n_genes(self) -> int:
        return int(self.meta["n_genes"])

    def tokens(self, rows: np.ndarray | slice | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(gene_index [B, L] int64 with -1 = padding, values [B, L] int64) for cells ``rows``."""
        values = np.asarray(self.values[rows], dtype=np.int64)
        if self.meta["include_zero_genes"]:
            genes = np.broadcast_to(
                np.asarray(self.gene_index[0], dtype=np.int64), values.shape
            ).copy()
        else:
            genes = np.asarray(self.gene_index[rows], dtype=np.int64)
        return genes, values


def take_rows(array: Any, rows: np.ndarray, dtype: Any) -> np.ndarray:
    """``array[rows]`` as ``dtype`` (a memory-mapped ``.npy`` or :class:`TokenExpression`), read
    in ascending row order (kinder to the page cache) and returned in the order asked."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *array.shape[1:]), dtype)
    out[order] = np.asarray(array[rows[order]], dtype)
    return out
