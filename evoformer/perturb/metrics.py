"""Metrics of perturbation-effect prediction on condition means, per condition and per subgroup.

Every metric compares a method's predicted mean log1p-normalised expression of a test condition,
``pred [G]``, with the observed mean of the condition's cells, ``true [G]``. References:
``ctrl`` = the mean of the training control cells; ``pert_ref`` = the mean over training
perturbation conditions of their means (Systema's reference). A condition's **own perturbed
genes are left out of every metric** (their change is reported apart:
``perturbed_gene_delta_true`` / ``_pred``, the mean over the perturbed genes of ``true - ctrl`` /
``pred - ctrl``); "the genes" below means the other genes. ``DE`` = the condition's top
``n_de`` DE genes (:mod:`evoformer.perturb.de`), its perturbed genes excluded.

``mse``, ``mse_de``
    mean over the genes (the DE genes) of ``(pred - true)^2``;
``pearson_delta``, ``pearson_delta_de``
    Pearson correlation over the genes (the DE genes) of ``pred - ctrl`` and ``true - ctrl``;
``de_sign``
    fraction of the DE genes with ``sign(pred - ctrl) == sign(true - ctrl)`` (GEARS's
    ``frac_correct_direction``; a zero change has sign 0);
``pearson_delta_pert``
    Pearson correlation over the genes of ``pred - pert_ref`` and ``true - pert_ref``: blind to
    a shift shared by all perturbed cells, which inflates ``pearson_delta`` (Systema);
``centroid_rank``, ``centroid_acc``
    among the ``C`` test conditions of the screen, with Euclidean distances over the genes
    perturbed in none of them: ``centroid_rank`` = the fraction of the other ``C - 1``
    conditions whose true mean is strictly closer to ``pred`` than the condition's own true
    mean (0 best, about 0.5 for a prediction unrelated to the condition); ``centroid_acc`` =
    1 when that fraction is 0, else 0. Undefined for ``C < 2``;
``pearson_interaction``
    doubles only: with ``s_A``, ``s_B`` the observed means of the two singles (all their cells,
    in whichever set; undefined when a single has no cells), the additive part
    ``add = (s_A - ctrl) + (s_B - ctrl)``; the Pearson correlation over the genes of the
    predicted interaction ``pred - ctrl - add`` and the true one ``true - ctrl - add``.

``truth_<metric>`` (synthetic screens): the same with the noise-free truth as the true mean,
``true = ctrl + delta`` (``delta`` from the generator) and, for the interaction, ``add =
delta - interaction`` (the noise-free single effects), so the true interaction is the
generator's interaction term. The DE genes are the same (ranked on the observed cells).

A metric that cannot be computed (a constant vector's correlation, a double without observed
singles, a method that gives no prediction) is NaN and counted as undefined, never 0.

**Subgroups** (:func:`summarise_subgroups`): per subgroup of test conditions (and ``all``), the
mean of each metric over its conditions where it is defined, with a seeded percentile bootstrap
over conditions (``n_boot`` multinomial resamples of the subgroup's conditions, drawn once per
subgroup so every method and metric sees the same resamples), and the paired difference
``method - strongest baseline``: the mean over the conditions where both are defined of the
per-condition differences, bootstrapped on the same resamples. A mean or difference defined on
fewer than :data:`MIN_INTERVAL_CONDITIONS` conditions gets no interval (a percentile bootstrap
over 2-4 units has a handful of distinct resamples and covers far less than 95%; no claim is
made from it). The strongest baseline of a
metric and subgroup is the competitor (:data:`~evoformer.perturb.baselines.COMPETITORS`, not the
oracle) with the best mean over the conditions where every competitor that is defined at all is
defined (:func:`strongest`): means over different conditions are not compared.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evoformer.metrics import pearson_from_sums, percentile_interval
from evoformer.perturb.conditions import condition_genes, n_perturbed
from evoformer.perturb.splits import HELD_OUT_SUBGROUPS as SUBGROUP_ORDER

METRICS = (
    "mse",
    "mse_de",
    "pearson_delta",
    "pearson_delta_de",
    "de_sign",
    "pearson_delta_pert",
    "centroid_rank",
    "centroid_acc",
    "pearson_interaction",
)
#: Direction of each metric: True when lower is better.
LOWER_IS_BETTER = {m: m in ("mse", "mse_de", "centroid_rank") for m in METRICS}
#: Metrics defined for doubles only (not counted as undefined for singles).
DOUBLES_ONLY = ("pearson_interaction",)
#: Prefix of the metrics against the noise-free truth.
TRUTH_PREFIX = "truth_"
#: The row over every test condition (subgroups come in SUBGROUP_ORDER, then alphabetically).
ALL = "all"
#: Fewest conditions (where the value, or both sides of a difference, are defined) that get a
#: bootstrap interval; fewer get none, so the tables claim no difference from them.
MIN_INTERVAL_CONDITIONS = 5
#: Columns of the subgroup table (:func:`summarise_subgroups` rows).
SUBGROUP_COLUMNS = (
    "subgroup",
    "method",
    "metric",
    "value",
    "lo",
    "hi",
    "n_conditions",
    "n_undefined",
    "best_baseline",
    "diff",
    "diff_lo",
    "diff_hi",
)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of ``[M]`` vectors; NaN for M < 2, a constant side or a NaN value
    (:func:`evoformer.metrics.pearson_from_sums`)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    return pearson_from_sums(x.size, x.sum(), y.sum(), x @ x, y @ y, x @ y)


@dataclass
class Reference:
    """What every method's predictions of the ``C`` test conditions are compared with.

    Attributes:
        conditions: ``[C]`` test conditions (canonical).
        genes: ``[G]`` gene symbols.
        true: ``[C, G]`` true means (observed, or ``ctrl + delta`` for the truth).
        ctrl: ``[G]`` mean of the training controls.
        pert_ref: ``[G]`` mean over training perturbation conditions of their means.
        de: ``C`` arrays of DE gene indices (most DE first, perturbed genes excluded).
        additive: ``[C, G]`` additive part of a double's change (module docstring), NaN rows
            for singles and doubles without it.
    """

    conditions: list[str]
    genes: list[str]
    true: np.ndarray
    ctrl: np.ndarray
    pert_ref: np.ndarray
    de: list[np.ndarray]
    additive: np.ndarray
    perturbed: list[np.ndarray] = field(init=False)
    keep: np.ndarray = field(init=False)
    centroid_genes: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        position = {g: i for i, g in enumerate(self.genes)}
        self.perturbed = [
            np.array([position[g] for g in condition_genes(c) if g in position], np.int64)
            for c in self.conditions
        ]
        self.keep = np.ones((len(self.conditions), len(self.genes)), bool)
        for i, p in enumerate(self.perturbed):
            self.keep[i, p] = False
        self.centroid_genes = (
            self.keep.all(0) if self.conditions else np.ones(len(self.genes), bool)
        )


def applicable(conditions: list[str]) -> dict[str, np.ndarray]:
    """``{metric: [C] bool}``: whether each metric applies to each condition (doubles-only)."""
    double = np.array([n_perturbed(c) == 2 for c in conditions], bool)
    every = np.ones(len(conditions), bool)
    return {m: double if m in DOUBLES_ONLY else every for m in METRICS}


def condition_metrics(pred: np.ndarray, ref: Reference) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` for each condition (module docstring).

    Args:
        pred: ``[C, G]`` predicted means of ``ref.conditions`` (NaN rows: no prediction).

    Returns:
        ``{metric: [C] float64}``, NaN where undefined or not applicable.
    """
    pred = np.asarray(pred, np.float64)
    n_cond = len(ref.conditions)
    out = {m: np.full(n_cond, np.nan) for m in METRICS}
    ok = np.isfinite(pred).all(1)
    for i in np.flatnonzero(ok):
        keep, de = ref.keep[i], ref.de[i]
        p, t = pred[i], ref.true[i]
        dp, dt = p - ref.ctrl, t - ref.ctrl
        out["mse"][i] = np.mean((p[keep] - t[keep]) ** 2) if keep.any() else math.nan
        out["pearson_delta"][i] = pearson(dp[keep], dt[keep])
        out["pearson_delta_pert"][i] = pearson((p - ref.pert_ref)[keep], (t - ref.pert_ref)[keep])
        if de.size:
            out["mse_de"][i] = np.mean((p[de] - t[de]) ** 2)
            out["pearson_delta_de"][i] = pearson(dp[de], dt[de])
            out["de_sign"][i] = np.mean(np.sign(dp[de]) == np.sign(dt[de]))
        add = ref.additive[i]
        if n_perturbed(ref.conditions[i]) == 2 and np.isfinite(add).all():
            out["pearson_interaction"][i] = pearson((dp - add)[keep], (dt - add)[keep])
    rank = centroid_ranks(pred, ref)
    out["centroid_rank"] = rank
    out["centroid_acc"] = np.where(np.isnan(rank), np.nan, (rank == 0).astype(np.float64))
    return out


