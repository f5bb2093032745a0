"""Binning: bit-for-bit equality with scGPT's per-cell loop, tie modes, the on-disk format."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from evoformer.data import binning
from evoformer.data.arrays import BinnedData
from evoformer.data.binning import bin_csr_rows, bin_h5ad, reference_binning
from evoformer.data.datasets import make_synthetic
from evoformer.errors import InputError


def _log_normalised(counts: sp.csr_matrix) -> sp.csr_matrix:
    """log1p(1e4 * counts / library size) as float32 CSR: tie-heavy like real data."""
    lib = np.asarray(counts.sum(axis=1)).ravel()
    x = sp.diags((1e4 / np.maximum(lib, 1)).astype(np.float32)) @ counts
    x = sp.csr_matrix(x, dtype=np.float32)
    x.data = np.log1p(x.data)
    x.sort_indices()
    return x


@pytest.fixture(scope="module")
def expression() -> sp.csr_matrix:
    x = make_synthetic(n_cells=300, n_genes=400, n_types=3, mean_counts=800, seed=3).X
    x = _log_normalised(sp.csr_matrix(x))
    x = x.tolil()
    x[7, :] = 0  # a cell without expression
    x[11, :] = 0
    x[11, 5] = 2.5  # a cell with a single value
    x = x.tocsr()
    x.sort_indices()
    return x


def _scatter(x: sp.csr_matrix, bins: np.ndarray) -> np.ndarray:
    coo = x.tocoo()
    dense = np.zeros(x.shape, dtype=np.int64)
    dense[coo.row, coo.col] = bins
    return dense


def _scgpt_loop_global_rng(x: np.ndarray, n_bins: int, seed: int) -> np.ndarray:
    """scGPT's loop as published: global np.random.seed + np.random.rand per cell."""
    np.random.seed(seed)
    out = np.zeros(x.shape, dtype=np.int64)
    for i, row in enumerate(x):
        if row.max() == 0:
            continue
        nz = row.nonzero()
        edges = np.quantile(row[nz], np.linspace(0, 1, n_bins - 1))
        left = np.digitize(row[nz], edges)
        right = np.digitize(row[nz], edges, right=True)
        out[i, nz[0]] = np.ceil(np.random.rand(len(nz[0])) * (right - left) + left).astype(np.int64)
    return out


def test_reference_is_scgpts_global_stream(expression):
    dense = expression[:40].toarray()
    ref, _ = reference_binning(dense, 11, 5)
    assert np.array_equal(ref, _scgpt_loop_global_rng(dense, 11, seed=5))


@pytest.mark.parametrize("n_bins", [3, 11, 51, 300])
def test_random_mode_equals_reference_bit_for_bit(expression, n_bins):
    ref_bins, ref_edges = reference_binning(expression, n_bins, 7)
    rng = np.random.RandomState(7)
    # two blocks continuing one stream, as bin_h5ad's chunks do
    a, ea = bin_csr_rows(expression[:130], n_bins, "random", rng)
    b, eb = bin_csr_rows(expression[130:], n_bins, "random", rng, n_threads=2)
    assert np.array_equal(_scatter(expression, np.concatenate([a, b])), ref_bins)
    assert np.array_equal(np.vstack([ea, eb]), ref_edges)
    assert ref_bins.max() == n_bins - 1 and ref_bins[expression.toarray() > 0].min() == 1


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_equal_on_heavy_ties_and_both_dtypes(dtype):
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.9, (200, 60)).astype(dtype)
    dense[3] = 4.0  # all values equal: every edge ties
    x = sp.csr_matrix(dense)
    ref_bins, ref_edges = reference_binning(x, 21, 1)
    bins, edges = bin_csr_rows(x, 21, "random", np.random.RandomState(1))
    assert np.array_equal(_scatter(x, bins), ref_bins)
    assert np.array_equal(edges, ref_edges)
    assert len(set(ref_bins[3])) > 5  # the constant cell is spread over its tie range


