"""Baselines for masked-value prediction in expression space, fitted on training cells only.

Every baseline sees what the model sees: a test cell's log1p expression with the masked
(hidden) genes removed, and predicts the hidden values. Matrices are dense ``[n, G]`` over the
HVGs: ``x`` the log1p expression (0 where the gene is not expressed), ``hidden`` a bool mask of
the masked genes (always a subset of the cell's real tokens: every gene with
``include_zero_genes: true``, the cell's non-zero genes otherwise).

``mean``
    the per-gene mean of the training cells (ignores the cell: the floor any model must beat);
``ridge``
    linear co-expression: each hidden gene predicted from the cell's other genes, with hidden
    genes imputed by their training mean, so the model is fitted under the same masking
    distribution it is used with (``draws`` random masks of every training cell). One shared
    Gram matrix gives every gene's regression with its own column left out in closed form; the
    penalty is chosen on a held-out fifth of the training cells;
``knn``
    the mean of the ``k`` nearest training cells, with distances measured on the cell's
    observed (non-hidden) genes only; ``k`` chosen on a held-out fifth of the training cells.

:func:`fit_baselines` returns fitted predictors with ``predict(x, hidden) -> [n, G]`` (only the
hidden entries are meaningful).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

BASELINES = ("mean", "ridge", "knn")
RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # x (mean diagonal of the Gram matrix)
KNN_KS = (5, 10, 25, 50)


def random_hidden(real: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """A mask of ``round(ratio * n_real)`` random real entries per row (rows of ``real [n, G]``)."""
    scores = rng.random(real.shape)
    scores[~real] = 2.0
    n_hide = np.round(real.sum(1) * ratio).astype(np.int64)
    rank = scores.argsort(1).argsort(1)
    return (rank < n_hide[:, None]) & real


@dataclass
class MeanBaseline:
    """Per-gene mean of the training cells, ``mu [G]``."""

    mu: np.ndarray

    def predict(self, x: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.mu, x.shape).copy()


@dataclass
class RidgeBaseline:
    """``pred = mu + (impute(x) - mu) @ W``, ``W [G, G]`` with a zero diagonal."""

    mu: np.ndarray
    w: np.ndarray
    alpha: float

    def predict(self, x: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        z = np.where(hidden, 0.0, x - self.mu)
        return self.mu + z @ self.w

    def gene_scores(self) -> np.ndarray:
        """``|W|`` symmetrised ``[G, G]``: how strongly gene i and gene j predict each other."""
        a = np.abs(self.w)
        return (a + a.T) / 2


@dataclass
class KnnBaseline:
    """Mean over the ``k`` nearest training cells on the observed genes."""

    x_train: np.ndarray
    k: int
    chunk: int = 256
    _sq: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._sq = (self.x_train**2).T.copy()  # [G, n_train]

    def predict(self, x: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        k = min(self.k, len(self.x_train))
        out = np.empty_like(x, dtype=np.float64)
        for i in range(0, len(x), self.chunk):
            obs = ~hidden[i : i + self.chunk]
            xo = np.where(obs, x[i : i + self.chunk], 0.0)
            # squared distance on the observed genes: |xo|^2 + obs @ xtr^2 - 2 xo @ xtr
            d = (
                (xo**2).sum(1)[:, None]
                + obs.astype(np.float64) @ self._sq
                - 2 * xo @ self.x_train.T
            )
            near = np.argpartition(d, k - 1, axis=1)[:, :k]
            out[i : i + self.chunk] = self.x_train[near].mean(1)
        return out


def _fit_ridge(
    x: np.ndarray, real: np.ndarray, ratio: float, draws: int, alphas: tuple[float, ...], rng
) -> list[RidgeBaseline]:
    """One ridge fit per penalty on ``x [n, G]`` (shared Gram, leave-own-column-out)."""
    mu = x.mean(0)
    xc = x - mu
    n, g = x.shape
    gram = np.zeros((g, g))
    cross = np.zeros((g, g))
    for _ in range(draws):
        z = np.where(random_hidden(real, ratio, rng), 0.0, xc)
        gram += z.T @ z
        cross += z.T @ xc
    scale = np.trace(gram) / max(g, 1) or 1.0
    fits = []
    for a in alphas:
        p = np.linalg.inv(gram + a * scale * np.eye(g))
        pb = p @ cross
        # leave feature j out of target j's regression: rank-one downdate of the shared solve
        w = pb - p * (np.diag(pb) / np.diag(p))[None, :]
        np.fill_diagonal(w, 0.0)
        fits.append(RidgeBaseline(mu=mu, w=w, alpha=a))
    return fits


def _masked_mse(
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
    x: np.ndarray,
    hidden: np.ndarray,
) -> float:
    pred = predict(x, hidden)
    return float(((pred - x)[hidden] ** 2).mean()) if hidden.any() else np.inf


def fit_baselines(
    x_train: np.ndarray,
    real_train: np.ndarray,
    ratio: float,
    seed: int,
    draws: int = 4,
) -> dict[str, MeanBaseline | RidgeBaseline | KnnBaseline]:
    """Fit the three baselines on training cells ``x_train [n, G]`` (``real_train [n, G]``:
    which entries are real tokens, the ones masking may hide); penalty and ``k`` are chosen by
    masked MSE on a seeded held-out fifth of the training cells, then refitted on all of them."""
    rng = np.random.default_rng(seed)
    n = len(x_train)
    perm = rng.permutation(n)
    n_hold = max(1, n // 5) if n >= 10 else 0
    hold, fit = perm[:n_hold], perm[n_hold:]
    chosen_alpha, chosen_k = RIDGE_ALPHAS[2], KNN_KS[1]
    if n_hold:
        hidden = random_hidden(real_train[hold], ratio, rng)
        fits = _fit_ridge(x_train[fit], real_train[fit], ratio, draws, RIDGE_ALPHAS, rng)
        mse = [_masked_mse(f.predict, x_train[hold], hidden) for f in fits]
        chosen_alpha = RIDGE_ALPHAS[int(np.argmin(mse))]
        mse_k = [
            _masked_mse(KnnBaseline(x_train[fit], k).predict, x_train[hold], hidden) for k in KNN_KS
        ]
        chosen_k = KNN_KS[int(np.argmin(mse_k))]
        log.info(
            "baselines: ridge penalty %g (held-out masked MSE %s), kNN k %d (%s)",
            chosen_alpha,
            ", ".join(f"{v:.4g}" for v in mse),
            chosen_k,
            ", ".join(f"{v:.4g}" for v in mse_k),
        )
    ridge = _fit_ridge(x_train, real_train, ratio, draws, (chosen_alpha,), rng)[0]
    return {
        "mean": MeanBaseline(x_train.mean(0)),
        "ridge": ridge,
        "knn": KnnBaseline(x_train, chosen_k),
    }
