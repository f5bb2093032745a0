"""Masked-value metrics in expression space, comparable across ``n_bins``, loss and model.

Every predictor (the model, whatever its ``n_bins`` or loss, and every baseline) is scored on
the same held-out values: the cells' log1p-normalised expression at the masked positions.

Decoding a model's bins back to expression uses the cell's own bin edges (``edges [N, K-1]``,
written by the ``bin`` stage). With ``K = n_bins`` and edges ``e_0 <= ... <= e_{K-2}`` (quantiles of
the cell's non-zero values, ``e_0`` its minimum, ``e_{K-2}`` its maximum), bin 0 holds the zeros,
bin ``k`` (``1 <= k <= K-2``) the values in ``[e_{k-1}, e_k)`` and bin ``K-1`` the maximum. Each bin's
representative value (:func:`bin_values`) is 0 for bin 0, the interval midpoint
``(e_{k-1} + e_k) / 2`` for ``1 <= k <= K-2``, and ``e_{K-2}`` for bin ``K-1``. A cross-entropy model's
prediction is the expectation of the representative values under its predicted bin distribution;
a regression model's predicted (real-valued) bin is mapped through the same values by linear
interpolation between neighbouring bins.

Metrics (:func:`weighted_metrics`; the bootstrap reuses it with resampling weights):

``expr_mse``, ``expr_pearson``
    over all masked positions; ``expr_mse_nonzero``, ``expr_pearson_nonzero`` over the masked
    positions whose true value is non-zero;
``expr_auroc_zero``
    AUROC of the predictor's non-zero score (the model: ``1 - P(bin 0)``; a baseline: its
    predicted value) for telling non-zero from zero true values;
``expr_gene_pearson``
    per gene, the Pearson correlation of predicted and true values across the masked test
    positions of that gene, averaged over the genes with at least 3 positions and non-constant
    values on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: Expression-space metrics, all computed on the same masked positions for every predictor.
EXPR_METRICS = (
    "expr_mse",
    "expr_pearson",
    "expr_mse_nonzero",
    "expr_pearson_nonzero",
    "expr_auroc_zero",
    "expr_gene_pearson",
)
#: Direction of each metric: True when lower is better.
LOWER_IS_BETTER = {
    "expr_mse": True,
    "expr_pearson": False,
    "expr_mse_nonzero": True,
    "expr_pearson_nonzero": False,
    "expr_auroc_zero": False,
    "expr_gene_pearson": False,
}


# ----------------------------------------------------------------------------- decoding
def bin_values(edges: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Representative log1p value of every bin of every cell.

    Args:
        edges: ``[*, K-1]`` per-cell bin edges (numpy or torch).

    Returns:
        ``[*, K]``: 0 for bin 0, the interval midpoint for bins ``1..K-2``, the last edge for
        bin ``K-1`` (same array library and float dtype as ``edges``).
    """
    if isinstance(edges, torch.Tensor):
        e = edges.float()
        zero = torch.zeros_like(e[..., :1])
        return torch.cat([zero, (e[..., :-1] + e[..., 1:]) / 2, e[..., -1:]], dim=-1)
    e = np.asarray(edges, dtype=np.float64)
    zero = np.zeros_like(e[..., :1])
    return np.concatenate([zero, (e[..., :-1] + e[..., 1:]) / 2, e[..., -1:]], axis=-1)