def _both_paths(monkeypatch, path: str) -> None:
    """Send every row to one path: "distinct" (hash of distinct values) or "sort"."""
    if path == "distinct":
        monkeypatch.setattr(binning, "_DISTINCT_FRACTION", 1.0)
    elif path == "sort":
        monkeypatch.setattr(binning, "_DISTINCT_FRACTION", 0.0)
        monkeypatch.setattr(binning, "_MIN_DISTINCT_CAP", 0)


@pytest.mark.parametrize("density_counts", [450, 600])  # 25.6% and 29.5% non-zero
@pytest.mark.parametrize("path", ["default", "distinct", "sort"])
@pytest.mark.parametrize("n_bins", [3, 51, 300])
def test_dense_cells_equal_reference_on_both_paths(monkeypatch, density_counts, path, n_bins):
    x = make_synthetic(n_cells=240, n_genes=400, n_types=3, mean_counts=density_counts, seed=8).X
    x = _log_normalised(sp.csr_matrix(x))
    assert 0.24 < x.nnz / (x.shape[0] * x.shape[1]) < 0.30
    _both_paths(monkeypatch, path)
    monkeypatch.setattr(binning, "_ROWS_PER_TASK", 50)  # several parts, drawn in turn
    ref_bins, ref_edges = reference_binning(x, n_bins, 11)
    rng = np.random.RandomState(11)
    a, ea = bin_csr_rows(x[:100], n_bins, "random", rng, n_threads=2)
    b, eb = bin_csr_rows(x[100:], n_bins, "random", rng)
    assert np.array_equal(_scatter(x, np.concatenate([a, b])), ref_bins)
    assert np.array_equal(np.vstack([ea, eb]), ref_edges)
    assert np.array_equal(
        rng.random_sample(5), np.random.RandomState(11).random_sample(x.nnz + 5)[-5:]
    )
    det, det_edges = bin_csr_rows(x, n_bins, "deterministic", n_threads=2)
    _both_paths(monkeypatch, "sort")
    det_sorted, _ = bin_csr_rows(x, n_bins, "deterministic")
    assert np.array_equal(det, det_sorted) and np.array_equal(det_edges, ref_edges)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_distinct_and_continuous_rows_mixed(dtype):
    """Rows with few distinct values (hash path) next to all-distinct rows (sort path)."""
    rng = np.random.default_rng(5)
    dense = rng.poisson(1.5, (120, 300)).astype(dtype)
    dense[::3] = rng.random((40, 300)) * (rng.random((40, 300)) < 0.6)  # continuous rows
    dense[5, :] = 0
    dense[6, :7] = 3.0  # one distinct value
    x = sp.csr_matrix(dense)
    ref_bins, ref_edges = reference_binning(x, 21, 2)
    for n_threads in (1, 2):
        bins, edges = bin_csr_rows(x, 21, "random", np.random.RandomState(2), n_threads=n_threads)
        assert np.array_equal(_scatter(x, bins), ref_bins)
        assert np.array_equal(edges, ref_edges)


def test_explicit_zeros_are_not_values():
    """Stored zeros get bin 0 and draw no uniform, as scGPT's row.nonzero() skips them."""
    rng = np.random.default_rng(1)
    dense = rng.poisson(2.0, (30, 40)).astype(np.float32)
    x = sp.csr_matrix(dense)
    stored = sp.csr_matrix((np.ones(x.nnz, dtype=np.float32), x.indices, x.indptr), shape=x.shape)
    stored.data[1::4] = rng.random(len(stored.data[1::4])).astype(np.float32) * 5
    stored.data[::4] = 0.0  # explicit zeros, and a row of them only
    stored.data[stored.indptr[3] : stored.indptr[4]] = 0.0
    ref_bins, ref_edges = reference_binning(stored, 11, 9)
    bins, edges = bin_csr_rows(stored, 11, "random", np.random.RandomState(9))
    assert np.array_equal(_scatter(stored, bins), ref_bins)
    assert np.array_equal(edges, ref_edges)
    assert not bins[stored.data == 0].any() and not edges[3].any()


