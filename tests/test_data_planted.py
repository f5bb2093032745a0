"""The planted-network generator: structure, determinism, files, and that the signal is there."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from evoformer.baselines import RidgeBaseline
from evoformer.data import planted
from evoformer.data.datasets import DatasetSpec, load_expression
from evoformer.data.planted import (
    PLANTED_DEFAULTS,
    make_planted,
    planted_paths,
    resolve_planted_params,
    write_planted,
)
from evoformer.errors import InputError
from evoformer.grn import (
    auprc,
    partial_correlation,
    random_auprc,
    read_truth,
)
from evoformer.model.prior import load_prior_network

TINY = {"n_cells": 200, "n_genes": 24, "r2_cells": 200, "r2_draws": 4}


def _weights(network: pd.DataFrame, genes: list[str]) -> np.ndarray:
    index = {g: i for i, g in enumerate(genes)}
    w = np.zeros((len(genes), len(genes)))
    w[network["source"].map(index), network["target"].map(index)] = network["weight"]
    return w


def _is_acyclic(adjacency: np.ndarray) -> bool:
    """Kahn's algorithm on a bool [G, G] adjacency (source row, target column)."""
    indegree = adjacency.sum(axis=0).astype(int)
    ready = list(np.flatnonzero(indegree == 0))
    seen = 0
    while ready:
        node = ready.pop()
        seen += 1
        for child in np.flatnonzero(adjacency[node]):
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return seen == len(adjacency)


def _log1p(adata: ad.AnnData) -> np.ndarray:
    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata.X.toarray().astype(np.float64)


def test_output_shapes_and_types():
    adata, network, info = make_planted(**TINY)
    assert adata.shape == (200, 24)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert np.array_equal(adata.X.data, np.round(adata.X.data)) and adata.X.data.min() > 0
    assert adata.obs["cell_type"].dtype == "category"
    assert set(adata.obs["cell_type"].cat.categories) == {f"type_{t}" for t in range(4)}
    assert list(adata.var_names) == [f"gene_{g:02d}" for g in range(24)]
    assert list(network.columns) == ["source", "target", "weight"] and len(network) > 0
    assert info["n_edges"] == len(network) == adata.uns["planted"]["summary"]["n_edges"]
    genes = info["genes"]
    assert list(genes["gene"]) == list(adata.var_names)
    assert genes["n_parents"].sum() == len(network) == genes["n_children"].sum()
    for col in ("r2_type", "r2_base", "r2_network", "r2_total", "r2_ceiling", "mse_floor"):
        assert np.isfinite(genes[col]).all()
        np.testing.assert_array_equal(adata.uns["planted"]["genes"][col], genes[col].to_numpy())
    # the shares are ordered as their conditioning sets are nested (up to Monte-Carlo error)
    assert (genes["r2_total"] <= genes["r2_ceiling"] + 0.05).all()
    assert (genes["mse_floor"] <= genes["mse_inputs"] + 0.05).all()
    assert info["params"] == {**PLANTED_DEFAULTS, **TINY}


def test_same_seed_same_bytes_other_seed_differs():
    a1, n1, i1 = make_planted(**TINY, seed=3)
    a2, n2, i2 = make_planted(**TINY, seed=3)
    for part in ("data", "indices", "indptr"):
        assert getattr(a1.X, part).tobytes() == getattr(a2.X, part).tobytes()
    assert n1.to_csv(sep="\t").encode() == n2.to_csv(sep="\t").encode()
    pd.testing.assert_frame_equal(i1["genes"], i2["genes"])
    assert list(a1.obs["cell_type"]) == list(a2.obs["cell_type"])
    a3, n3, _ = make_planted(**TINY, seed=4)
    assert not n1.equals(n3)
    assert (a1.X != a3.X).nnz > 0


def test_several_blocks_of_cells_are_deterministic(monkeypatch):
    # blocks of 2**21 // n_genes cells; a small budget makes 50-cell blocks of 24 genes
    monkeypatch.setattr(planted, "_CELL_BUDGET", 50 * 24)
    a1, _, i1 = make_planted(**TINY)
    a2, _, i2 = make_planted(**TINY)
    assert a1.X.data.tobytes() == a2.X.data.tobytes()
    assert a1.X.indptr.tobytes() == a2.X.indptr.tobytes()
    pd.testing.assert_frame_equal(i1["genes"], i2["genes"])
    # each block has its own stream: the blocks differ from one another
    assert (a1.X[:50] != a1.X[50:100]).nnz > 0
    assert np.isfinite(i1["genes"]["r2_network"]).all()


