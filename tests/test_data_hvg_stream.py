"""Streamed HVG selection equals scanpy in memory; storage layouts, several files, bad input.

The reference is :func:`select_hvg_in_memory` (scanpy on the loaded matrix). Equality is
exact: the genes table (statistics, highly_variable, hvg_rank) compared with
``check_exact``, and the written HVG matrix value for value. Chunks are kept far smaller
than the data so that every pass runs over many of them.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from evoformer.data.datasets import (
    DatasetSpec,
    ExpressionFiles,
    load_expression,
    make_synthetic,
    materialise_pbmc68k,
)
from evoformer.data.hvg import run_hvg, select_hvg_in_memory
from evoformer.data.hvg_stream import select_hvg_streamed, write_hvg_h5ad
from evoformer.errors import InputError

PBMC = {"expression": "raw", "value_type": "log1p", "label_key": "bulk_labels"}
COUNTS = {"expression": "X", "value_type": "counts", "label_key": "cell_type"}
SMALL_CHUNK = 4000  # non-zeros per chunk: PBMC (~170k) and the synthetic data (~100k) take dozens


@pytest.fixture(scope="module")
def pbmc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pbmc") / "pbmc68k.h5ad"
    materialise_pbmc68k(path)
    return path


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(n_cells=600, n_genes=400, n_types=4, seed=5)


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory, synthetic):
    path = tmp_path_factory.mktemp("synthetic") / "s.h5ad"
    synthetic.write_h5ad(path)
    return path


def _reference(path, dataset, n_hvg, flavor, min_cells, min_genes):
    spec = DatasetSpec.expression_only("d", dataset)
    return select_hvg_in_memory(
        load_expression(path, spec), spec, n_hvg, flavor, min_cells, min_genes
    )


def _streamed(paths, dataset, n_hvg, flavor, min_cells, min_genes, out, chunk=SMALL_CHUNK):
    spec = DatasetSpec.expression_only("d", dataset)
    with ExpressionFiles(paths, spec, max_nonzeros=chunk, scratch_dir=out.parent) as files:
        assert sum(1 for _ in files.chunks()) > 5  # several chunks per pass
        selection = select_hvg_streamed(files, n_hvg, flavor, min_cells, min_genes)
        write_hvg_h5ad(files, selection, out, source="src")
    return ad.read_h5ad(out), selection.genes


def _assert_same(streamed, reference):
    (hvg, genes), (ref_hvg, ref_genes) = streamed, reference
    pd.testing.assert_frame_equal(genes, ref_genes, check_exact=True)
    assert hvg.X.dtype == np.float32 and sp.isspmatrix_csr(hvg.X) and hvg.X.has_sorted_indices
    assert hvg.shape == ref_hvg.shape and (hvg.X != ref_hvg.X).nnz == 0
    pd.testing.assert_frame_equal(hvg.obs, ref_hvg.obs, check_exact=True)
    pd.testing.assert_frame_equal(hvg.var, ref_hvg.var, check_exact=True)
    uns = {k: v for k, v in hvg.uns["hvg"].items() if k != "source"}
    assert uns == ref_hvg.uns["hvg"]
    assert ("log1p" in hvg.uns) == ("log1p" in ref_hvg.uns)


def _check_filters_bite(genes, hvg, min_cells, min_genes, n_genes):
    """The filter settings of a case really drop genes and cells (else it tests nothing)."""
    if min_cells:
        assert len(genes) < n_genes and (genes["n_cells"] >= min_cells).all()
    if min_genes:
        assert hvg.uns["hvg"]["n_cells_filtered"] > 0 and (hvg.obs["n_genes"] >= min_genes).all()


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger"])
@pytest.mark.parametrize(("min_cells", "min_genes"), [(0, 0), (40, 200)], ids=["all", "filtered"])
def test_pbmc_log1p_equals_scanpy(tmp_path, pbmc_file, flavor, min_cells, min_genes):
    reference = _reference(pbmc_file, PBMC, 100, flavor, min_cells, min_genes)
    streamed = _streamed(pbmc_file, PBMC, 100, flavor, min_cells, min_genes, tmp_path / "h.h5ad")
    _assert_same(streamed, reference)
    _check_filters_bite(streamed[1], streamed[0], min_cells, min_genes, 765)
    ranks = streamed[1].loc[streamed[1]["highly_variable"], "hvg_rank"]
    assert sorted(ranks) == list(range(1, 101))


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger", "seurat_v3"])
@pytest.mark.parametrize(("min_cells", "min_genes"), [(0, 0), (60, 110)], ids=["all", "filtered"])
def test_synthetic_counts_equal_scanpy(tmp_path, synthetic_file, flavor, min_cells, min_genes):
    reference = _reference(synthetic_file, COUNTS, 60, flavor, min_cells, min_genes)
    streamed = _streamed(
        synthetic_file, COUNTS, 60, flavor, min_cells, min_genes, tmp_path / "h.h5ad"
    )
    _assert_same(streamed, reference)
    _check_filters_bite(streamed[1], streamed[0], min_cells, min_genes, 400)


def test_run_hvg_streams_with_small_chunks(tmp_path, synthetic_file):
    """The rule's entry point: same outputs as the in-memory reference, whatever the chunk."""
    outs = [tmp_path / name for name in ("hvg.h5ad", "genes.tsv", "hvg.png")]
    hvg = {"flavor": "seurat_v3", "min_cells_per_gene": 3, "min_genes_per_cell": 0}
    run_hvg(synthetic_file, "d", COUNTS, 50, hvg, *outs, chunk_nonzeros=SMALL_CHUNK)
    ref_hvg, ref_genes = _reference(synthetic_file, COUNTS, 50, "seurat_v3", 3, 0)
    genes = pd.read_csv(outs[1], sep="\t", index_col="gene_id")
    assert list(genes.index[genes.highly_variable]) == list(
        ref_genes.index[ref_genes.highly_variable]
    )
    assert (genes["hvg_rank"] == ref_genes["hvg_rank"]).all()
    hvg_out = ad.read_h5ad(outs[0])
    assert (hvg_out.X != ref_hvg.X).nnz == 0 and hvg_out.uns["hvg"]["source"] == str(synthetic_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genes.tsv", "hvg.h5ad", "hvg.png"]


# ---------------------------------------------------------------- storage layouts
@pytest.mark.parametrize("layout", ["csc", "dense", "layer", "raw"])
def test_storage_layouts_give_the_same_selection(tmp_path, synthetic, synthetic_file, layout):
    adata = synthetic.copy()
    dataset = dict(COUNTS)
    if layout == "csc":
        adata.X = sp.csc_matrix(adata.X)
    elif layout == "dense":
        adata.X = adata.X.toarray()
    elif layout == "layer":
        adata.layers["counts"] = adata.X.copy()
        adata.X = sp.csr_matrix(adata.X.shape, dtype=np.float32)
        dataset["expression"] = "layer:counts"
    else:
        adata.raw = adata.copy()
        adata = adata[:, :10].copy()
        dataset["expression"] = "raw"
    path = tmp_path / f"{layout}.h5ad"
    adata.write_h5ad(path)
    (tmp_path / "out").mkdir()
    streamed = _streamed(path, dataset, 40, "seurat", 3, 0, tmp_path / "out" / "h.h5ad")
    _assert_same(streamed, _reference(synthetic_file, COUNTS, 40, "seurat", 3, 0))
    # the CSC transpose's scratch files are gone
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["h.h5ad"]


def test_chunks_are_bounded_and_cover_the_matrix(synthetic, synthetic_file):
    spec = DatasetSpec.expression_only("d", COUNTS)
    with ExpressionFiles(synthetic_file, spec, max_nonzeros=SMALL_CHUNK) as files:
        chunks = list(files.chunks(validate=True))
    assert all(c.x.nnz <= SMALL_CHUNK or c.x.shape[0] == 1 for c in chunks)
    assert [c.start for c in chunks[1:]] == [c.stop for c in chunks[:-1]]
    assert (sp.vstack([c.x for c in chunks]) != synthetic.X).nnz == 0


# ---------------------------------------------------------------- several files as one
def _write_parts(tmp_path, synthetic, cut=250):
    """Two parts: a without genes 0-2, b with genes 397-399 dropped, its genes reversed and 5
    genes of its own."""
    a = synthetic[:cut, 3:].copy()
    b = synthetic[cut:, :397].copy()
    b = b[:, b.var_names[::-1]].copy()
    extra = ad.AnnData(
        X=sp.csr_matrix(np.ones((b.n_obs, 5), dtype=np.float32)),
        obs=b.obs,
        var=pd.DataFrame(index=[f"extra_{i}" for i in range(5)]),
    )
    b = ad.concat([b, extra], axis=1, merge="first")
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    a.write_h5ad(paths[0])
    b.write_h5ad(paths[1])
    return paths


@pytest.mark.parametrize("flavor", ["seurat", "seurat_v3"])
def test_several_files_equal_one_concatenated_file(tmp_path, synthetic, flavor, caplog):
    paths = _write_parts(tmp_path, synthetic)
    joined = tmp_path / "joined.h5ad"
    synthetic[:, 3:397].copy().write_h5ad(joined)  # the shared genes, in a's order
    (tmp_path / "out").mkdir()
    with caplog.at_level("INFO"):
        hvg, genes = _streamed(paths, COUNTS, 50, flavor, 3, 10, tmp_path / "out" / "h.h5ad")
    ref_hvg, ref_genes = _reference(joined, COUNTS, 50, flavor, 3, 10)
    pd.testing.assert_frame_equal(genes, ref_genes, check_exact=True)
    assert (hvg.X != ref_hvg.X).nnz == 0 and list(hvg.obs_names) == list(ref_hvg.obs_names)
    assert list(hvg.obs.columns) == ["label", "source_file", "n_genes"]
    sources = hvg.obs["source_file"].astype(str)
    assert set(sources[: hvg.n_obs // 3]) == {str(paths[0])} and sources.iloc[-1] == str(paths[1])
    assert f"{paths[0]}: 3 of its 397 genes are not in every file; dropped" in caplog.text
    assert f"{paths[1]}: 8 of its 402 genes are not in every file; dropped" in caplog.text


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_files_without_shared_genes(tmp_path, synthetic):
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    synthetic[:100, :200].copy().write_h5ad(paths[0])
    synthetic[100:200, 200:].copy().write_h5ad(paths[1])
    with pytest.raises(
        InputError, match=r"datasets\.d\.paths: the files share no gene names"
    ) as exc:
        ExpressionFiles(paths, DatasetSpec.expression_only("d", COUNTS))
    assert f"{paths[1]}: 200 genes" in _one_line(exc)


def test_duplicate_cells_across_files(tmp_path, synthetic):
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    synthetic[:100].copy().write_h5ad(paths[0])
    synthetic[50:150].copy().write_h5ad(paths[1])
    out = tmp_path / "out"
    out.mkdir()
    outs = [out / n for n in ("hvg.h5ad", "genes.tsv", "hvg.png")]
    with pytest.raises(InputError, match=r"50 cell ids occur in more than one file") as exc:
        run_hvg(paths, "d", COUNTS, 20, {}, *outs)
    assert f"'cell_050' in {paths[0]} and {paths[1]}" in _one_line(exc)
    assert not any(out.iterdir())


def test_a_file_contradicting_the_value_type_is_named(tmp_path, synthetic):
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    synthetic[:100].copy().write_h5ad(paths[0])
    logged = synthetic[100:200].copy()
    logged.X.data = np.log1p(logged.X.data)
    logged.write_h5ad(paths[1])
    out = tmp_path / "out"
    out.mkdir()
    outs = [out / n for n in ("hvg.h5ad", "genes.tsv", "hvg.png")]
    with pytest.raises(InputError, match="value_type is counts but X holds non-integer") as exc:
        run_hvg(paths, "d", COUNTS, 20, {}, *outs)
    assert _one_line(exc).startswith(str(paths[1]))
    with pytest.raises(InputError, match="value_type is log1p but X holds only integer") as exc:
        run_hvg(paths, "d", {**COUNTS, "value_type": "log1p"}, 20, {}, *outs)
    assert _one_line(exc).startswith(str(paths[0]))
    assert not any(out.iterdir())


# ---------------------------------------------------------------- bad input
def test_counts_declared_log1p(tmp_path, synthetic_file):
    outs = [tmp_path / n for n in ("hvg.h5ad", "genes.tsv", "hvg.png")]
    with pytest.raises(InputError) as exc:
        run_hvg(synthetic_file, "d", {**COUNTS, "value_type": "log1p"}, 20, {}, *outs)
    assert _one_line(exc) == (
        f"{synthetic_file}: datasets.d.value_type is log1p but X holds only integer values "
        "(raw counts); set datasets.d.value_type: counts"
    )
    assert not any(tmp_path.iterdir())


def _tiny(tmp_path, n_cells, n_genes, seed=0, constant=False):
    """Counts 1 + Poisson(3), or all 2 (every gene constant, all with the same mean)."""
    rng = np.random.default_rng(seed)
    x = (rng.poisson(3, size=(n_cells, n_genes)) + 1).astype(np.float32)
    if constant:
        x[:] = 2
    path = tmp_path / f"tiny_{n_cells}x{n_genes}.h5ad"
    ad.AnnData(
        X=sp.csr_matrix(x),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    ).write_h5ad(path)
    return path


@pytest.mark.parametrize(
    ("flavor", "shape", "n_hvg", "message"),
    [
        ("seurat", (50, 1), 1, "1 gene; HVG selection ranks genes against each other"),
        ("cell_ranger", (50, 1), 1, "1 gene; HVG selection ranks genes against each other"),
        ("seurat_v3", (50, 1), 1, "1 gene; HVG selection ranks genes against each other"),
        ("seurat", (1, 30), 2, "1 cell left for HVG selection; gene variances need at least 2"),
        ("seurat", "constant", 1, "only 0 genes could be ranked by hvg.flavor=seurat"),
        ("cell_ranger", (50, 5), 2, "only 0 genes could be ranked by hvg.flavor=cell_ranger"),
        ("cell_ranger", "constant", 1, "30 genes give equal percentiles"),
        ("seurat", (50, 10), 2, "8 genes tie at the n_hvg=2 cut-off of hvg.flavor=seurat"),
        ("seurat_v3", (50, 5), 2, "only 5 do \\(needs 10\\)"),
        ("seurat_v3", (3, 30), 2, "the loess fit of variance on mean failed over"),
    ],
    ids=lambda v: str(v) if not isinstance(v, str) or len(v) < 20 else "",
)
def test_too_small_for_hvg_selection(tmp_path, flavor, shape, n_hvg, message):
    """Where scanpy crashes (IndexError, 'Bin edges must be unique', a loess segfault) or
    ties at the cut-off, the selection refuses with one line and writes nothing."""
    path = (
        _tiny(tmp_path, 20, 30, constant=True) if shape == "constant" else _tiny(tmp_path, *shape)
    )
    out = tmp_path / "out"
    out.mkdir()
    outs = [out / n for n in ("hvg.h5ad", "genes.tsv", "hvg.png")]
    dataset = {"expression": "X", "value_type": "counts", "label_key": None}
    with pytest.raises(InputError, match=message) as exc:
        run_hvg(path, "d", dataset, n_hvg, {"flavor": flavor}, *outs)
    assert _one_line(exc).startswith("dataset 'd': ")
    assert not any(out.iterdir())


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger"])
@pytest.mark.parametrize("shape", [(3, 30), (30, 60), (50, 30), (200, 40)], ids=str)
def test_small_data_selects_as_scanpy_or_refuses_where_it_fails(tmp_path, flavor, shape):
    path = _tiny(tmp_path, *shape, seed=1)
    dataset = {"expression": "X", "value_type": "counts", "label_key": None}
    try:
        reference = _reference(path, dataset, 5 if shape[1] > 30 else 2, flavor, 0, 0)
    except InputError:
        reference = None
    spec = DatasetSpec.expression_only("d", dataset)
    with ExpressionFiles(path, spec) as files:
        if reference is None:
            with pytest.raises(InputError):
                select_hvg_streamed(files, 5 if shape[1] > 30 else 2, flavor)
            return
        genes = select_hvg_streamed(files, 5 if shape[1] > 30 else 2, flavor).genes
    pd.testing.assert_frame_equal(genes, reference[1], check_exact=True)
