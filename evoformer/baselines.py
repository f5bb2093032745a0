"""Baselines for masked-value prediction in expression space, fitted on training cells only.

Every baseline sees what the model sees: a test cell's log1p expression with the masked
(hidden) genes removed, and predicts the hidden values. Matrices are dense ``[n, G]`` over the
HVGs: ``x`` the log1p expression (0 where the gene is not expressed), ``hidden`` a bool mask of
the masked genes (always a subset of the cell's real tokens: every gene with
``include_zero_genes: true``, the cell's non-zero genes otherwise).

``mean``
    the per-gene mean of the training cells (ignores the cell: the floor any model must beat);
``ridge``
    linear co-expression: the cell's hidden genes predicted by the ridge regression of exactly
    those genes on exactly its observed ones (standardised genes, penalty ``alpha`` on the
    correlation scale). With ``P = (R + alpha I)^-1`` (``R`` the training correlation matrix)
    that regression is ``z_S = -P[S, S]^-1 P[S, O] z_O`` for hidden set ``S`` and observed set
    ``O``, so one inverse serves every cell's mask; the penalty is chosen on a held-out fifth of
    the training cells under the evaluation's masking;
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
RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # on the correlation scale
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
    """Ridge regression of each cell's hidden genes on its observed ones (module docstring).

    ``mean``, ``sd`` ``[G]`` standardisation of the training cells; ``prec [G, G]`` the inverse
    of their correlation matrix plus ``alpha I``.
    """

    mean: np.ndarray
    sd: np.ndarray
    prec: np.ndarray
    alpha: float

    @classmethod
    def fit(cls, x: np.ndarray, alpha: float) -> RidgeBaseline:
        """Fit on ``x [n, G]``; ``alpha > 0`` on the correlation scale (penalty ``alpha * n``)."""
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(0)
        sd = x.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        z = (x - mean) / sd
        corr = z.T @ z / len(z)
        return cls(mean, sd, np.linalg.inv(corr + alpha * np.eye(len(corr))), alpha)

    def predict(self, x: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """``[n, G]``: the hidden entries predicted from the observed ones of the same row;
        observed entries are returned unchanged."""
        zt = (np.asarray(x, dtype=np.float64) - self.mean) / self.sd
        hidden = np.asarray(hidden, dtype=bool)
        if hidden.shape != zt.shape:
            raise ValueError(f"hidden has shape {hidden.shape}, x {zt.shape}")
        pred = zt.copy()
        p = self.prec
        for row in np.flatnonzero(hidden.any(1)):
            s = np.flatnonzero(hidden[row])
            o = np.flatnonzero(~hidden[row])
            pred[row, s] = -np.linalg.solve(p[np.ix_(s, s)], p[np.ix_(s, o)] @ zt[row, o])
        return np.where(hidden, self.mean + self.sd * pred, x)

    def gene_scores(self) -> np.ndarray:
        """``[G, G]`` |partial correlation| of every gene pair (0 on the diagonal): how much
        gene i says about gene j given all the others."""
        d = np.sqrt(np.diag(self.prec))
        pcor = np.abs(self.prec / d[:, None] / d[None, :])
        np.fill_diagonal(pcor, 0.0)
        return pcor


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
) -> dict[str, MeanBaseline | RidgeBaseline | KnnBaseline]:
    """Fit the three baselines on training cells ``x_train [n, G]`` (``real_train [n, G]``:
    which entries are real tokens, the ones masking may hide, at ``ratio`` per cell); penalty
    and ``k`` are chosen by masked MSE on a seeded held-out fifth of the training cells, then
    refitted on all of them."""
    rng = np.random.default_rng(seed)
    n = len(x_train)
    perm = rng.permutation(n)
    n_hold = max(1, n // 5) if n >= 10 else 0
    hold, fit = perm[:n_hold], perm[n_hold:]
    chosen_alpha, chosen_k = RIDGE_ALPHAS[2], KNN_KS[1]
    if n_hold:
        hidden = random_hidden(real_train[hold], ratio, rng)
        fits = [RidgeBaseline.fit(x_train[fit], a) for a in RIDGE_ALPHAS]
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
    return {
        "mean": MeanBaseline(x_train.mean(0)),
        "ridge": RidgeBaseline.fit(x_train, chosen_alpha),
        "knn": KnnBaseline(x_train, chosen_k),
    }