@pytest.mark.parametrize("offset", [0, 1, 311, 623, 624, 625])
def test_fill_uniforms_is_random_sample(offset):
    lengths = [0, 1, 5, 312, 1000, 623, 3]
    ours, theirs = np.random.RandomState(4), np.random.RandomState(4)
    ours.random_sample(offset)
    theirs.random_sample(offset)
    ours.standard_normal()  # a cached gaussian must survive the state round trip
    theirs.standard_normal()
    outs = [np.empty(n) for n in lengths]
    binning.fill_uniforms(ours, outs)
    assert np.array_equal(np.concatenate(outs), theirs.random_sample(sum(lengths)))
    assert np.array_equal(ours.standard_normal(3), theirs.standard_normal(3))
    assert np.array_equal(binning.random_sample(ours, 7), theirs.random_sample(7))


def test_fill_uniforms_other_bit_generator():
    ours = np.random.RandomState(np.random.PCG64(3))
    theirs = np.random.RandomState(np.random.PCG64(3))
    outs = [np.empty(4), np.empty(9)]
    binning.fill_uniforms(ours, outs)
    assert np.array_equal(np.concatenate(outs), theirs.random_sample(13))


def test_deterministic_mode_stays_in_the_tie_range(expression):
    bins, edges = bin_csr_rows(expression, 11, "deterministic")
    again, _ = bin_csr_rows(expression, 11, "deterministic")
    assert np.array_equal(bins, again)
    dense = _scatter(expression, bins)
    for i in range(expression.shape[0]):
        row = expression[i].toarray().ravel()
        nz = row.nonzero()[0]
        if len(nz) == 0:
            assert not dense[i].any() and not edges[i].any()
            continue
        left = np.digitize(row[nz], edges[i])
        right = np.digitize(row[nz], edges[i], right=True)
        low = np.minimum(right + 1, left)
        assert np.array_equal(dense[i, nz], (low + left + 1) // 2)


def test_unsorted_indices_rejected():
    x = sp.csr_matrix((np.array([1.0, 2.0]), np.array([1, 0]), np.array([0, 2])), shape=(1, 2))
    x.has_sorted_indices = False
    with pytest.raises(ValueError, match="sorted indices"):
        bin_csr_rows(x, 5, "deterministic")


@pytest.mark.parametrize("n_bins", [2, 0, -3])
def test_n_bins_below_three_is_an_input_error(n_bins):
    with pytest.raises(InputError, match=r"n_bins=.*>= 3"):
        binning.check_n_bins(n_bins)


def test_values_dtype_is_smallest():
    assert binning.values_dtype(3) == np.uint8
    assert binning.values_dtype(256) == np.uint8
    assert binning.values_dtype(257) == np.uint16
    assert binning.gene_index_dtype(100) == np.int8
    assert binning.gene_index_dtype(2000) == np.int16


def _write_hvg(path, x: sp.csr_matrix, labels=True) -> None:
    obs = pd.DataFrame(index=pd.Index([f"c{i}" for i in range(x.shape[0])], name="cell_id"))
    if labels:
        obs["label"] = pd.Categorical(np.where(np.arange(x.shape[0]) % 2, "a", "b"))
    var = pd.DataFrame(index=pd.Index([f"g{j}" for j in range(x.shape[1])], name="gene_id"))
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.uns["hvg"] = {"source": "somewhere.h5ad"}
    adata.write_h5ad(path)


@pytest.mark.parametrize("include_zero_genes", [True, False])
def test_bin_h5ad_writes_the_contract(tmp_path, expression, include_zero_genes, monkeypatch):
    hvg = tmp_path / "hvg.h5ad"
    _write_hvg(hvg, expression)
    # tiny chunks: the output must not depend on chunking
    monkeypatch.setattr(binning, "_NONZEROS_PER_CHUNK", 1000)
    out = tmp_path / "bins11"
    meta = bin_h5ad(hvg, out, 11, include_zero_genes=include_zero_genes, seed=4)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "values.npy",
            "gene_index.npy",
            "edges.npy",
            "expression_indptr.npy",
            "expression_slot.npy",
            "expression_data.npy",
            "cells.tsv",
            "genes.tsv",
            "meta.json",
        ]
    )
    data = BinnedData.open(out)
    n, g = expression.shape
    per_cell = np.diff(expression.indptr)
    assert len(data) == n and data.meta == json.loads((out / "meta.json").read_text()) == meta
    assert data.values.dtype == np.uint8 and data.edges.dtype == np.float32
    assert list(data.cells.columns) == ["cell_id", "label"] and data.cells.cell_id[0] == "c0"
    assert list(data.genes.gene_id) == [f"g{j}" for j in range(g)]
    assert meta["source"] == {"hvg": str(hvg), "dataset": "somewhere.h5ad"}
    ref_bins, ref_edges = reference_binning(expression, 11, 4)
    assert np.array_equal(data.edges, ref_edges.astype(np.float32))
    genes, values = data.tokens(np.arange(n))
    # the token expression: each token's log1p value (what expression-space metrics score against)
    dense = expression.toarray()
    expr = np.where(genes >= 0, dense[np.arange(n)[:, None], np.maximum(genes, 0)], 0)
    assert data.expression.dtype == np.float32 and np.array_equal(data.expression, expr)
    if include_zero_genes:
        assert data.values.shape == (n, g) and data.gene_index.shape == (1, g)
        assert np.array_equal(data.values, ref_bins)
    else:
        assert data.values.shape == (n, per_cell.max()) == data.gene_index.shape
        assert meta["max_len"] == per_cell.max()
        assert np.array_equal((genes >= 0).sum(axis=1), per_cell)
        rebuilt = np.zeros((n, g), dtype=np.int64)
        rows, slots = np.nonzero(genes >= 0)
        rebuilt[rows, genes[rows, slots]] = values[rows, slots]
        assert np.array_equal(rebuilt, ref_bins)
        assert not values[genes < 0].any()