def centroid_ranks(pred: np.ndarray, ref: Reference) -> np.ndarray:
    """``[C]`` fraction of the other conditions' true means strictly closer to ``pred[i]`` than
    ``ref.true[i]`` (Euclidean over ``ref.centroid_genes``); NaN for ``C < 2`` or no prediction."""
    n_cond = len(ref.conditions)
    rank = np.full(n_cond, np.nan)
    if n_cond < 2:
        return rank
    genes = ref.centroid_genes
    true = ref.true[:, genes]
    for i in range(n_cond):
        p = pred[i, genes]
        if not np.isfinite(p).all():
            continue
        dist = np.sqrt(((true - p) ** 2).sum(1))
        rank[i] = (np.delete(dist, i) < dist[i]).sum() / (n_cond - 1)
    return rank


def perturbed_gene_deltas(pred: np.ndarray, ref: Reference) -> tuple[np.ndarray, np.ndarray]:
    """``([C] true, [C] predicted)`` mean change (``- ctrl``) over each condition's own perturbed
    genes (NaN when none is measured)."""
    n_cond = len(ref.conditions)
    true, predicted = np.full(n_cond, np.nan), np.full(n_cond, np.nan)
    for i, p in enumerate(ref.perturbed):
        if p.size:
            true[i] = np.mean(ref.true[i, p] - ref.ctrl[p])
            predicted[i] = np.mean(pred[i, p] - ref.ctrl[p])
    return true, predicted


