"""Expression-space metrics: decoding bins through a cell's edges, the metrics against
independent implementations, the bootstrap, and the baselines on data where the answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from evoformer.baselines import RidgeBaseline, fit_baselines, random_hidden
from evoformer.metrics import (
    Positions,
    Scorer,
    bin_values,
    bootstrap,
    decode_bin_value,
    decode_distribution,
    metrics_from_sums,
    moment_sums,
)


def test_bin_values_by_hand() -> None:
    """K = 5 bins, edges e0..e3: bin 0 -> 0, bins 1..3 -> midpoints, bin 4 -> the last edge."""
    edges = np.array([[1.0, 2.0, 4.0, 8.0], [0.5, 0.5, 0.5, 3.0]])
    v = bin_values(edges)
    assert v.tolist() == [[0, 1.5, 3.0, 6.0, 8.0], [0, 0.5, 0.5, 1.75, 3.0]]
    vt = bin_values(torch.tensor(edges, dtype=torch.float32))
    assert torch.allclose(vt, torch.tensor(v, dtype=torch.float32))


def test_decoding_known_distributions_and_bins() -> None:
    values = torch.tensor([0.0, 1.5, 3.0, 6.0, 8.0])
    one_hot = torch.eye(5)
    assert decode_distribution(one_hot, values.expand(5, 5)).tolist() == values.tolist()
    half = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0])
    assert decode_distribution(half, values).item() == pytest.approx(1.5)
    # regression head: a real-valued bin interpolates between neighbouring bins' values
    b = torch.tensor([0.0, 1.0, 2.5, 3.25, 4.0, 7.0, -1.0])
    got = decode_bin_value(b, values.expand(len(b), 5))
    assert got.tolist() == pytest.approx([0.0, 1.5, 4.5, 6.5, 8.0, 8.0, 0.0])


def test_bin_values_invert_the_binning_of_real_data() -> None:
    """Decoding each cell's true bins lands every value inside its bin's edge interval."""
    from evoformer.data.binning import reference_binning

    rng = np.random.default_rng(0)
    x = np.log1p(rng.poisson(rng.gamma(0.5, 4.0, size=(40, 200))) * 1.0)
    bins, edges = reference_binning(x, 11, 0)
    v = bin_values(edges)
    decoded = np.take_along_axis(v, bins, axis=1)
    nz = x > 0
    assert (decoded[~nz] == 0).all()
    lo = np.take_along_axis(np.concatenate([np.zeros((40, 1)), edges], 1), bins, 1)
    hi = np.take_along_axis(
        np.concatenate([np.zeros((40, 1)), edges, edges[:, -1:]], 1), bins + 1, 1
    )
    assert ((decoded[nz] >= lo[nz] - 1e-9) & (decoded[nz] <= hi[nz] + 1e-9)).all()


def _positions(rng: np.random.Generator, n_cells: int = 30, per_cell: int = 8) -> Positions:
    cell = np.repeat(np.arange(n_cells), per_cell)
    gene = rng.integers(0, 6, size=cell.size)
    true = np.where(rng.random(cell.size) < 0.6, 0.0, rng.gamma(2.0, 1.0, cell.size))
    return Positions(true, gene, cell, n_cells)


def test_scorer_matches_independent_implementations() -> None:
    rng = np.random.default_rng(1)
    pos = _positions(rng)
    pred = pos.true + rng.normal(0, 0.7, pos.true.size)
    score = pred + rng.normal(0, 0.3, pos.true.size)
    m = Scorer(pos, pred, score).metrics()
    assert m["expr_mse"] == pytest.approx(np.mean((pred - pos.true) ** 2))
    assert m["expr_pearson"] == pytest.approx(np.corrcoef(pred, pos.true)[0, 1])
    nz = pos.true > 0
    assert m["expr_mse_nonzero"] == pytest.approx(np.mean((pred[nz] - pos.true[nz]) ** 2))
    assert m["expr_pearson_nonzero"] == pytest.approx(np.corrcoef(pred[nz], pos.true[nz])[0, 1])
    assert m["expr_auroc_zero"] == pytest.approx(roc_auc_score(nz, score))
    per_gene = [np.corrcoef(pred[pos.gene == g], pos.true[pos.gene == g])[0, 1] for g in range(6)]
    assert m["expr_gene_pearson"] == pytest.approx(np.mean(per_gene))
    # ties in the score count half (AUROC of a constant score is 0.5)
    assert Scorer(pos, pred, np.zeros_like(pred)).metrics()["expr_auroc_zero"] == 0.5
    # integer cell weights are the same as repeating the cells
    w = rng.integers(0, 3, pos.n_cells)
    rep = np.concatenate(
        [np.flatnonzero(pos.cell == c) for c in range(pos.n_cells) for _ in range(w[c])]
    )
    pos2 = Positions(pos.true[rep], pos.gene[rep], pos.cell[rep], pos.n_cells)
    a = Scorer(pos, pred, score).metrics(w)
    b = Scorer(pos2, pred[rep], score[rep]).metrics()
    for k in a:
        assert a[k] == pytest.approx(b[k]), k


def test_moment_sums_give_the_same_metrics() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=50), rng.normal(size=50) + 1
    y[:20] = 0
    sums = {
        "all": moment_sums(torch.tensor(x), torch.tensor(y)).numpy(),
        "nonzero": moment_sums(torch.tensor(x[20:]), torch.tensor(y[20:])).numpy(),
    }
    m = metrics_from_sums(sums)
    assert m["expr_mse"] == pytest.approx(np.mean((x - y) ** 2))
    assert m["expr_pearson_nonzero"] == pytest.approx(np.corrcoef(x[20:], y[20:])[0, 1])


def test_bootstrap_is_reproducible_and_pairs_differences() -> None:
    rng = np.random.default_rng(3)
    pos = _positions(rng, n_cells=60)
    good = pos.true + rng.normal(0, 0.2, pos.true.size)
    bad = pos.true + rng.normal(0, 1.5, pos.true.size)
    scorers = {"model": Scorer(pos, good), "mean": Scorer(pos, bad)}
    a = bootstrap(scorers, pos.n_cells, 200, seed=5)
    b = bootstrap(scorers, pos.n_cells, 200, seed=5)
    assert a == b
    c = bootstrap(scorers, pos.n_cells, 200, seed=6)
    assert c != a
    iv = a["model"]["expr_mse"]
    assert iv["lo"] < iv["value"] < iv["hi"]
    d = a["diff:mean"]["expr_mse"]
    assert d["value"] == pytest.approx(iv["value"] - a["mean"]["expr_mse"]["value"])
    assert d["hi"] < 0  # the good predictor is clearly better: the interval excludes 0
    # no resamples: no intervals
    assert math.isnan(bootstrap(scorers, pos.n_cells, 0, seed=5)["model"]["expr_mse"]["lo"])


def test_ridge_baseline_recovers_an_exact_linear_gene() -> None:
    """Gene 0 = 2 * gene 1 - gene 2 + 3 exactly: ridge predicts it when it is hidden."""
    rng = np.random.default_rng(4)
    n, g = 600, 8
    x = rng.normal(5, 1, size=(n, g))
    x[:, 0] = 2 * x[:, 1] - x[:, 2] + 3
    real = np.ones_like(x, dtype=bool)
    fitted = fit_baselines(x[:500], real[:500], ratio=0.15, seed=0)
    hidden = np.zeros((100, g), bool)
    hidden[:, 0] = True
    pred = fitted["ridge"].predict(x[500:], hidden)[:, 0]
    assert fitted["ridge"].alpha == min(fitted["ridge"].alpha, 1e-2)  # little penalty wins
    assert np.abs(pred - x[500:, 0]).max() < 0.05
    mean_err = np.abs(fitted["mean"].predict(x[500:], hidden)[:, 0] - x[500:, 0]).mean()
    assert mean_err > 1.0
    # with gene 1 hidden too, gene 0 is no longer determined: worse, still far above the mean
    both = hidden.copy()
    both[:, 1] = True
    pred2 = fitted["ridge"].predict(x[500:], both)[:, 0]
    assert np.abs(pred2 - x[500:, 0]).mean() < mean_err
    scores = fitted["ridge"].gene_scores()
    assert np.all(np.diag(scores) == 0)
    assert scores[0, 1] > 10 * np.median(scores[0, 3:])


def test_knn_baseline_finds_the_matching_training_cell() -> None:
    """Three well-separated cell states: the kNN prediction of a hidden gene is its state's
    value, measured on the observed genes only."""
    rng = np.random.default_rng(5)
    states = rng.normal(0, 5, size=(3, 12))
    lab = rng.integers(0, 3, 400)
    x = states[lab] + rng.normal(0, 0.05, size=(400, 12))
    real = np.ones_like(x, dtype=bool)
    fitted = fit_baselines(x[:300], real[:300], ratio=0.15, seed=0)
    hidden = random_hidden(real[300:], 0.25, np.random.default_rng(1))
    pred = fitted["knn"].predict(x[300:], hidden)
    assert np.abs(pred[hidden] - states[lab[300:]][hidden]).max() < 0.1


def loo_predict(x: np.ndarray, x_test: np.ndarray, alpha: float) -> np.ndarray:
    """Every gene of ``x_test`` predicted from the other genes of its row, one at a time."""
    ridge = RidgeBaseline.fit(x, alpha)
    out = np.empty_like(x_test)
    for j in range(x_test.shape[1]):
        hidden = np.zeros_like(x_test, dtype=bool)
        hidden[:, j] = True
        out[:, j] = ridge.predict(x_test, hidden)[:, j]
    return out


def test_ridge_baseline_equals_one_sklearn_ridge_per_gene():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(1)
    n, g, alpha = 300, 6, 0.3
    mixing = rng.normal(size=(g, g))
    x = rng.normal(size=(n, g)) @ mixing + 5
    x_test = rng.normal(size=(50, g)) @ mixing + 5
    pred = loo_predict(x, x_test, alpha)
    mean, sd = x.mean(axis=0), x.std(axis=0)
    z, zt = (x - mean) / sd, (x_test - mean) / sd
    for j in range(g):
        others = [k for k in range(g) if k != j]
        fit = Ridge(alpha=alpha * n, fit_intercept=False).fit(z[:, others], z[:, j])
        expected = mean[j] + sd[j] * fit.predict(zt[:, others])
        np.testing.assert_allclose(pred[:, j], expected, rtol=1e-8, atol=1e-8)
    # it predicts a gene from its linear relatives better than the gene's mean
    assert ((x_test - pred) ** 2).mean() < ((x_test - mean) ** 2).mean()


def test_ridge_baseline_regresses_each_masked_set_on_the_unmasked_genes():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(2)
    n, g, alpha = 400, 7, 0.2
    mixing = rng.normal(size=(g, g))
    x = rng.normal(size=(n, g)) @ mixing
    x_test = rng.normal(size=(20, g)) @ mixing
    mask = rng.random((20, g)) < 0.4
    mask[0] = False  # nothing masked: the row comes back as it is
    mask[1] = [True] + [False] * (g - 1)  # one gene masked: as the leave-one-out prediction
    pred = RidgeBaseline.fit(x, alpha).predict(x_test, mask)
    np.testing.assert_array_equal(pred[~mask], x_test[~mask])
    loo = loo_predict(x, x_test, alpha)
    assert pred[1, 0] == pytest.approx(loo[1, 0])
    mean, sd = x.mean(axis=0), x.std(axis=0)
    z, zt = (x - mean) / sd, (x_test - mean) / sd
    for row in range(2, 20):
        hidden, shown = np.flatnonzero(mask[row]), np.flatnonzero(~mask[row])
        for j in hidden:
            fit = Ridge(alpha=alpha * n, fit_intercept=False).fit(z[:, shown], z[:, j])
            expected = mean[j] + sd[j] * fit.predict(zt[row : row + 1, shown])[0]
            assert pred[row, j] == pytest.approx(expected, rel=1e-8, abs=1e-8)
    with pytest.raises(ValueError, match="hidden has shape"):
        RidgeBaseline.fit(x, alpha).predict(x_test, mask[:5])
    with pytest.raises(ValueError, match="alpha"):
        RidgeBaseline.fit(x, 0)