def test_bin_h5ad_bad_input_leaves_nothing(tmp_path, expression):
    hvg = tmp_path / "hvg.h5ad"
    _write_hvg(hvg, expression)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="n_bins=2"):
        bin_h5ad(hvg, out, 2)
    with pytest.raises(InputError, match="file not found"):
        bin_h5ad(tmp_path / "missing.h5ad", out, 11)
    negative = expression.copy()
    negative.data[-1] = -1.0
    _write_hvg(hvg, negative)
    with pytest.raises(InputError, match="negative"):
        bin_h5ad(hvg, out, 11)
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------- size guard (issue 20)
def _design_bytes(meta: dict, nnz: int, n_cells: int) -> dict[str, int]:
    """The binned folder's array bytes by design (headers aside): the bins [N, L] at their
    smallest dtype, the per-cell edges, the gene index, and the token expression as a CSR
    (float32 value + smallest slot dtype per stored entry, int64 indptr). A new [N, L] array,
    or a wider dtype, breaks this table on purpose: the 1M-cell bin stage grew 4x once
    (a dense float32 expression array) without anything noticing."""
    n, length = n_cells, meta["max_len"]
    v = np.dtype(meta["dtype"]).itemsize
    g = np.dtype(meta["gene_index_dtype"]).itemsize
    slot = 1 if length <= 256 else 2 if length <= 65536 else 4
    return {
        "values.npy": n * length * v,
        "gene_index.npy": (1 if meta["include_zero_genes"] else n) * length * g,
        "edges.npy": n * (meta["n_bins"] - 1) * 4,
        "expression_indptr.npy": (n + 1) * 8,
        "expression_slot.npy": nnz * slot,
        "expression_data.npy": nnz * 4,
    }


