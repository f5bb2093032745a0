"""Streamed group statistics and GEARS-style DE ranking (evoformer.perturb.stats / .de)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from evoformer.errors import InputError
from evoformer.perturb.de import de_scores, rank_by_abs, top_de_genes, welch_t
from evoformer.perturb.stats import GroupStats, group_stats


def _sparse_log_data(rng: np.random.Generator, n: int, g: int) -> np.ndarray:
    x = rng.gamma(2.0, 0.5, size=(n, g)) * (rng.random((n, g)) < 0.6)
    return np.log1p(x).astype(np.float32)


def _write(path, x: np.ndarray, obs: pd.DataFrame, genes: list[str]) -> None:
    a = ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
    a.write_h5ad(path)


@pytest.mark.parametrize("rows_per_chunk", [3, 7, None])
def test_streamed_stats_equal_dense(tmp_path, rows_per_chunk):
    rng = np.random.default_rng(0)
    x = _sparse_log_data(rng, 40, 9)
    labels = rng.integers(-1, 4, size=40)  # -1 rows are skipped
    labels[:2] = 3  # group 3 has cells; group 4 stays empty
    names = ["a", "b", "c", "d", "empty"]
    obs = pd.DataFrame(index=[f"c{i}" for i in range(40)])
    _write(tmp_path / "x.h5ad", x, obs, [f"g{i}" for i in range(9)])
    got = group_stats(tmp_path / "x.h5ad", labels, names, rows_per_chunk=rows_per_chunk)
    for k in range(4):
        rows = x[labels == k].astype(np.float64)
        assert got.n[k] == len(rows)
        np.testing.assert_allclose(got.mean[k], rows.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.var[k], rows.var(0, ddof=1), rtol=1e-9, atol=1e-12)
    assert got.n[4] == 0 and np.isnan(got.mean[4]).all() and np.isnan(got.var[4]).all()
    ref = GroupStats.from_dense(x, labels, names)
    np.testing.assert_allclose(got.mean[:4], ref.mean[:4], rtol=1e-12)


def test_single_cell_group_has_zero_variance():
    s = GroupStats.from_dense(np.array([[1.0, 2.0], [3.0, 5.0]]), np.array([0, 1]), ["a", "b"])
    assert (s.var == 0).all()


def test_stats_bad_labels(tmp_path):
    x = np.ones((4, 2), np.float32)
    _write(tmp_path / "x.h5ad", x, pd.DataFrame(index=list("abcd")), ["g0", "g1"])
    with pytest.raises(InputError, match="4 cells, but 3 group labels"):
        group_stats(tmp_path / "x.h5ad", np.zeros(3, int), ["a"])
    with pytest.raises(InputError, match="outside -1..0"):
        group_stats(tmp_path / "x.h5ad", np.array([0, 1, 0, 0]), ["a"])


def test_welch_t_conventions():
    # equal means and zero variances: NaN -> 0 (scanpy); a difference over zero variance: inf
    t = welch_t(
        3,
        np.array([1.0, 2.0, 4.0]),
        np.zeros(3),
        2,
        np.array([1.0, 1.0, 2.0]),
        np.array([0, 0, 2.0]),
    )
    assert t[0] == 0 and t[1] == np.inf
    assert t[2] == pytest.approx(2.0 / np.sqrt(2.0 / 2))


def test_de_ranking_equals_scanpy():
    """GEARS: rank_genes_groups(t-test, reference=ctrl, rankby_abs=True, all genes)."""
    rng = np.random.default_rng(1)
    sizes = {"ctrl": 30, "P1": 12, "P2": 7, "P1+P2": 2, "P3": 20}
    groups = np.concatenate([[c] * n for c, n in sizes.items()])
    g = 25
    x = _sparse_log_data(rng, len(groups), g)
    for j, c in enumerate(sizes):
        x[groups == c, j] += 1.5 * j  # some real effects
    genes = [f"G{i}" for i in range(g)]
    a = ad.AnnData(
        X=sp.csr_matrix(x),
        obs=pd.DataFrame({"condition": groups}, index=[f"c{i}" for i in range(len(groups))]),
        var=pd.DataFrame(index=genes),
    )
    a.obs["condition"] = a.obs["condition"].astype("category")
    sc.tl.rank_genes_groups(
        a, "condition", reference="ctrl", method="t-test", rankby_abs=True, n_genes=g, use_raw=False
    )
    names = list(sizes)
    stats = GroupStats.from_dense(x, np.array([names.index(c) for c in groups]), names)
    conds, scores = de_scores(stats)
    assert conds == ["P1", "P2", "P1+P2", "P3"]
    order = rank_by_abs(scores)
    result = a.uns["rank_genes_groups"]
    for i, c in enumerate(conds):
        assert [genes[j] for j in order[i]] == list(result["names"][c])
        np.testing.assert_allclose(scores[i][order[i]], result["scores"][c], rtol=1e-4)


def test_top_de_genes_excludes_perturbed_genes():
    rng = np.random.default_rng(2)
    genes = ["A", "B", "C", "D", "E"]
    names = ["ctrl", "A", "A+B"]
    labels = np.repeat([0, 1, 2], 10)
    x = rng.normal(1.0, 0.1, size=(30, 5))
    x[labels == 1, 0] -= 5  # A knocked down in A: its top gene
    x[labels == 1, 3] += 1  # then D
    x[labels == 2, :2] -= 5  # A and B knocked down in A+B
    x[labels == 2, 4] += 2
    stats = GroupStats.from_dense(x, labels, names)
    top = top_de_genes(stats, genes, 2)
    assert top["A"][0] == 3 and 0 not in top["A"] and len(top["A"]) == 2
    assert top["A+B"][0] == 4 and not {0, 1} & set(top["A+B"].tolist())
    assert len(top_de_genes(stats, genes, 10)["A+B"]) == 3  # only 3 other genes
