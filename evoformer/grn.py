"""Scoring a recovered gene-gene network against a known (planted) one.

Scores and truth are ``[G, G]`` matrices in one gene order, ``[i, j]`` for the edge
``i -> j`` (source row, target column; as :func:`evoformer.model.prior.load_prior_network`).
Higher scores mean more confidence in an edge; pass magnitudes (``|w|``, ``|partial corr|``)
for signed scores.

**Direction.** With ``symmetric=True`` (the default) direction is *not* scored: each unordered
pair ``{i, j}`` (``i < j``) counts once, it is a true edge when ``i -> j`` or ``j -> i`` is, and
its score is ``max(scores[i, j], scores[j, i])``. This is how an attention map or a pair
representation, which need not encode direction, is compared. With ``symmetric=False`` every
ordered pair ``(i, j)``, ``i != j``, is scored on its own against ``truth[i, j]`` (direction
counts; ``i -> j`` scored high when only ``j -> i`` is true is a false positive).

The diagonal (self-edges) is left out unless ``exclude_diagonal=False`` (directed only).
"""

from __future__ import annotations

import os

import numpy as np

from evoformer.model.prior import read_edges


def _pairs(g: int, exclude_diagonal: bool, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    if symmetric:
        return np.triu_indices(g, k=1)
    rows, cols = np.indices((g, g))
    keep = rows != cols if exclude_diagonal else np.ones((g, g), dtype=bool)
    return rows[keep], cols[keep]


def _scored_pairs(
    scores: np.ndarray | None, truth: np.ndarray, exclude_diagonal: bool, symmetric: bool
) -> tuple[np.ndarray | None, np.ndarray]:
    truth = np.asarray(truth)
    if truth.ndim != 2 or truth.shape[0] != truth.shape[1]:
        raise ValueError(f"truth must be a square [G, G] matrix, got shape {truth.shape}")
    truth = truth.astype(bool)
    if symmetric and not exclude_diagonal:
        raise ValueError("symmetric scoring compares pairs i < j; the diagonal cannot be included")
    rows, cols = _pairs(truth.shape[0], exclude_diagonal, symmetric)
    if symmetric:
        labels = truth[rows, cols] | truth[cols, rows]
    else:
        labels = truth[rows, cols]
    if scores is None:
        return None, labels
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != truth.shape:
        raise ValueError(f"scores has shape {scores.shape}, truth {truth.shape}")
    if symmetric:
        values = np.maximum(scores[rows, cols], scores[cols, rows])
    else:
        values = scores[rows, cols]
    if not np.isfinite(values).all():
        raise ValueError("scores contain NaN or infinite values")
    return values, labels


def auprc(
    scores: np.ndarray,
    truth: np.ndarray,
    exclude_diagonal: bool = True,
    symmetric: bool = True,
) -> float:
    """Area under the precision-recall curve of ``scores`` [G, G] against ``truth`` [G, G].

    Average precision as scikit-learn's ``average_precision_score``:
    ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds, highest first (tied
    scores enter together; no interpolation). Pairs are chosen as the module docstring says.
    A random ranking scores :func:`random_auprc` in expectation; a perfect one 1.

    Raises:
        ValueError: shapes differ, non-finite scores among the scored pairs, or no true edge.
    """
    from sklearn.metrics import average_precision_score

    values, labels = _scored_pairs(scores, truth, exclude_diagonal, symmetric)
    if not labels.any():
        raise ValueError("truth has no edge among the scored pairs; AUPRC is undefined")
    return float(average_precision_score(labels, values))


def random_auprc(truth: np.ndarray, exclude_diagonal: bool = True, symmetric: bool = True) -> float:
    """The expected AUPRC of a random ranking: the share of scored pairs that are true edges."""
    _, labels = _scored_pairs(None, truth, exclude_diagonal, symmetric)
    return float(labels.mean())


def _read_edges(
    path: str | os.PathLike, genes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source index, target index, weight) of the edges of a network TSV between ``genes``."""
    df = read_edges(path, "network")
    index = {g: i for i, g in enumerate(genes)}
    src = df["source"].map(index)
    tgt = df["target"].map(index)
    keep = (src.notna() & tgt.notna()).to_numpy()
    return (
        src[keep].astype(int).to_numpy(),
        tgt[keep].astype(int).to_numpy(),
        df["value"].to_numpy()[keep],
    )


def read_network(path: str | os.PathLike, genes: list[str]) -> np.ndarray:
    """The network TSV (columns ``source``, ``target``, optional ``weight``, default 1) as a
    float64 ``[G, G]`` matrix of weights in the order of ``genes`` (``[source, target]``;
    duplicate edges add up; edges touching a gene not in ``genes`` are dropped).

    Raises:
        InputError: the file is missing/unreadable, lacks a column, or has a bad weight.
    """
    src, tgt, weight = _read_edges(path, genes)
    out = np.zeros((len(genes), len(genes)))
    np.add.at(out, (src, tgt), weight)
    return out


def read_truth(path: str | os.PathLike, genes: list[str]) -> np.ndarray:
    """The network TSV as a bool ``[G, G]`` matrix in the order of ``genes``: ``True`` at
    ``[source, target]`` for every listed edge between two of ``genes``, whatever its weight
    (genes not in ``genes`` are dropped). Raises InputError as :func:`read_network`."""
    src, tgt, _ = _read_edges(path, genes)
    truth = np.zeros((len(genes), len(genes)), dtype=bool)
    truth[src, tgt] = True
    return truth


def partial_correlation(x: np.ndarray, shrinkage: float = 0.1) -> np.ndarray:
    """Partial correlations [G, G] of the columns of ``x`` [N, G] (a baseline network score).

    From the shrunk correlation matrix ``C = (1 - shrinkage) R + shrinkage I``:
    ``pcor[i, j] = -P[i, j] / sqrt(P[i, i] P[j, j])`` with ``P = C^-1``; the diagonal is 1.
    Constant columns get partial correlation 0 with every other column.
    """
    x = np.asarray(x, dtype=np.float64)
    if not 0 < shrinkage <= 1:
        raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
    z = _standardise(x)[0]  # constant columns -> 0
    corr = z.T @ z / len(z)
    np.fill_diagonal(corr, 1.0)
    prec = np.linalg.inv((1 - shrinkage) * corr + shrinkage * np.eye(x.shape[1]))
    d = np.sqrt(np.diag(prec))
    pcor = -prec / np.outer(d, d)
    np.fill_diagonal(pcor, 1.0)
    return pcor


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return (x - mean) / sd, mean, sd