def decode_distribution(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Expected expression ``sum_k p_k v_k``: probs ``[*, K]``, values ``[*, K]`` -> ``[*]``."""
    return (probs.float() * values.float()).sum(-1)


def decode_bin_value(pred_bin: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A real-valued bin (regression head) mapped to expression by linear interpolation of the
    representative values: pred_bin ``[*]``, values ``[*, K]`` -> ``[*]``."""
    k = values.shape[-1]
    b = pred_bin.float().clamp(0, k - 1)
    lo = b.floor().long().clamp(max=k - 1)
    hi = (lo + 1).clamp(max=k - 1)
    frac = b - lo.float()
    v_lo = values.float().gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    v_hi = values.float().gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    return v_lo + frac * (v_hi - v_lo)


# ----------------------------------------------------------------------------- metrics
def pearson_from_sums(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float) -> float:
    """Pearson correlation from (weighted) sums; NaN when either side is constant or n < 2."""
    if n < 2:
        return math.nan
    vx = sxx - sx * sx / n
    vy = syy - sy * sy / n
    cov = sxy - sx * sy / n
    if vx <= 1e-12 * max(1.0, sxx) or vy <= 1e-12 * max(1.0, syy):
        return math.nan
    return float(cov / math.sqrt(vx * vy))


def moment_sums(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[n, sum x, sum y, sum x^2, sum y^2, sum xy]`` (float64) of two ``[M]`` tensors."""
    x, y = x.double(), y.double()
    return torch.stack(
        [
            x.new_tensor(float(x.numel())),
            x.sum(),
            y.sum(),
            (x * x).sum(),
            (y * y).sum(),
            (x * y).sum(),
        ]
    )


def metrics_from_sums(sums: dict[str, np.ndarray | torch.Tensor]) -> dict[str, float]:
    """``expr_mse``/``expr_pearson`` (+ ``_nonzero``) from :func:`moment_sums` of (pred, true)
    over all and over non-zero positions (keys ``all``, ``nonzero``): what validation all-reduces."""
    out: dict[str, float] = {}
    for key, suffix in (("all", ""), ("nonzero", "_nonzero")):
        n, sp, st, spp, stt, spt = (float(v) for v in sums[key])
        out[f"expr_mse{suffix}"] = (spp - 2 * spt + stt) / n if n > 0 else math.nan
        out[f"expr_pearson{suffix}"] = pearson_from_sums(n, sp, st, spp, stt, spt)
    return out


@dataclass
class Positions:
    """The masked test positions every predictor is scored on.

    Attributes:
        true: ``[M]`` true log1p expression.
        gene: ``[M]`` gene index.
        cell: ``[M]`` index of the test cell (0..n_cells-1) the position belongs to.
        n_cells: number of test cells (bootstrap unit).
    """

    true: np.ndarray
    gene: np.ndarray
    cell: np.ndarray
    n_cells: int

    def __post_init__(self) -> None:
        self.true = np.asarray(self.true, np.float64)
        self.gene = np.asarray(self.gene, np.int64)
        self.cell = np.asarray(self.cell, np.int64)
        self.nonzero = self.true > 0
        self.n_genes = int(self.gene.max()) + 1 if self.gene.size else 0


class Scorer:
    """Scores one predictor on :class:`Positions`, with or without per-cell weights.

    Args:
        pos: the masked positions.
        pred: ``[M]`` predicted expression.
        score: ``[M]`` non-zero score for the AUROC (defaults to ``pred``).
    """

    def __init__(self, pos: Positions, pred: np.ndarray, score: np.ndarray | None = None) -> None:
        self.pos = pos
        self.pred = np.asarray(pred, np.float64)
        s = self.pred if score is None else np.asarray(score, np.float64)
        # ties of the score are grouped once; AUROC per weighting is then O(M)
        order = np.argsort(s, kind="stable")
        _, group = np.unique(s[order], return_inverse=True)
        self._order = order
        self._group = group
        self._n_groups = int(group.max()) + 1 if group.size else 0

    def metrics(self, cell_weight: np.ndarray | None = None) -> dict[str, float]:
        """:data:`EXPR_METRICS` with each test cell counted ``cell_weight[c]`` times (None: once)."""
        pos = self.pos
        w = np.ones_like(pos.true) if cell_weight is None else cell_weight[pos.cell].astype(float)
        x, y = self.pred, pos.true
        out: dict[str, float] = {}
        for mask, suffix in ((None, ""), (pos.nonzero, "_nonzero")):
            wm = w if mask is None else w * mask
            n = wm.sum()
            if n <= 0:
                out[f"expr_mse{suffix}"] = out[f"expr_pearson{suffix}"] = math.nan
                continue
            out[f"expr_mse{suffix}"] = float((wm * (x - y) ** 2).sum() / n)
            out[f"expr_pearson{suffix}"] = pearson_from_sums(
                n,
                (wm * x).sum(),
                (wm * y).sum(),
                (wm * x * x).sum(),
                (wm * y * y).sum(),
                (wm * x * y).sum(),
            )
        out["expr_auroc_zero"] = self._auroc(w)
        out["expr_gene_pearson"] = self._gene_pearson(w, x, y)
        return out

    def _auroc(self, w: np.ndarray) -> float:
        pos_w = (w * self.pos.nonzero)[self._order]
        neg_w = (w * ~self.pos.nonzero)[self._order]
        wp = np.bincount(self._group, pos_w, self._n_groups)
        wn = np.bincount(self._group, neg_w, self._n_groups)
        tp, tn = wp.sum(), wn.sum()
        if tp <= 0 or tn <= 0:
            return math.nan
        below = np.cumsum(wn) - wn  # negative weight strictly below each score group
        return float((wp * (below + 0.5 * wn)).sum() / (tp * tn))

    def _gene_pearson(self, w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        g, k = self.pos.gene, self.pos.n_genes
        n = np.bincount(g, w, k)
        sx, sy = np.bincount(g, w * x, k), np.bincount(g, w * y, k)
        sxx, syy = np.bincount(g, w * x * x, k), np.bincount(g, w * y * y, k)
        sxy = np.bincount(g, w * x * y, k)
        with np.errstate(divide="ignore", invalid="ignore"):
            vx = sxx - sx * sx / n
            vy = syy - sy * sy / n
            cov = sxy - sx * sy / n
            ok = (n >= 3) & (vx > 1e-12 * np.maximum(1, sxx)) & (vy > 1e-12 * np.maximum(1, syy))
            r = cov[ok] / np.sqrt(vx[ok] * vy[ok])
        return float(r.mean()) if r.size else math.nan


def percentile_interval(
    draws: np.ndarray, estimate: float, level: float = 0.95
) -> dict[str, float]:
    """``{"value", "lo", "hi"}``: the percentile interval of bootstrap ``draws [B]`` around
    ``estimate``; no interval (NaN) when the estimate is not finite or fewer than
    ``max(10, B // 2)`` draws are."""
    ok = draws[np.isfinite(draws)]
    if ok.size < max(10, draws.size // 2) or not math.isfinite(estimate):
        return {"value": estimate, "lo": math.nan, "hi": math.nan}
    alpha = (1 - level) / 2
    lo, hi = np.quantile(ok, [alpha, 1 - alpha])
    return {"value": estimate, "lo": float(lo), "hi": float(hi)}


def bootstrap(
    scorers: dict[str, Scorer],
    n_cells: int,
    n_boot: int,
    seed: int,
    reference: str = "model",
    level: float = 0.95,
) -> dict[str, dict[str, dict[str, float]]]:
    """Seeded bootstrap over test cells: percentile intervals of every metric of every predictor
    and of the paired differences ``reference - other`` (same resamples for both).

    Returns ``{"<predictor>": {metric: {"value", "lo", "hi"}}, "diff:<other>": {...}}``; ``value``
    is the estimate on the original cells. Resamples: ``n_boot`` multinomial draws of ``n_cells``
    cells from ``np.random.default_rng(seed)``, so the same inputs give the same intervals.
    """
    point = {name: s.metrics() for name, s in scorers.items()}
    rng = np.random.default_rng(seed)
    draws = {name: {m: np.empty(n_boot) for m in EXPR_METRICS} for name in scorers}
    for b in range(n_boot):
        weight = rng.multinomial(n_cells, np.full(n_cells, 1.0 / n_cells))
        for name, s in scorers.items():
            for m, v in s.metrics(weight).items():
                draws[name][m][b] = v

    def interval(values: np.ndarray, estimate: float) -> dict[str, float]:
        return percentile_interval(values, estimate, level)

    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in scorers:
        out[name] = {m: interval(draws[name][m], point[name][m]) for m in EXPR_METRICS}
    if reference in scorers:
        for name in scorers:
            if name == reference:
                continue
            out[f"diff:{name}"] = {
                m: interval(
                    draws[reference][m] - draws[name][m], point[reference][m] - point[name][m]
                )
                for m in EXPR_METRICS
            }
    return out
