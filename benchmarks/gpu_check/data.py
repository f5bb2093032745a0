"""A small synthetic binned dataset and its split, written as the pipeline writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_binned(folder: Path, n_cells: int, n_genes: int, n_bins: int, seed: int = 0) -> None:
    """A binned folder as ``evoformer.data.binning.bin_h5ad`` writes it (include_zero_genes):
    values.npy [N, G] bins, gene_index.npy [1, G], edges.npy [N, n_bins-1] float32,
    the token expression (evoformer.data.arrays.write_token_expression), cells.tsv (cell_id, label), genes.tsv (gene_id), meta.json."""
    import pandas as pd

    from evoformer.data.arrays import write_token_expression
    from evoformer.io import atomic_path, write_text_atomic

    rng = np.random.default_rng(seed)
    vdtype = np.uint8 if n_bins <= 256 else np.uint16
    gdtype = np.int8 if n_genes <= 128 else np.int16
    values = rng.integers(1, n_bins, size=(n_cells, n_genes)).astype(vdtype)
    values[rng.random((n_cells, n_genes)) < 0.5] = 0  # zeros are bin 0
    edges = np.sort(rng.random((n_cells, n_bins - 1)).astype(np.float32) * 5, axis=1)
    # each token's value: its bin's lower edge (0 for zeros), as the metrics read it
    lower = np.concatenate([np.zeros((n_cells, 1), np.float32), edges], axis=1)
    expression = np.take_along_axis(lower, values.astype(np.int64), axis=1)
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (
        ("values.npy", values),
        ("gene_index.npy", np.arange(n_genes, dtype=gdtype)[None, :]),
        ("edges.npy", edges),
    ):
        with atomic_path(folder / name) as tmp:
            np.save(tmp, arr)
    write_token_expression(folder, expression)
    cells = pd.DataFrame(
        {
            "cell_id": [f"cell{i:05d}" for i in range(n_cells)],
            "label": [f"type{i % 3}" for i in range(n_cells)],
        }
    )
    with atomic_path(folder / "cells.tsv") as tmp:
        cells.to_csv(tmp, sep="\t", index=False)
    with atomic_path(folder / "genes.tsv") as tmp:
        pd.DataFrame({"gene_id": [f"gene{g:04d}" for g in range(n_genes)]}).to_csv(
            tmp, sep="\t", index=False
        )
    nnz = (values > 0).sum(axis=1)
    meta = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_bins": n_bins,
        "include_zero_genes": True,
        "max_len": n_genes,
        "dtype": np.dtype(vdtype).name,
        "gene_index_dtype": np.dtype(gdtype).name,
        "tie_mode": "random",
        "seed": seed,
        "n_empty_cells": int((nnz == 0).sum()),
        "mean_nonzeros_per_cell": round(float(nnz.mean()), 3),
        "source": {"hvg": "benchmarks/gpu_check (synthetic)", "dataset": None},
    }
    write_text_atomic(folder / "meta.json", json.dumps(meta, indent=2) + "\n")


def write_split(path: Path, n_cells: int, seed: int = 0) -> None:
    """split.tsv as ``evoformer.data.split`` writes it (cell_id, label, split, fold; no CV)."""
    import pandas as pd

    from evoformer.io import atomic_path

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_cells)
    split = np.empty(n_cells, dtype=object)
    n_test, n_val = round(0.15 * n_cells), round(0.15 * n_cells)
    split[order[:n_test]] = "test"
    split[order[n_test : n_test + n_val]] = "val"
    split[order[n_test + n_val :]] = "train"
    table = pd.DataFrame(
        {
            "cell_id": [f"cell{i:05d}" for i in range(n_cells)],
            "label": [f"type{i % 3}" for i in range(n_cells)],
            "split": split.astype(str),
            "fold": np.full(n_cells, -1, dtype=np.int64),
        }
    )
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