@pytest.mark.parametrize("include_zero_genes", [True, False])
def test_binned_outputs_stay_within_their_design_size(tmp_path, expression, include_zero_genes):
    hvg = tmp_path / "hvg.h5ad"
    _write_hvg(hvg, expression)
    out = tmp_path / "bins"
    meta = bin_h5ad(hvg, out, 51, include_zero_genes=include_zero_genes)
    n = expression.shape[0]
    design = _design_bytes(meta, expression.nnz, n)
    small = {"cells.tsv", "genes.tsv", "meta.json"}  # text: tens of bytes per cell or gene
    assert {p.name for p in out.iterdir()} == set(design) | small
    for name, want in design.items():
        got = (out / name).stat().st_size
        assert want <= got <= want + 128, (name, got, want)  # 128: the .npy header
    tsv = sum((out / name).stat().st_size for name in small)
    assert tsv <= 64 * (n + expression.shape[1]) + 4096
    # the token expression needs at most 8 bytes per stored value and 8 per cell: never the
    # 4 bytes per token of a dense [N, L] float32 array
    expr = sum(design[k] for k in design if k.startswith("expression_"))
    assert expr <= 8 * expression.nnz + 8 * (n + 1)


def test_token_expression_rows_in_any_order(tmp_path, expression):
    """TokenExpression gives the same dense rows as the matrix, for ints, slices, unsorted
    and repeated row arrays; write_token_expression round-trips a dense array exactly."""
    from evoformer.data.arrays import TokenExpression, write_token_expression

    dense = expression.toarray().astype(np.float32)
    write_token_expression(tmp_path, dense)
    expr = TokenExpression.open(tmp_path, dense.shape[1])
    assert expr.shape == dense.shape and len(expr) == len(dense)
    assert np.array_equal(np.asarray(expr), dense)
    rows = np.array([11, 3, 7, 3, 299, 0])
    assert np.array_equal(expr[rows], dense[rows])
    assert np.array_equal(expr[5:9], dense[5:9]) and np.array_equal(expr[11], dense[11])
    assert expr[[7]].shape == (1, dense.shape[1]) and not expr[[7]].any()
    assert expr.data.dtype == np.float32 and expr.slot.dtype == np.uint16


def test_npy_rows_writer_equals_np_save_and_checks_rows(tmp_path):
    from evoformer.io import npy_rows_writer

    a = np.arange(35, dtype=np.int16).reshape(7, 5)
    np.save(tmp_path / "ref.npy", a)
    with npy_rows_writer(tmp_path / "a.npy", a.shape, a.dtype) as write:
        write(a[:3])
        write(a[3:3])
        write(a[3:].astype(np.int64))  # cast to the declared dtype
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    with pytest.raises(ValueError, match="2 of 7 rows"):
        with npy_rows_writer(tmp_path / "short.npy", a.shape, a.dtype) as write:
            write(a[:2])
    with pytest.raises(ValueError, match="does not continue"):
        with npy_rows_writer(tmp_path / "wide.npy", a.shape, a.dtype) as write:
            write(np.zeros((1, 6)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "ref.npy"]


def test_token_expression_indexes_like_the_dense_array(tmp_path, expression):
    """Boolean masks, negative indices and out-of-range rows behave as on the dense [N, L]
    array it replaced (a mask once came back as rows 0 and 1)."""
    from evoformer.data.arrays import TokenExpression, write_token_expression

    dense = expression.toarray().astype(np.float32)
    write_token_expression(tmp_path, dense)
    expr = TokenExpression.open(tmp_path, dense.shape[1])
    mask = np.zeros(len(dense), bool)
    mask[[2, 11, 40]] = True
    assert np.array_equal(expr[mask], dense[mask])
    assert np.array_equal(expr[-1], dense[-1]) and np.array_equal(expr[[-2, 0]], dense[[-2, 0]])
    assert np.array_equal(expr[-3:], dense[-3:])
    for bad in (len(dense), -len(dense) - 1, [0, len(dense)], mask[:-1]):
        with pytest.raises(IndexError):
            expr[bad]
