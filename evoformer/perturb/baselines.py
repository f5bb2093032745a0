"""Baselines of perturbation-effect prediction, fitted on training conditions only.

Each predicts the mean log1p-normalised expression of a condition, ``[C, G]`` for any list of
conditions, from :class:`TrainingMeans`: the mean of the training control cells (``ctrl``) and
the means of the training perturbation conditions (never a validation or test condition, never
a validation or test control cell).

``no_change``
    ``ctrl``: the perturbation does nothing.
``mean_perturbation``
    ``pert_ref``, the mean over training perturbation conditions of their means (Systema's
    reference): every perturbation does the average thing.
``additive``
    ``ctrl + sum_g d_g`` over the condition's perturbed genes ``g``, where ``d_g`` is the
    training single ``g``'s change (``mean_g - ctrl``) when ``g`` is a training single, and the
    mean perturbation's change (``pert_ref - ctrl``) otherwise. For a double with both singles
    seen this is the additive model of Ahlmann-Eltze, Huber & Anders (their
    ``run_additive_model.py``); an unseen single falls back to ``pert_ref`` (the same answer as
    ``mean_perturbation``).
``linear``
    the linear model of Ahlmann-Eltze, Huber & Anders, "Deep-learning-based gene perturbation
    effect prediction does not yet outperform simple linear baselines", Nature Methods (2025);
    code: github.com/const-ae/linear_perturbation_prediction-Paper,
    ``benchmark/src/run_linear_pretrained_model.R`` (``--gene_embedding training_data
    --pert_embedding training_data``, defaults ``pca_dim = 10``, ``ridge_penalty = 0.1``).
    Followed step by step (:class:`LinearBaseline`):

    1. ``X [G, T+1]``: the means of every training condition, ``ctrl`` included (their
       pseudobulk ``train_data``);
    2. gene embedding ``E = U_K S_K [G, K]``: PCA scores of the genes (rows) after centering
       every column of ``X`` (``irlba::prcomp_irlba(X, n = K)``, computed here by an exact SVD);
    3. the perturbation embedding of a condition is the row of ``E`` of its perturbed gene
       (``t(pca$x)`` indexed by gene name), 0 for ``ctrl``;
    4. fitted on the training conditions that have an embedding there: ``ctrl`` and the
       training singles. ``Y [G, M]`` = their changes ``mean - ctrl``, centred per gene
       (``b`` = the per-gene mean of ``Y``), ``B [K, M]`` their embeddings;
       ``W = (E^T E + lambda I)^-1 E^T (Y - b) B^T (B B^T + lambda I)^-1`` (``solve_y_axb``);
    5. prediction: ``E W p + b + ctrl`` for a condition with embedding ``p``.

    Extension (their code embeds singles only): a double's embedding is the sum of its two
    genes' rows. Training doubles enter the PCA (step 1, as in their code) but not the fit.
``oracle``
    ``ctrl + delta`` with the generator's noise-free ``delta`` (synthetic screens): the ceiling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from evoformer.errors import InputError
from evoformer.perturb.conditions import CONTROL, condition_genes, n_perturbed

#: Baselines in table order; ``oracle`` only with a noise-free truth.
BASELINES = ("no_change", "mean_perturbation", "additive", "linear", "oracle")
#: Baselines a model must beat (the oracle is a ceiling, not a competitor).
COMPETITORS = ("no_change", "mean_perturbation", "additive", "linear")


@dataclass
class TrainingMeans:
    """What the baselines are fitted on.

    Attributes:
        genes: ``[G]`` gene symbols.
        ctrl: ``[G]`` mean of the training control cells.
        conditions: ``[T]`` training perturbation conditions (``ctrl`` excluded).
        means: ``[T, G]`` their means.
    """

    genes: list[str]
    ctrl: np.ndarray
    conditions: list[str]
    means: np.ndarray

    def __post_init__(self) -> None:
        if not self.conditions:
            raise InputError("no training perturbation conditions to fit the baselines on")
        if CONTROL in self.conditions:
            raise InputError(f"training perturbation conditions include {CONTROL!r}")
        self.ctrl = np.asarray(self.ctrl, np.float64)
        self.means = np.asarray(self.means, np.float64)
        shape = (len(self.conditions), len(self.genes))
        if self.ctrl.shape != shape[1:] or self.means.shape != shape:
            raise ValueError(f"ctrl {self.ctrl.shape} / means {self.means.shape}: expected {shape}")

    @property
    def pert_ref(self) -> np.ndarray:
        """``[G]`` mean over training perturbation conditions of their means."""
        return self.means.mean(0)

    def singles(self) -> dict[str, np.ndarray]:
        """``{gene: [G] change mean - ctrl}`` of the training singles."""
        return {
            condition_genes(c)[0]: m - self.ctrl
            for c, m in zip(self.conditions, self.means, strict=True)
            if n_perturbed(c) == 1
        }


@dataclass
class ConstantBaseline:
    """The same ``value [G]`` for every condition (``no_change``, ``mean_perturbation``)."""

    value: np.ndarray

    def predict(self, conditions: list[str]) -> np.ndarray:
        """``[C, G]``."""
        return np.tile(self.value, (len(conditions), 1))


@dataclass
class AdditiveBaseline:
    """``ctrl + sum of the perturbed genes' single changes`` (module docstring)."""

    ctrl: np.ndarray
    single_delta: dict[str, np.ndarray]
    fallback_delta: np.ndarray

    @classmethod
    def fit(cls, train: TrainingMeans) -> AdditiveBaseline:
        return cls(train.ctrl, train.singles(), train.pert_ref - train.ctrl)

    def predict(self, conditions: list[str]) -> np.ndarray:
        """``[C, G]``."""
        out = np.tile(self.ctrl, (len(conditions), 1))
        for i, c in enumerate(conditions):
            for g in condition_genes(c):
                out[i] += self.single_delta.get(g, self.fallback_delta)
        return out