@pytest.mark.parametrize("kw", [{}, {"n_regulators": 5}, {"edges_per_gene": 4}])
def test_network_is_a_dag(kw):
    adata, network, info = make_planted(**{**TINY, "n_genes": 60, "r2_cells": 0, **kw})
    genes = list(adata.var_names)
    w = _weights(network, genes)
    adj = w != 0
    assert _is_acyclic(adj) and not adj.diagonal().any()
    assert not network.duplicated(["source", "target"]).any()
    assert (adj.sum(axis=0) <= info["params"]["edges_per_gene"]).all()
    scale = info["params"]["weight_scale"]
    assert np.all(np.abs(network["weight"]) >= 0.5 * scale)
    assert np.all(np.abs(network["weight"]) <= 1.5 * scale)
    assert (network["weight"] > 0).any() and (network["weight"] < 0).any()
    # the topological rank orders every edge, depth is 1 + the deepest parent
    table = info["genes"].set_index("gene")
    rank, depth = table["topo_rank"], table["depth"]
    assert (rank[network["source"]].to_numpy() < rank[network["target"]].to_numpy()).all()
    for target, rows in network.groupby("target"):
        assert depth[target] == depth[rows["source"]].max() + 1
    if "n_regulators" in kw:
        assert network["source"].nunique() <= kw["n_regulators"]
        assert (rank[network["source"]] < kw["n_regulators"]).all()


def test_without_edges_the_network_explains_nothing():
    # default Monte-Carlo size (4000 cells x 16 draws): r2_network within +-0.05 of its 0
    _, network, info = make_planted(
        **{**TINY, "edges_per_gene": 0, "r2_cells": 4000, "r2_draws": 16}
    )
    assert len(network) == 0 and (info["genes"]["depth"] == 0).all()
    assert np.abs(info["genes"]["r2_network"]).max() < 0.05
    _, network, _ = make_planted(**{**TINY, "regulated_fraction": 0.0, "r2_cells": 0})
    assert len(network) == 0


def test_nonlinearities_change_the_data_not_the_network():
    outs = {
        f: make_planted(**{**TINY, "nonlinearity": f, "r2_cells": 0})
        for f in ("tanh", "softplus", "linear")
    }
    tanh, softplus, linear = (outs[f] for f in ("tanh", "softplus", "linear"))
    assert tanh[1].equals(softplus[1]) and tanh[1].equals(linear[1])
    assert (tanh[0].X != softplus[0].X).nnz > 0 and (tanh[0].X != linear[0].X).nnz > 0


def test_r2_cells_zero_skips_the_estimate():
    _, _, info = make_planted(**{**TINY, "r2_cells": 0})
    assert info["genes"]["r2_network"].isna().all()
    assert info["genes"]["n_parents"].notna().all()


def test_written_files_round_trip(tmp_path):
    out = tmp_path / "toy.h5ad"
    write_planted(out, TINY)
    h5ad, network_tsv, genes_tsv = planted_paths(out)
    assert network_tsv == tmp_path / "toy_network.tsv" and genes_tsv == tmp_path / "toy_genes.tsv"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "toy.h5ad",
        "toy_genes.tsv",
        "toy_network.tsv",
    ]
    adata, network, info = make_planted(**TINY)
    genes = list(adata.var_names)
    # the network TSV through the model's prior loader and through the scorer's reader
    prior = load_prior_network(network_tsv, genes).numpy()
    np.testing.assert_allclose(prior, _weights(network, genes), rtol=1e-6)
    np.testing.assert_array_equal(read_truth(network_tsv, genes), _weights(network, genes) != 0)
    written = pd.read_csv(genes_tsv, sep="\t")
    pd.testing.assert_frame_equal(written, info["genes"], check_exact=False, rtol=1e-5)
    loaded = load_expression(
        h5ad, DatasetSpec(name="toy", path=str(h5ad), value_type="counts", label_key="cell_type")
    )
    assert (loaded.X != adata.X).nnz == 0
    assert list(loaded.obs["label"]) == list(adata.obs["cell_type"])
    back = ad.read_h5ad(h5ad)
    assert back.uns["planted"]["params"]["n_genes"] == 24
    assert "n_regulators" not in back.uns["planted"]["params"]  # None is not stored


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"n_edges": 3}, "n_edges"),
        ({"n_genes": 1}, "n_genes"),
        ({"n_cells": 2.5}, "n_cells"),
        ({"n_cells": True}, "n_cells"),
        ({"seed": -1}, "seed"),
        ({"edges_per_gene": -1}, "edges_per_gene"),
        ({"regulated_fraction": 1.5}, "regulated_fraction"),
        ({"de_fraction": -0.1}, "de_fraction"),
        ({"dispersion": 0}, "dispersion"),
        ({"noise_sd": "big"}, "noise_sd"),
        ({"mean_counts": float("nan")}, "mean_counts"),
        ({"weight_scale": -1.0}, "weight_scale"),
        ({"nonlinearity": "relu"}, "nonlinearity"),
        ({"n_regulators": 0}, "n_regulators"),
        ({"n_regulators": 25}, "n_regulators"),
        ({"r2_draws": 1}, "r2_draws"),
    ],
)
def test_bad_params_name_the_config_key(tmp_path, params, key):
    with pytest.raises(InputError, match=rf"^datasets\.toy\.planted\.{key}\b") as exc:
        write_planted(tmp_path / "toy.h5ad", {**TINY, **params})
    assert "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match=rf"^planted\.{key}\b"):
        resolve_planted_params({**TINY, **params})


