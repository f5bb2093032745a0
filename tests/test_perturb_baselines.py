"""Perturbation baselines where the answer is known (evoformer.perturb.baselines)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from evoformer.errors import InputError
from evoformer.perturb.baselines import (
    BASELINES,
    AdditiveBaseline,
    LinearBaseline,
    TrainingMeans,
    fit_baselines,
)

GENES = [f"G{i}" for i in range(12)]


def _additive_screen(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """ctrl [G] and exactly additive condition means: mean_AB = ctrl + d_A + d_B."""
    rng = np.random.default_rng(seed)
    ctrl = rng.uniform(0.5, 2.0, len(GENES))
    delta = {g: rng.normal(0, 0.5, len(GENES)) for g in GENES[:6]}
    means = {g: ctrl + d for g, d in delta.items()}
    for a, b in (("G0", "G1"), ("G2", "G3"), ("G0", "G4"), ("G1", "G5")):
        means[f"{a}+{b}"] = ctrl + delta[a] + delta[b]
    return ctrl, means


def _training(ctrl, means, conditions) -> TrainingMeans:
    return TrainingMeans(GENES, ctrl, conditions, np.stack([means[c] for c in conditions]))


def test_additive_exact_on_an_additive_screen():
    ctrl, means = _additive_screen()
    train = _training(ctrl, means, ["G0", "G1", "G2", "G3", "G2+G3"])
    pred = AdditiveBaseline.fit(train).predict(["G0+G1", "G0+G4", "G4", "ctrl"])
    np.testing.assert_allclose(pred[0], means["G0+G1"], rtol=0, atol=1e-12)
    # unseen component G4: the mean perturbation's change stands in for it
    pert_ref = np.mean([means[c] for c in train.conditions], 0)
    np.testing.assert_allclose(pred[1], means["G0"] + pert_ref - ctrl, atol=1e-12)
    np.testing.assert_allclose(pred[2], pert_ref, atol=1e-12)  # an unseen single
    np.testing.assert_allclose(pred[3], ctrl)


def test_constant_baselines_and_oracle():
    ctrl, means = _additive_screen()
    train = _training(ctrl, means, ["G0", "G1", "G0+G1"])
    delta = {"G4": means["G4"] - ctrl, "G0+G4": means["G0+G4"] - ctrl}
    fitted = fit_baselines(train, truth_delta=delta)
    assert tuple(fitted) == BASELINES
    test = ["G4", "G0+G4"]
    np.testing.assert_array_equal(fitted["no_change"].predict(test), np.tile(ctrl, (2, 1)))
    pert_ref = (means["G0"] + means["G1"] + means["G0+G1"]) / 3
    np.testing.assert_allclose(fitted["mean_perturbation"].predict(test), np.tile(pert_ref, (2, 1)))
    np.testing.assert_allclose(fitted["oracle"].predict(test), [means["G4"], means["G0+G4"]])
    with pytest.raises(InputError, match="lacks conditions G5"):
        fitted["oracle"].predict(["G5"])
    assert "oracle" not in fit_baselines(train)
    with pytest.raises(InputError, match="no training perturbation conditions"):
        TrainingMeans(GENES, ctrl, [], np.zeros((0, len(GENES))))


def _linear_direct(train: TrainingMeans, k: int, lam: float, conditions: list[str]) -> np.ndarray:
    """Ahlmann-Eltze et al.'s run_linear_pretrained_model.R written out with sklearn and inv."""
    x = np.column_stack([train.ctrl, *train.means])  # genes x training conditions (+ ctrl)
    emb = PCA(n_components=k, svd_solver="full").fit_transform(x)  # pca$x (prcomp centres)
    pos = {g: i for i, g in enumerate(train.genes)}
    singles = [c for c in train.conditions if "+" not in c]
    y = np.column_stack(
        [np.zeros(len(pos))]
        + [train.means[train.conditions.index(c)] - train.ctrl for c in singles]
    )
    b = np.column_stack([np.zeros(k)] + [emb[pos[c]] for c in singles])
    center = y.mean(1, keepdims=True)
    w = (
        np.linalg.inv(emb.T @ emb + lam * np.eye(k))
        @ emb.T
        @ (y - center)
        @ b.T
        @ np.linalg.inv(b @ b.T + lam * np.eye(k))
    )
    p = np.column_stack([sum(emb[pos[g]] for g in c.split("+")) for c in conditions])
    return (emb @ w @ p + center + train.ctrl[:, None]).T


@pytest.mark.parametrize(("k", "lam"), [(3, 0.1), (5, 2.0)])
def test_linear_model_against_a_direct_computation(k, lam):
    rng = np.random.default_rng(3)
    ctrl = rng.uniform(0.5, 2.0, len(GENES))
    means = {c: ctrl + rng.normal(0, 0.4, len(GENES)) for c in GENES[:8] + ["G0+G1", "G2+G3"]}
    train = _training(ctrl, means, ["G0", "G1", "G2", "G3", "G4", "G5", "G0+G1"])
    model = LinearBaseline.fit(train, n_components=k, ridge=lam)
    test = ["G6", "G7", "G2+G3", "G6+G7"]
    np.testing.assert_allclose(
        model.predict(test), _linear_direct(train, k, lam, test), rtol=1e-9, atol=1e-10
    )
    # the fitted W solves the ridge normal equations (E'E + l I) W (B B' + l I) = E' Yc B'
    e = model.embedding
    singles = ["ctrl", "G0", "G1", "G2", "G3", "G4", "G5"]
    b = np.column_stack([model.perturbation_embedding(c) for c in singles])
    y = np.column_stack([means.get(c, ctrl) - ctrl for c in singles])
    lhs = (e.T @ e + lam * np.eye(k)) @ model.coef @ (b @ b.T + lam * np.eye(k))
    np.testing.assert_allclose(lhs, e.T @ (y - y.mean(1, keepdims=True)) @ b.T, atol=1e-9)


def test_linear_model_unmeasured_gene_gives_nan():
    ctrl, means = _additive_screen()
    model = LinearBaseline.fit(_training(ctrl, means, ["G0", "G1", "G2"]), n_components=2)
    pred = model.predict(["G3", "XYZ", "G0+XYZ"])
    assert np.isfinite(pred[0]).all() and np.isnan(pred[1:]).all()