# ----------------------------------------------------------------------------- subgroups
def ordered_subgroups(subgroups: list[str]) -> list[str]:
    """The distinct subgroups in table order (:data:`SUBGROUP_ORDER`, then alphabetical)."""
    present = set(subgroups)
    known = [s for s in SUBGROUP_ORDER if s in present]
    return known + sorted(present - set(known))


def _weighted_means(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``[B]`` means of ``values [n]`` (NaN = left out) under resampling ``weights [B, n]``."""
    defined = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ np.where(defined, values, 0.0)) / (weights @ defined)


def _mean(values: np.ndarray) -> float:
    defined = values[np.isfinite(values)]
    return float(defined.mean()) if defined.size else math.nan


def strongest(
    values: dict[str, dict[str, np.ndarray]],
    metric: str,
    idx: np.ndarray,
    competitors: tuple[str, ...],
    sign: float,
) -> str | None:
    """The strongest baseline on ``metric`` over conditions ``idx``, compared on the same
    conditions: competitors undefined on every condition are out (e.g. a constant prediction's
    correlation); the others are ranked by their means over the conditions where all of them
    are defined (a method undefined on the hard conditions must not win on the easy ones).
    ``sign`` is +1 when lower is better. ``None`` when no competitor is defined anywhere."""
    cols = {m: values[m][metric][idx] for m in competitors if m in values}
    cols = {m: x for m, x in cols.items() if np.isfinite(x).any()}
    if not cols:
        return None
    common = np.logical_and.reduce([np.isfinite(x) for x in cols.values()])
    if not common.any():  # no condition where all are defined: each on its own conditions
        common = np.ones(len(idx), bool)
    means = {m: _mean(x[common]) for m, x in cols.items()}
    return min(means, key=lambda m: sign * means[m])


def _interval(w: np.ndarray, x: np.ndarray, estimate: float, level: float) -> dict[str, float]:
    """``{"value", "lo", "hi"}`` of the mean of ``x [C]`` over the bootstrap weights ``w [B, C]``;
    no interval (NaN) when fewer than :data:`MIN_INTERVAL_CONDITIONS` values are defined."""
    if np.isfinite(x).sum() < MIN_INTERVAL_CONDITIONS:
        return {"value": estimate, "lo": math.nan, "hi": math.nan}
    return percentile_interval(_weighted_means(w, x), estimate, level)


def summarise_subgroups(
    values: dict[str, dict[str, np.ndarray]],
    conditions: list[str],
    subgroups: list[str],
    competitors: tuple[str, ...],
    n_boot: int,
    seed: int,
    metrics: tuple[str, ...] = METRICS,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """Per subgroup (and ``all``), metric and method: the mean, its bootstrap interval and the
    paired difference with the strongest baseline (module docstring).

    Args:
        values: ``{method: {metric: [C]}}`` per-condition values (NaN = undefined).
        conditions: ``[C]`` the test conditions (for which metrics apply).
        subgroups: ``[C]`` subgroup of each condition.
        competitors: methods that may be the strongest baseline.
        n_boot: bootstrap resamples (0: no intervals).
        seed: the resamples of subgroup ``s`` come from ``default_rng([seed, crc32(s)])``.
        metrics: metric names; ``truth_<m>`` follows the direction and applicability of ``m``.

    Returns:
        Rows (dicts with the keys :data:`SUBGROUP_COLUMNS`), by subgroup, metric, method.
    """
    subgroups_arr = np.asarray(subgroups, dtype=object)
    applies = applicable(conditions)
    rows: list[dict[str, Any]] = []
    for sub in [*ordered_subgroups(list(subgroups)), ALL]:
        members = np.arange(len(conditions)) if sub == ALL else np.flatnonzero(subgroups_arr == sub)
        rng = np.random.default_rng([seed, zlib.crc32(sub.encode())])
        n = members.size
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
        for metric in metrics:
            base = metric.removeprefix(TRUTH_PREFIX)
            cols = np.flatnonzero(applies[base][members])
            if cols.size == 0:
                continue
            idx, w = members[cols], weights[:, cols]
            sign = 1.0 if LOWER_IS_BETTER[base] else -1.0
            point = {m: _mean(v[metric][idx]) for m, v in values.items()}
            best = strongest(values, metric, idx, competitors, sign)
            for method, v in values.items():
                x = v[metric][idx]
                row = {
                    "subgroup": sub,
                    "method": method,
                    "metric": metric,
                    **_interval(w, x, point[method], level),
                    "n_conditions": int(idx.size),
                    "n_undefined": int((~np.isfinite(x)).sum()),
                    "best_baseline": best,
                    "diff": math.nan,
                    "diff_lo": math.nan,
                    "diff_hi": math.nan,
                }
                if best is not None and method != best:
                    d = x - values[best][metric][idx]
                    ci = _interval(w, d, _mean(d), level)
                    row.update(diff=ci["value"], diff_lo=ci["lo"], diff_hi=ci["hi"])
                rows.append(row)
    return rows
