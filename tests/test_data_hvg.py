"""HVG selection: flavors on counts and log data, outputs, and bad input with no partial output."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from evoformer.data.datasets import (
    DatasetSpec,
    load_expression,
    make_synthetic,
    materialise_pbmc68k,
)
from evoformer.data.hvg import run_hvg, select_hvg_in_memory
from evoformer.errors import InputError

PBMC = {"expression": "raw", "value_type": "log1p", "label_key": "bulk_labels"}
COUNTS = {"expression": "X", "value_type": "counts", "label_key": "cell_type"}


@pytest.fixture(scope="module")
def pbmc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pbmc") / "pbmc68k.h5ad"
    materialise_pbmc68k(path)
    return path


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "s.h5ad"
    make_synthetic(n_cells=400, n_genes=300, n_types=3, seed=0).write_h5ad(path)
    return path


def _outputs(folder):
    return folder / "hvg.h5ad", folder / "genes.tsv", folder / "hvg.png"


def _run(dataset_path, folder, dataset, n_hvg, **hvg):
    h5ad, genes, png = _outputs(folder)
    run_hvg(dataset_path, "d", dataset, n_hvg, {"min_cells_per_gene": 3, **hvg}, h5ad, genes, png)


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger"])
def test_log_data_flavors_on_pbmc(tmp_path, pbmc_file, flavor):
    _run(pbmc_file, tmp_path, PBMC, 50, flavor=flavor)
    h5ad, genes_tsv, png = _outputs(tmp_path)
    hvg = ad.read_h5ad(h5ad)
    genes = pd.read_csv(genes_tsv, sep="\t", index_col="gene_id")
    assert hvg.n_vars == 50 and genes["highly_variable"].sum() == 50
    assert sorted(genes.index[genes["highly_variable"]]) == sorted(hvg.var_names)
    assert sorted(genes.loc[genes["highly_variable"], "hvg_rank"]) == list(range(1, 51))
    # the selected genes keep the dataset's order and their log1p values
    source = load_expression(pbmc_file, DatasetSpec.expression_only("d", PBMC))
    kept = source[hvg.obs_names, hvg.var_names]
    assert np.array_equal(hvg.X.toarray(), kept.X.toarray())
    assert list(hvg.var_names) == [g for g in source.var_names if g in set(hvg.var_names)]
    assert hvg.X.dtype == np.float32 and sp.issparse(hvg.X)
    assert hvg.obs.columns.tolist() == ["label"] and hvg.uns["hvg"]["flavor"] == flavor
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_seurat_v3_on_counts_outputs_log_normalised(tmp_path, synthetic_file):
    _run(synthetic_file, tmp_path, COUNTS, 40, flavor="seurat_v3", min_cells_per_gene=0)
    hvg = ad.read_h5ad(_outputs(tmp_path)[0])
    source = ad.read_h5ad(synthetic_file)[hvg.obs_names]
    counts = source[:, hvg.var_names].X.toarray()
    library = source.X.sum(axis=1).A1
    expected = np.log1p(counts / library[:, None] * 1e4)
    assert np.allclose(hvg.X.toarray(), expected, rtol=1e-5)
    genes = pd.read_csv(_outputs(tmp_path)[1], sep="\t")
    assert "variances_norm" in genes and genes["highly_variable"].sum() == 40


def test_selection_depends_on_n_top_genes_only_through_its_size(pbmc_file):
    adata = load_expression(pbmc_file, DatasetSpec.expression_only("d", PBMC))
    spec = DatasetSpec.expression_only("d", PBMC)
    small, _ = select_hvg_in_memory(adata.copy(), spec, 20)
    large, _ = select_hvg_in_memory(adata, spec, 60)
    assert set(small.var_names) <= set(large.var_names)


def _assert_nothing_written(folder):
    assert not any(folder.iterdir()), sorted(p.name for p in folder.iterdir())


def test_n_hvg_larger_than_genes(tmp_path, synthetic_file):
    with pytest.raises(InputError, match=r"n_hvg=5000 is larger than the \d+ genes of dataset 'd'"):
        _run(synthetic_file, tmp_path, COUNTS, 5000)
    _assert_nothing_written(tmp_path)


def test_seurat_v3_needs_counts(tmp_path, pbmc_file):
    with pytest.raises(InputError, match="seurat_v3 ranks raw counts"):
        _run(pbmc_file, tmp_path, PBMC, 50, flavor="seurat_v3")
    _assert_nothing_written(tmp_path)


def test_cells_without_expression(tmp_path):
    x = np.ones((5, 4), dtype=np.float32)
    x[2] = 0
    path = tmp_path / "in.h5ad"
    ad.AnnData(X=sp.csr_matrix(x), obs=pd.DataFrame(index=[f"c{i}" for i in range(5)])).write_h5ad(
        path
    )
    out = tmp_path / "out"
    out.mkdir()
    dataset = {"expression": "X", "value_type": "counts", "label_key": None}
    with pytest.raises(InputError, match=r"1 cells have no expression \(e\.g\. 'c2'\)"):
        _run(path, out, dataset, 2, min_cells_per_gene=0)
    _assert_nothing_written(out)


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({**PBMC, "label_key": "celltype"}, "obs column 'celltype'"),
        ({**PBMC, "value_type": "counts"}, "holds non-integer values"),
    ],
)
def test_bad_dataset_config_writes_nothing(tmp_path, pbmc_file, dataset, message):
    with pytest.raises(InputError, match=message):
        _run(pbmc_file, tmp_path, dataset, 20)
    _assert_nothing_written(tmp_path)
