"""Test helper: a small synthetic Perturb-seq screen through the pipeline's stages in Python
(screen -> hvg -> bin -> perturbation split), without Snakemake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evoformer.data import binning
from evoformer.data.hvg import run_hvg
from evoformer.perturb.screen import screen_paths, write_screen
from evoformer.perturb.splits import split_hvg_cells

#: A screen small enough for a test: 40 genes, 20 regulators, ~18 singles and 6 doubles.
SMALL_SCREEN: dict[str, Any] = {
    "n_genes": 40,
    "n_regulators": 20,
    "n_modules": 2,
    "n_doubles_within": 3,
    "n_doubles_across": 3,
    "n_control": 200,
    "cells_per_condition": 20,
    "truth_cells": 500,
    "seed": 0,
}
DATASET = {
    "expression": "X",
    "value_type": "log1p",
    "label_key": "cell_type",
    "perturbation": {"layout": "gears", "type": "knockdown", "min_cells": 5, "strict": False},
}


def make_screen(
    folder: Path,
    screen: dict[str, Any] | None = None,
    split: dict[str, Any] | None = None,
    n_bins: int = 11,
) -> dict[str, Path]:
    """Write the screen and its stages into ``folder``; returns the paths (``hvg``, ``binned``,
    ``split``, ``truth``, ``network``)."""
    params = {**SMALL_SCREEN, **(screen or {})}
    h5ad = folder / "screen.h5ad"
    write_screen(h5ad, params, "gears")
    _, truth, _, network = screen_paths(h5ad)
    n_genes = int(params["n_genes"])
    hvg = folder / "hvg.h5ad"
    run_hvg(
        dataset_path=str(h5ad),
        dataset_name="screen",
        dataset=DATASET,
        n_hvg=n_genes,
        hvg={"flavor": "seurat", "min_cells_per_gene": 0, "min_genes_per_cell": 0},
        out_h5ad=str(hvg),
        out_genes=str(folder / "genes.tsv"),
        out_plot=str(folder / "hvg.png"),
    )
    binning.bin_h5ad(hvg, folder / "binned", n_bins=n_bins, include_zero_genes=True, seed=0)
    split_hvg_cells(
        hvg_h5ad=str(hvg),
        params=split or {"kind": "simulation", "seed": 1},
        out_tsv=str(folder / "split.tsv"),
        summary_tsv=str(folder / "split_conditions.tsv"),
        where="perturbation.splits.simulation",
    )
    return {
        "hvg": hvg,
        "binned": folder / "binned",
        "split": folder / "split.tsv",
        "truth": truth,
        "network": network,
    }
