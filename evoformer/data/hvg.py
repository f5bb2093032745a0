"""Stage 1: highly variable gene (HVG) selection, scanpy's flavors.

Counts are library-size normalised (``normalize_total``, 1e4) and ``log1p``-transformed;
log1p-normalised input is used as is. ``seurat_v3`` ranks genes on the counts,
``seurat`` / ``cell_ranger`` on the log data. The output keeps the log1p-normalised
values of the selected genes (the values that binning turns into tokens).

:func:`run_hvg` (the ``hvg`` rule) streams the dataset from disk in row chunks
(:mod:`evoformer.data.hvg_stream`), so an atlas never has to fit in memory; it selects
the same genes with the same ranks as :func:`select_hvg_in_memory`, which runs scanpy on
the loaded matrix and is kept as the reference (tests, benchmarks).

A Perturb-seq dataset (a ``perturbation:`` block, :mod:`evoformer.perturb.layouts`):

- genes are named by the block's ``gene_column`` (made unique as anndata's
  ``var_names_make_unique`` does), so that conditions and ``genes.tsv`` share one namespace;
- the cells the block drops (missing label, unmeasured perturbed gene, condition below
  ``min_cells``) take no part in the selection and are not written;
- every measured perturbed gene (of a kept condition) is kept: exempt from
  ``hvg.min_cells_per_gene`` and added to the top ``n_hvg`` genes when not among them, so
  the output has ``n_hvg`` + (perturbed genes outside the top ``n_hvg``) genes. The
  ``hvg<n_hvg>`` of the path names the variance-ranked part; downstream stages read the
  gene count from the files (binning's ``meta.json`` ``n_genes``). ``genes.tsv`` marks them
  in ``perturbed``; the added ones have ``hvg_rank`` n_hvg + 1, ... ;
- ``obs`` gains ``condition`` (canonical: ``ctrl``, ``A``, ``A+B``) and
  ``perturbation_type`` (knockdown | knockout | activation).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from evoformer.data.datasets import CHUNK_NONZEROS, DatasetSpec, ExpressionFiles
from evoformer.data.hvg_stream import (
    FLAVORS,
    TARGET_SUM,
    HvgSelection,
    check_hvg_args,
    score_column,
    select_hvg_streamed,
    write_hvg_h5ad,
)
from evoformer.errors import InputError
from evoformer.io import atomic_path
from evoformer.perturb.conditions import CONTROL
from evoformer.perturb.layouts import PerturbObs, read_perturbation_obs

__all__ = ["FLAVORS", "TARGET_SUM", "plot_hvg", "run_hvg", "select_hvg_in_memory"]

log = logging.getLogger(__name__)


def select_hvg_in_memory(
    adata: ad.AnnData,
    spec: DatasetSpec,
    n_top_genes: int,
    flavor: str = "seurat",
    min_cells_per_gene: int = 0,
    min_genes_per_cell: int = 0,
) -> tuple[ad.AnnData, pd.DataFrame]:
    """Select the ``n_top_genes`` most variable genes with scanpy, in memory (the reference).

    adata: [cells, genes] from :func:`evoformer.data.datasets.load_expression`
    (X float32 CSR, ``spec.value_type``);
    it is filtered and normalised in place (no copy of an atlas-sized matrix).
    Returns (hvg, genes): hvg [cells', n_top_genes] with X the log1p-normalised float32
    CSR values of the selected genes in their original order, cells with no expression
    in them dropped (logged); genes: one row per gene that passed the filters, with
    scanpy's statistics, ``highly_variable`` and ``hvg_rank`` (1 = most variable).
    """
    import scanpy as sc

    where = f"dataset '{spec.name}'"
    check_hvg_args(spec, n_top_genes, flavor)
    n_input_cells = adata.n_obs
    if min_cells_per_gene > 0:
        sc.pp.filter_genes(adata, min_cells=min_cells_per_gene)
    if min_genes_per_cell > 0:
        sc.pp.filter_cells(adata, min_genes=min_genes_per_cell)
    if adata.n_obs == 0:
        raise InputError(
            f"{where}: no cells left after hvg.min_genes_per_cell={min_genes_per_cell}"
        )
    empty = np.diff(adata.X.indptr) == 0
    if empty.any():
        raise InputError(
            f"{where}: {int(empty.sum())} cells have no expression (e.g. {adata.obs_names[empty][0]!r}); "
            "drop them or set hvg.min_genes_per_cell: 1"
        )
    if n_top_genes > adata.n_vars:
        raise InputError(
            f"n_hvg={n_top_genes} is larger than the {adata.n_vars} genes of {where}"
            + (
                f" left after hvg.min_cells_per_gene={min_cells_per_gene}"
                if min_cells_per_gene
                else ""
            )
        )
    if spec.value_type == "counts":
        if flavor == "seurat_v3":
            adata.layers["counts"] = adata.X.copy()
        sc.pp.normalize_total(adata, target_sum=TARGET_SUM)
        sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(
        adata,
        n_top_genes=int(n_top_genes),
        flavor=flavor,
        layer="counts" if flavor == "seurat_v3" else None,
    )
    var = adata.var
    selected = var["highly_variable"].to_numpy(dtype=bool)
    if selected.sum() != n_top_genes:
        raise InputError(
            f"{where}: only {int(selected.sum())} genes could be ranked by hvg.flavor={flavor}, "
            f"n_hvg={n_top_genes} asked for"
        )
    score = var[score_column(flavor)].to_numpy(dtype=float)
    rank = pd.Series(np.where(selected, score, -np.inf), index=var.index).rank(
        ascending=False, method="first"
    )
    genes = var.drop(columns=[c for c in ("highly_variable_nbatches",) if c in var]).copy()
    genes["hvg_rank"] = np.where(selected, rank.to_numpy(), 0).astype(int)
    genes.index.name = "gene_id"

    adata.layers.clear()
    hvg = adata[:, selected].copy()
    hvg.X = hvg.X.astype(np.float32).tocsr()
    hvg.X.sort_indices()
    has_expr = np.diff(hvg.X.indptr) > 0
    n_empty = int((~has_expr).sum())
    if n_empty:
        log.warning(
            "%s: dropping %d cells with no expression in the %d HVGs", where, n_empty, n_top_genes
        )
        hvg = hvg[has_expr].copy()
    hvg.var = hvg.var[[c for c in hvg.var.columns if c in genes.columns]]
    hvg.uns["hvg"] = {
        "dataset": spec.name,
        "value_type": spec.value_type,
        "flavor": flavor,
        "n_top_genes": int(n_top_genes),
        "min_cells_per_gene": int(min_cells_per_gene),
        "min_genes_per_cell": int(min_genes_per_cell),
        "n_cells_input": int(n_input_cells),
        "n_cells_filtered": int(n_input_cells - adata.n_obs),
        "n_cells_empty_in_hvgs": n_empty,
    }
    log.info(
        "%s: %d of %d genes selected (%s); %d cells kept of %d",
        where,
        n_top_genes,
        adata.n_vars,
        flavor,
        hvg.n_obs,
        n_input_cells,
    )
    return hvg, genes


def plot_hvg(genes: pd.DataFrame, flavor: str, title: str, out: str | os.PathLike) -> None:
    """Mean expression vs normalised dispersion (or variance) per gene, HVGs highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score_col = score_column(flavor)
    selected = genes["highly_variable"].to_numpy(dtype=bool)
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    ax.scatter(
        genes["means"][~selected],
        genes[score_col][~selected],
        s=4,
        c="#b0b0b0",
        label="other genes",
    )
    ax.scatter(
        genes["means"][selected],
        genes[score_col][selected],
        s=6,
        c="#d62728",
        label=f"HVG ({selected.sum()})",
    )
    ax.set_xscale("log")
    ax.set_xlabel("mean expression" + (" (counts)" if flavor == "seurat_v3" else " (normalised)"))
    ax.set_ylabel("normalised variance" if flavor == "seurat_v3" else "normalised dispersion")
    ax.set_title(title, fontsize=9)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def run_hvg(
    dataset_path: str | os.PathLike | Sequence[str | os.PathLike],
    dataset_name: str,
    dataset: Mapping[str, Any],
    n_hvg: int,
    hvg: Mapping[str, Any],
    out_h5ad: str | os.PathLike,
    out_genes: str | os.PathLike,
    out_plot: str | os.PathLike,
    chunk_nonzeros: int = CHUNK_NONZEROS,
) -> None:
    """The ``hvg`` rule: select (streamed), write the HVG h5ad, the genes table and the plot.

    dataset_path: the .h5ad file, or several read as one dataset (genes matched by name).
    dataset: ``expression``, ``value_type``, ``label_key`` (and ``perturbation``, a
    Perturb-seq dataset's block: see the module docstring) of the dataset's config entry.
    hvg: the config's ``hvg`` section (flavor, min_cells_per_gene, min_genes_per_cell).
    chunk_nonzeros: non-zeros read per row chunk (memory: a few hundred bytes each).
    Every check runs before the first output is written; each output is atomic.
    """
    spec = DatasetSpec.expression_only(dataset_name, dataset)
    flavor = hvg.get("flavor", "seurat")
    check_hvg_args(spec, n_hvg, flavor)
    paths = [dataset_path] if isinstance(dataset_path, str | os.PathLike) else list(dataset_path)
    source = ", ".join(str(p) for p in paths)
    perturb = read_perturbation_obs(paths, spec) if spec.perturbation is not None else None
    scratch = os.path.dirname(os.path.abspath(out_h5ad))
    os.makedirs(scratch, exist_ok=True)
    with ExpressionFiles(paths, spec, max_nonzeros=chunk_nonzeros, scratch_dir=scratch) as files:
        files.cells()  # label column and cell ids checked before the long passes
        cells = always_keep = obs_columns = None
        if perturb is not None:
            # the same files, read the same way: the same cells and gene names
            assert files.cell_ids.equals(perturb.cell_ids) and files.gene_ids.equals(perturb.genes)
            cells = perturb.keep
            always_keep = files.gene_ids.isin(perturb.perturbed_genes)
            obs_columns = pd.DataFrame(
                {"condition": perturb.condition, "perturbation_type": perturb.perturbation_type}
            )
        selection = select_hvg_streamed(
            files,
            n_hvg,
            flavor=flavor,
            min_cells_per_gene=int(hvg.get("min_cells_per_gene", 0)),
            min_genes_per_cell=int(hvg.get("min_genes_per_cell", 0)),
            cells=cells,
            always_keep=always_keep,
        )
        uns_hvg = None
        if perturb is not None:
            _check_perturbation_cells(perturb, selection, spec.name)
            uns_hvg = {
                "n_cells_perturbation_dropped": int(len(perturb.keep) - perturb.n_kept),
                "n_perturbed_genes": len(perturb.perturbed_genes),
                "n_perturbed_genes_added": selection.n_added,
            }
        n_written, _ = write_hvg_h5ad(files, selection, out_h5ad, source, obs_columns, uns_hvg)
        n_input = files.n_cells
    genes = selection.genes
    n_selected = int(genes["highly_variable"].sum())
    if perturb is not None:
        log.info(
            "dataset '%s': %d perturbed genes added to the top %d HVGs (%d of the %d measured "
            "perturbed genes are among them); %d perturbed genes not measured%s",
            spec.name,
            selection.n_added,
            n_hvg,
            len(perturb.perturbed_genes) - selection.n_added,
            len(perturb.perturbed_genes),
            len(perturb.unmeasured_genes),
            f": {', '.join(perturb.unmeasured_genes)}" if perturb.unmeasured_genes else "",
        )
    log.info(
        "dataset '%s': %d of %d genes selected (%s); %d cells kept of %d",
        spec.name,
        n_selected,
        len(genes),
        flavor,
        n_written,
        n_input,
    )
    with atomic_path(out_genes) as tmp:
        genes.to_csv(tmp, sep="\t")
    added = f" + {selection.n_added} perturbed" if perturb is not None else ""
    plot_hvg(
        genes,
        flavor,
        f"{spec.name}: {n_hvg}{added} HVGs ({flavor}) of {len(genes)} genes",
        out_plot,
    )


def _check_perturbation_cells(perturb: PerturbObs, selection: HvgSelection, name: str) -> None:
    """After the HVG stage's own cell filter (hvg.min_genes_per_cell): control cells must be
    left (else InputError); conditions that fell below min_cells are named in the log."""
    kept = pd.Series(perturb.condition[selection.cell_keep]).value_counts()
    if kept.get(CONTROL, 0) == 0:
        raise InputError(
            f"dataset '{name}': no control cells left after hvg.min_genes_per_cell="
            f"{selection.min_genes_per_cell}"
        )
    assert selection.spec.perturbation is not None
    min_cells = selection.spec.perturbation.min_cells
    small = kept[(kept > 0) & (kept < min_cells)]
    if len(small):
        log.warning(
            "dataset '%s': %d conditions have fewer than min_cells=%d cells after "
            "hvg.min_genes_per_cell=%d (kept): %s",
            name,
            len(small),
            min_cells,
            selection.min_genes_per_cell,
            ", ".join(f"{c} ({n})" for c, n in small.sort_index().items()),
        )