def test_signal_is_learnable_by_simple_means():
    """64 genes, 1500 cells: gene-gene structure beyond cell type, visible to linear tools.

    Held-out masked-value MSE in log1p space (each gene predicted from the other 63 of the
    cell): a ridge regression beats the per-gene mean by >= 40% and the true per-type mean by
    >= 30% on genes with parents; on isolated genes (no parents, no children) it gains
    nothing (< 5%) over the per-type mean. Partial-correlation magnitudes recover the planted
    edges (undirected) with AUPRC > 10x the random rate.
    """
    adata, network, info = make_planted(n_cells=1500, n_genes=64)
    x = _log1p(adata)
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    genes = info["genes"]
    parents = genes["n_parents"].to_numpy() > 0
    isolated = ~parents & (genes["n_children"].to_numpy() == 0)
    assert parents.sum() >= 20 and isolated.sum() >= 8

    train, test = np.arange(1000), np.arange(1000, 1500)
    mean_mse = ((x[test] - x[train].mean(axis=0)) ** 2).mean(axis=0)
    type_means = np.stack([x[train][types[train] == t].mean(axis=0) for t in range(4)])
    type_mse = ((x[test] - type_means[types[test]]) ** 2).mean(axis=0)
    ridge = RidgeBaseline.fit(x[train], alpha=0.1)
    pred = np.empty_like(x[test])
    for g in range(x.shape[1]):  # each gene from all the others of its cell
        hidden = np.zeros_like(x[test], dtype=bool)
        hidden[:, g] = True
        pred[:, g] = ridge.predict(x[test], hidden)[:, g]
    ridge_mse = ((x[test] - pred) ** 2).mean(axis=0)

    assert ridge_mse[parents].mean() < 0.6 * mean_mse[parents].mean()
    assert ridge_mse[parents].mean() < 0.7 * type_mse[parents].mean()
    assert ridge_mse[isolated].mean() > 0.95 * type_mse[isolated].mean()
    # no predictor goes below the sampling-noise floor the generator reports
    assert (ridge_mse > 0.95 * genes["mse_floor"].to_numpy()).all()
    # the reported shares: parents explain a lot for their children, nothing elsewhere
    assert genes["r2_network"][parents].mean() > 0.3
    assert np.abs(genes["r2_network"][~parents]).max() < 0.05

    truth = _weights(network, list(adata.var_names)) != 0
    centred = x - np.stack([x[types == t].mean(axis=0) for t in range(4)])[types]
    score = auprc(np.abs(partial_correlation(centred, shrinkage=0.1)), truth)
    assert score > 10 * random_auprc(truth) and score > 0.5


def test_reported_shares_match_the_data():
    """The Monte-Carlo estimates (own sample) agree with the same statistics of the data."""
    adata, _, info = make_planted(n_cells=3000, n_genes=32, r2_cells=3000, r2_draws=8)
    x = _log1p(adata)
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    genes = info["genes"]
    within = sum(((x[types == t] - x[types == t].mean(axis=0)) ** 2).sum(axis=0) for t in range(4))
    r2_type = 1 - within / len(x) / x.var(axis=0)
    assert np.abs(r2_type - genes["r2_type"]).max() < 0.06
    np.testing.assert_allclose(x.var(axis=0), genes["var_x"], rtol=0.15)
    np.testing.assert_allclose((x > 0).mean(axis=0), genes["frac_nonzero"], atol=0.03)
    assert info["summary"]["frac_nonzero"] == pytest.approx(adata.X.nnz / (3000 * 32))
