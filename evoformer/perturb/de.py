"""Differentially expressed (DE) genes of each condition against control, as GEARS ranks them.

GEARS (snap-stanford/GEARS, ``gears/data_utils.py``: ``get_DE_genes`` ->
``rank_genes_groups_by_cov``) ranks every gene of every condition with
``sc.tl.rank_genes_groups(groupby=<condition>, reference=<control>, rankby_abs=True,
n_genes=<all genes>, use_raw=False)`` and scanpy's default method, the t-test: Welch's t
statistic of the condition's cells against the control cells on the log1p-normalised ``X``,

    t = (mean_cond - mean_ctrl) / sqrt(var_cond / n_cond + var_ctrl / n_ctrl),

with unbiased variances, a NaN score (equal means, both variances 0) set
to 0, and genes ordered by ``|t|``, largest first (``rankby_abs``). Its evaluation then takes
the first 20 genes of that ranking as the condition's DE genes (``de_idx``, ``mse_de``,
``pearson_delta_de``).

Here the same score is computed from :class:`~evoformer.perturb.stats.GroupStats` (counts,
means, variances: no per-cell data in memory), so the ranking equals scanpy's (ties, which scanpy
orders arbitrarily, are broken by gene order; a condition of one cell, which scanpy refuses,
gets variance 0). Differences from GEARS, on purpose:

* **which cells**: a condition's own cells (all of them, whichever set they are in: a condition
  is wholly in one set) against the **training control cells** only. GEARS ranks against all
  control cells before splitting; here no test-set control cell informs anything the metrics
  use (the same control mean is the reference of every delta).
* **perturbed genes**: the condition's own perturbed genes are removed from its ranking before
  the top ``n_de`` are taken (they are left out of every delta metric and reported apart).
"""

from __future__ import annotations

import numpy as np

from evoformer.perturb.conditions import CONTROL, condition_genes
from evoformer.perturb.stats import GroupStats


def welch_t(
    n1: np.ndarray | float,
    mean1: np.ndarray,
    var1: np.ndarray,
    n2: np.ndarray | float,
    mean2: np.ndarray,
    var2: np.ndarray,
) -> np.ndarray:
    """Welch's t statistic (scanpy's t-test score): broadcast shapes, e.g. ``[K, G]`` vs ``[G]``.

    NaN (0 / 0) becomes 0 as in scanpy; a non-zero difference over zero variance stays +-inf.
    """
    n1 = np.asarray(n1, np.float64)
    n2 = np.asarray(n2, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (mean1 - mean2) / np.sqrt(var1 / n1 + var2 / n2)
    return np.where(np.isnan(t), 0.0, t)


def de_scores(stats: GroupStats, control: str = CONTROL) -> tuple[list[str], np.ndarray]:
    """Welch t of every non-control group against group ``control``.

    Returns:
        ``(conditions [C], scores [C, G])`` in the order of ``stats.names`` (control left out).
    """
    c = stats.index(control)
    rows = [i for i in range(len(stats.names)) if i != c]
    scores = welch_t(
        stats.n[rows][:, None],
        stats.mean[rows],
        stats.var[rows],
        stats.n[c],
        stats.mean[c],
        stats.var[c],
    )
    return [stats.names[i] for i in rows], scores


def rank_by_abs(scores: np.ndarray) -> np.ndarray:
    """Gene indices ordered by ``|score|`` descending, ties by gene index: ``[*, G]`` -> ``[*, G]``."""
    return np.argsort(-np.abs(scores), axis=-1, kind="stable")


def top_de_genes(
    stats: GroupStats, genes: list[str], n_de: int, control: str = CONTROL
) -> dict[str, np.ndarray]:
    """The top ``n_de`` DE genes of every non-control group (module docstring).

    Args:
        stats: statistics with one group per condition and ``control`` = the training controls.
        genes: ``[G]`` gene symbols (to find each condition's perturbed genes).
        n_de: genes to keep per condition (fewer when the data has fewer other genes).

    Returns:
        ``{condition: [<= n_de] int64 gene indices}``, most DE first, the condition's perturbed
        genes excluded.
    """
    position = {g: i for i, g in enumerate(genes)}
    conditions, scores = de_scores(stats, control)
    order = rank_by_abs(scores)
    out: dict[str, np.ndarray] = {}
    for cond, ranked in zip(conditions, order, strict=True):
        own = {position[g] for g in condition_genes(cond) if g in position}
        head = ranked[: n_de + len(own)]
        out[cond] = np.asarray([i for i in head.tolist() if i not in own][:n_de], np.int64)
    return out
