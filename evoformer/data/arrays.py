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

BINNED_FILES = (
    "values.npy",
    "gene_index.npy",
    "edges.npy",
    "expression.npy",
    "cells.tsv",
    "genes.tsv",
    "meta.json",
)


@dataclass(frozen=True)
class BinnedData:
    """A binned dataset folder.

    values: [N, L] unsigned ints, bins 0..n_bins-1 (0 = zero expression or padding).
    gene_index: [N, L] gene index per token, -1 = padding (include_zero_genes false),
        or [1, L] shared by every cell (include_zero_genes true; L = number of genes).
    edges: [N, n_bins-1] float32 per-cell bin edges.
    expression: [N, L] float32 log1p-normalised value of each token (0 = zero or padding).
    cells: DataFrame [N] (cell_id[, label]), row i = row i of values.
    genes: DataFrame [G] (gene_id), row g = gene index g.
    meta: the folder's meta.json.
    """

    folder: Path
    values: np.ndarray
    gene_index: np.ndarray
    edges: np.ndarray
    expression: np.ndarray
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
        expression = np.load(folder / "expression.npy", mmap_mode="r")
        cells = pd.read_csv(folder / "cells.tsv", sep="\t", dtype={"cell_id": str, "label": str})
        genes = pd.read_csv(folder / "genes.tsv", sep="\t", dtype={"gene_id": str})
        n, length = meta["n_cells"], meta["max_len"]
        expected = {
            "values.npy": (values.shape, (n, length)),
            "gene_index.npy": (gene_index.shape, (1 if meta["include_zero_genes"] else n, length)),
            "edges.npy": (edges.shape, (n, meta["n_bins"] - 1)),
            "expression.npy": (expression.shape, (n, length)),
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