@dataclass
class LinearBaseline:
    """The linear model of Ahlmann-Eltze et al. (module docstring).

    Attributes:
        genes: ``[G]`` symbols (rows of ``embedding``).
        embedding: ``[G, K]`` gene embedding ``E``.
        coef: ``[K, K]`` ``W``.
        center: ``[G]`` ``b``.
        ctrl: ``[G]``.
    """

    genes: list[str]
    embedding: np.ndarray
    coef: np.ndarray
    center: np.ndarray
    ctrl: np.ndarray

    @classmethod
    def fit(
        cls, train: TrainingMeans, n_components: int = 10, ridge: float = 0.1
    ) -> LinearBaseline:
        """Steps 1-4 of the module docstring; ``K = min(n_components, G, T + 1)``."""
        x = np.vstack([train.ctrl, train.means]).T  # [G, T+1], ctrl included
        x = x - x.mean(0)  # prcomp centres every column (condition)
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        k = min(n_components, s.size)
        embedding = u[:, :k] * s[:k]  # [G, K]: pca$x
        position = {g: i for i, g in enumerate(train.genes)}
        singles = [
            (c, m)
            for c, m in zip(train.conditions, train.means, strict=True)
            if n_perturbed(c) == 1 and c in position
        ]
        # the fitted conditions: ctrl (change 0, embedding 0) and the training singles
        y = np.column_stack([np.zeros_like(train.ctrl)] + [m - train.ctrl for _, m in singles])
        b = np.column_stack([np.zeros(k)] + [embedding[position[c]] for c, _ in singles])
        center = y.mean(1)
        eye = ridge * np.eye(k)
        left = np.linalg.solve(embedding.T @ embedding + eye, embedding.T @ (y - center[:, None]))
        # W = left B^T (B B^T + lambda I)^-1; the Gram matrix is symmetric
        w = np.linalg.solve(b @ b.T + eye, b @ left.T).T
        return cls(list(train.genes), embedding, w, center, train.ctrl.copy())

    def __post_init__(self) -> None:
        self._position = {g: i for i, g in enumerate(self.genes)}

    def perturbation_embedding(self, condition: str) -> np.ndarray | None:
        """``[K]`` sum of the perturbed genes' rows of ``E`` (0 for ctrl; None: gene unmeasured)."""
        position = self._position
        p = np.zeros(self.embedding.shape[1])
        for g in condition_genes(condition):
            if g not in position:
                return None
            p += self.embedding[position[g]]
        return p

    def predict(self, conditions: list[str]) -> np.ndarray:
        """``[C, G]``; NaN rows for conditions with an unmeasured perturbed gene."""
        out = np.full((len(conditions), len(self.genes)), np.nan)
        for i, c in enumerate(conditions):
            p = self.perturbation_embedding(c)
            if p is not None:
                out[i] = self.embedding @ (self.coef @ p) + self.center + self.ctrl
        return out


@dataclass
class OracleBaseline:
    """``ctrl + delta`` from the noise-free truth: ``delta = {condition: [G]}``."""

    ctrl: np.ndarray
    delta: Mapping[str, np.ndarray]

    def predict(self, conditions: list[str]) -> np.ndarray:
        """``[C, G]``; a condition missing from the truth raises InputError."""
        missing = [c for c in conditions if c not in self.delta]
        if missing:
            raise InputError(f"the noise-free truth lacks conditions {', '.join(missing[:10])}")
        return np.stack([self.ctrl + self.delta[c] for c in conditions])


def fit_baselines(
    train: TrainingMeans,
    n_components: int = 10,
    ridge: float = 0.1,
    truth_delta: Mapping[str, np.ndarray] | None = None,
) -> dict[str, ConstantBaseline | AdditiveBaseline | LinearBaseline | OracleBaseline]:
    """Every baseline of :data:`BASELINES` (``oracle`` only with ``truth_delta``), in that order,
    each with ``predict(conditions [C]) -> [C, G]``."""
    out: dict[str, ConstantBaseline | AdditiveBaseline | LinearBaseline | OracleBaseline] = {
        "no_change": ConstantBaseline(train.ctrl.copy()),
        "mean_perturbation": ConstantBaseline(train.pert_ref),
        "additive": AdditiveBaseline.fit(train),
        "linear": LinearBaseline.fit(train, n_components, ridge),
    }
    if truth_delta is not None:
        out["oracle"] = OracleBaseline(train.ctrl.copy(), truth_delta)
    return out
