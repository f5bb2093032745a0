"""The perturbation benchmark of one screen: baselines (and models) on the test conditions.

:func:`evaluate_perturbation` reads the HVG h5ad (``X`` CSR log1p-normalised ``[N, G]``,
``obs.condition`` canonical, ``var`` index = gene symbols) and the perturbation split (per cell:
``cell_id``, ``condition``, ``set`` in train/val/test, ``subgroup``; read and checked by
:func:`evoformer.perturb.splits.read_split`), then

1. streams the per-group statistics (:mod:`evoformer.perturb.stats`): one group per
   perturbation condition (all its cells; a condition is wholly in one set) and ``ctrl`` = the
   **training** control cells only (validation and test control cells are not used);
2. ranks each condition's DE genes against the training controls (:mod:`evoformer.perturb.de`);
3. fits the baselines on the training conditions and training controls
   (:mod:`evoformer.perturb.baselines`) and predicts every test condition;
4. scores every method (the baselines, and the model predictions given) on every test condition
   (:mod:`evoformer.perturb.metrics`), also against the noise-free truth of a synthetic screen;
5. writes to ``out_dir`` (atomically, byte-identical for the same inputs and params):

``per_condition.tsv``
    one row per test condition and method: ``condition``, ``subgroup``, ``n_cells``,
    ``method``, every metric of :data:`~evoformer.perturb.metrics.METRICS` (then
    ``truth_<metric>`` with a truth), ``perturbed_gene_delta_true``,
    ``perturbed_gene_delta_pred`` (and ``perturbed_gene_delta_truth``, and for doubles
    ``truth_interaction_msq``: the mean square of the noise-free interaction term over the
    scored genes, the MSE that an additive model of exact singles makes);
``subgroups.tsv``
    :data:`~evoformer.perturb.metrics.SUBGROUP_COLUMNS`: per subgroup (and ``all``), method
    and metric, the mean over conditions with its 95% bootstrap interval, the number of
    conditions it applies to and of those where it is undefined, the strongest baseline and
    the paired difference ``method - strongest baseline`` with its interval;
``details.json``
    counts, the methods, the strongest baseline per subgroup and metric, every test
    condition's top DE genes, and for a few test conditions (``n_figure_conditions``, taken in
    turn from each subgroup, most cells first) the true and predicted changes (``- ctrl``) on
    its DE genes: what the figure of predicted against true change plots.

Values are rounded to 6 significant digits in the TSVs and the JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evoformer.errors import InputError
from evoformer.io import json_safe, write_text_atomic
from evoformer.perturb.baselines import BASELINES, COMPETITORS, TrainingMeans, fit_baselines
from evoformer.perturb.conditions import CONTROL, condition_genes, make_condition, n_perturbed
from evoformer.perturb.de import top_de_genes
from evoformer.perturb.metrics import (
    METRICS,
    SUBGROUP_COLUMNS,
    TRUTH_PREFIX,
    Reference,
    condition_metrics,
    ordered_subgroups,
    perturbed_gene_deltas,
    summarise_subgroups,
)
from evoformer.perturb.splits import read_split
from evoformer.perturb.stats import group_stats, read_hvg_obs
from evoformer.tables import write_tsv
from evoformer.typed import from_plain

log = logging.getLogger(__name__)


@dataclass
class PerturbEvalParams:
    """Settings of the perturbation evaluation.

    Attributes:
        n_de: DE genes per condition (GEARS: 20).
        n_bootstrap: bootstrap resamples of the conditions of a subgroup (0: no intervals).
        seed: seed of the bootstrap.
        linear_components: PCA dimensions ``K`` of the linear baseline (Ahlmann-Eltze: 10).
        linear_ridge: ridge penalty ``lambda`` of the linear baseline (Ahlmann-Eltze: 0.1).
        n_figure_conditions: test conditions whose changes ``details.json`` keeps for the figure.
    """

    n_de: int = 20
    n_bootstrap: int = 1000
    seed: int = 0
    linear_components: int = 10
    linear_ridge: float = 0.1
    n_figure_conditions: int = 4

    @classmethod
    def from_dict(
        cls, d: dict[str, Any] | None, where: str = "perturbation.evaluation"
    ) -> PerturbEvalParams:
        """Build from plain params; an unknown key or bad value raises InputError naming it."""
        p = from_plain(cls, d, where)
        p.validate(where)
        return p

    def validate(self, where: str = "perturbation.evaluation") -> None:
        def bad(key: str, what: str) -> InputError:
            return InputError(f"config key '{where}.{key}': got {getattr(self, key)!r}, {what}")

        for key in ("n_de", "linear_components"):
            if getattr(self, key) < 1:
                raise bad(key, "expected a positive integer")
        for key in ("n_bootstrap", "seed", "n_figure_conditions"):
            if getattr(self, key) < 0:
                raise bad(key, "expected an integer >= 0")
        if not (math.isfinite(self.linear_ridge) and self.linear_ridge > 0):
            raise bad("linear_ridge", "expected a number > 0")


# ----------------------------------------------------------------------------- inputs
def read_truth(
    path: str | os.PathLike, genes: list[str], conditions: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The noise-free ``delta`` and ``interaction`` of ``conditions``, on ``genes``.

    Args:
        path: ``<stem>_truth.npz`` with ``conditions [C]``, ``genes [G']``, ``delta [C, G']``,
            ``interaction [C, G']`` (NaN for non-doubles).
        genes: ``[G]`` the evaluated genes (each must be in the truth's genes).

    Returns:
        ``({condition: delta [G]}, {condition: interaction [G]})`` for ``conditions``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("conditions", "genes", "delta", "interaction") if k not in z]
        if missing:
            raise InputError(f"{path}: missing arrays {', '.join(missing)}")
        t_cond = [str(c) for c in z["conditions"]]
        t_genes = [str(g) for g in z["genes"]]
        delta, interaction = z["delta"], z["interaction"]
    if delta.shape != (len(t_cond), len(t_genes)) or interaction.shape != delta.shape:
        raise InputError(f"{path}: delta/interaction are not [conditions, genes]")
    gpos = {g: i for i, g in enumerate(t_genes)}
    absent = [g for g in genes if g not in gpos]
    if absent:
        raise InputError(f"{path}: genes absent from the truth: {', '.join(absent[:10])}")
    cpos = {c: i for i, c in enumerate(t_cond)}
    absent = [c for c in conditions if c not in cpos]
    if absent:
        raise InputError(f"{path}: conditions absent from the truth: {', '.join(absent[:10])}")
    cols = np.array([gpos[g] for g in genes], np.int64)
    d = {c: np.asarray(delta[cpos[c], cols], np.float64) for c in conditions}
    i = {c: np.asarray(interaction[cpos[c], cols], np.float64) for c in conditions}
    return d, i


def _aligned_prediction(
    name: str, frame: Any, conditions: list[str], genes: list[str]
) -> np.ndarray:
    """A model's ``[C_test, G]`` from a DataFrame indexed by condition with gene columns."""
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"predictions[{name!r}]: expected a DataFrame (conditions x genes)")
    lack_c = [c for c in conditions if c not in frame.index]
    lack_g = [g for g in genes if g not in frame.columns]
    if lack_c or lack_g:
        what = lack_c[:5] or lack_g[:5]
        kind = "test conditions" if lack_c else "genes"
        raise InputError(f"predictions[{name!r}]: missing {kind} {', '.join(what)}")
    return frame.loc[conditions, genes].to_numpy(np.float64)


# ----------------------------------------------------------------------------- driver
def _check_cells(
    hvg_path: Path, split_path: Path, cells: list[str], conds: list[str], split: pd.DataFrame
) -> pd.DataFrame:
    """The split rows in h5ad order (every h5ad cell in the split, same conditions)."""
    by_id = split.set_index("cell_id")
    unknown = split.loc[~split["cell_id"].isin(set(cells)), "cell_id"]
    if len(unknown):
        raise InputError(
            f"{split_path}: {len(unknown)} cells not in {hvg_path} (e.g. {unknown.iloc[0]!r})"
        )
    absent = [c for c in cells if c not in by_id.index]
    if absent:
        raise InputError(
            f"{split_path}: {len(absent)} cells of {hvg_path} missing (e.g. {absent[0]!r})"
        )
    rows = by_id.loc[cells]
    differ = np.flatnonzero(rows["condition"].to_numpy() != np.asarray(conds, dtype=object))
    if differ.size:
        i = differ[0]
        raise InputError(
            f"{split_path}: cell {cells[i]!r} has condition {rows['condition'].iloc[i]!r}, "
            f"but {conds[i]!r} in {hvg_path}"
        )
    return rows


def _check_conditions(path: Path, conditions: list[str], genes: list[str]) -> None:
    gene_set = set(genes)
    for c in conditions:
        try:
            canonical = make_condition(condition_genes(c))
        except InputError as exc:
            raise InputError(f"{path}: condition {c!r}: {exc}") from None
        if canonical != c:
            raise InputError(f"{path}: condition {c!r} is not canonical (expected {canonical!r})")
    unmeasured = sorted({g for c in conditions for g in condition_genes(c)} - gene_set)
    if unmeasured:
        raise InputError(
            f"{path}: perturbed genes not among the genes: {', '.join(unmeasured[:10])}"
        )


def evaluate_perturbation(
    hvg_h5ad: str | os.PathLike,
    split_tsv: str | os.PathLike,
    out_dir: str | os.PathLike,
    params: PerturbEvalParams | dict[str, Any] | None = None,
    truth_npz: str | os.PathLike | None = None,
    predictions: Mapping[str, pd.DataFrame] | None = None,
) -> dict[str, Any]:
    """Score the baselines (and ``predictions``) on the test conditions (module docstring).

    Args:
        hvg_h5ad: the HVG h5ad.
        split_tsv: the perturbation split.
        out_dir: where ``per_condition.tsv``, ``subgroups.tsv`` and ``details.json`` go.
        params: :class:`PerturbEvalParams` or its plain dict.
        truth_npz: the synthetic screen's noise-free truth (adds ``oracle`` and ``truth_*``).
        predictions: ``{method: DataFrame [conditions, genes]}`` predicted means (log1p space)
            of at least every test condition, on at least every gene.

    Returns:
        The content of ``details.json``.
    """
    p = params if isinstance(params, PerturbEvalParams) else PerturbEvalParams.from_dict(params)
    hvg_path, split_path, out_dir = Path(hvg_h5ad), Path(split_tsv), Path(out_dir)
    cells, conds, genes = read_hvg_obs(hvg_path)
    rows = _check_cells(hvg_path, split_path, cells, conds, read_split(split_path))
    sets = rows["set"].to_numpy()
    conds_arr = np.asarray(conds, dtype=object)

    perturbed = sorted(set(conds) - {CONTROL})
    _check_conditions(hvg_path, perturbed, genes)
    train_ctrl = (conds_arr == CONTROL) & (sets == "train")
    if not train_ctrl.any():
        raise InputError(f"{split_path}: no training control cells")
    first = rows[conds_arr != CONTROL].groupby("condition", sort=True).first()
    cond_set = first["set"].to_dict()
    subgroup_of = first["subgroup"].to_dict()
    train = [c for c in perturbed if cond_set[c] == "train"]
    test = [c for c in perturbed if cond_set[c] == "test"]
    if not train:
        raise InputError(f"{split_path}: no training perturbation conditions")
    if not test:
        raise InputError(f"{split_path}: no test perturbation conditions")

    # 1. statistics: every perturbation condition, and ctrl = the training controls
    names = [CONTROL, *perturbed]
    index = {c: i for i, c in enumerate(names)}
    labels = np.array([index[c] for c in conds], np.int64)
    labels[(conds_arr == CONTROL) & ~train_ctrl] = -1
    stats = group_stats(hvg_path, labels, names)
    log.info(
        "%s: %d training controls, %d training / %d test conditions, %d genes",
        hvg_path,
        stats.n[0],
        len(train),
        len(test),
        len(genes),
    )
    mean_of = {c: stats.mean[index[c]] for c in names}
    n_cells = {c: int(stats.n[index[c]]) for c in names}

    # 2. DE genes; 3. baselines
    de = top_de_genes(stats, genes, p.n_de)
    training = TrainingMeans(genes, mean_of[CONTROL], train, np.stack([mean_of[c] for c in train]))
    truth_delta = truth_inter = None
    if truth_npz is not None:
        truth_delta, truth_inter = read_truth(truth_npz, genes, test)
    methods = fit_baselines(training, p.linear_components, p.linear_ridge, truth_delta)
    preds = {name: m.predict(test) for name, m in methods.items()}
    for name, frame in (predictions or {}).items():
        if name in BASELINES:
            raise InputError(f"predictions[{name!r}]: the name of a baseline")
        preds[name] = _aligned_prediction(name, frame, test, genes)
    order = [*(predictions or {}), *methods]

    # 4. metrics, observed and noise-free
    ctrl = training.ctrl
    additive = np.full((len(test), len(genes)), np.nan)
    for i, c in enumerate(test):
        singles = condition_genes(c)
        if len(singles) == 2 and all(g in mean_of for g in singles):
            additive[i] = sum(mean_of[g] - ctrl for g in singles)
    common = dict(conditions=test, genes=genes, ctrl=ctrl, pert_ref=training.pert_ref)
    common["de"] = [de[c] for c in test]
    refs = {"": Reference(true=np.stack([mean_of[c] for c in test]), additive=additive, **common)}
    if truth_delta is not None and truth_inter is not None:
        t_add = np.full_like(additive, np.nan)
        for i, c in enumerate(test):
            if n_perturbed(c) == 2:
                t_add[i] = truth_delta[c] - truth_inter[c]
        true = ctrl + np.stack([truth_delta[c] for c in test])
        refs[TRUTH_PREFIX] = Reference(true=true, additive=t_add, **common)
    metric_names = [f"{prefix}{m}" for prefix in refs for m in METRICS]
    values: dict[str, dict[str, np.ndarray]] = {}
    extra: dict[str, dict[str, np.ndarray]] = {}
    for name in order:
        values[name], extra[name] = {}, {}
        for prefix, ref in refs.items():
            for m, v in condition_metrics(preds[name], ref).items():
                values[name][prefix + m] = v
            d_true, d_pred = perturbed_gene_deltas(preds[name], ref)
            extra[name]["perturbed_gene_delta_pred"] = d_pred
            extra[name]["perturbed_gene_delta_truth" if prefix else "perturbed_gene_delta_true"] = (
                d_true
            )

    # 5. tables
    subgroups = [subgroup_of[c] for c in test]
    extra_cols = ["perturbed_gene_delta_true", "perturbed_gene_delta_pred"]
    interaction_msq = {}
    if truth_delta is not None and truth_inter is not None:
        extra_cols.append("perturbed_gene_delta_truth")
        # the noise-free interaction's mean square over the scored genes: what additivity
        # costs on a double even with exact singles (the MSE of ctrl + delta_A + delta_B)
        for c in test:
            keep = np.array([g not in condition_genes(c) for g in genes])
            msq = np.mean(truth_inter[c][keep] ** 2) if n_perturbed(c) == 2 else math.nan
            interaction_msq[c] = msq
    table = []
    for i, c in enumerate(test):
        for name in order:
            row = {"condition": c, "subgroup": subgroups[i], "n_cells": n_cells[c], "method": name}
            row.update({m: values[name][m][i] for m in metric_names})
            row.update({k: extra[name][k][i] for k in extra_cols})
            if interaction_msq:
                row["truth_interaction_msq"] = interaction_msq[c]
            table.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    fact_cols = ["truth_interaction_msq"] if interaction_msq else []
    write_tsv(
        out_dir / "per_condition.tsv",
        ["condition", "subgroup", "n_cells", "method", *metric_names, *extra_cols, *fact_cols],
        table,
    )
    summary = summarise_subgroups(
        values, test, subgroups, COMPETITORS, p.n_bootstrap, p.seed, tuple(metric_names)
    )
    write_tsv(out_dir / "subgroups.tsv", list(SUBGROUP_COLUMNS), summary)

    strongest: dict[str, dict[str, str | None]] = {}
    for r in summary:
        strongest.setdefault(r["subgroup"], {})[r["metric"]] = r["best_baseline"]
    details = {
        "params": asdict(p),
        "n_genes": len(genes),
        "n_train_control_cells": int(stats.n[0]),
        "train_conditions": train,
        "test_conditions": dict(zip(test, subgroups, strict=True)),
        "methods": order,
        "metrics": metric_names,
        "strongest_baseline": strongest,
        "de_genes": {c: [genes[j] for j in de[c]] for c in test},
        "figure": _figure(test, subgroups, n_cells, de, genes, ctrl, refs, preds, order, p),
    }
    write_text_atomic(
        out_dir / "details.json", json.dumps(json_safe(details, 6), indent=1, sort_keys=True) + "\n"
    )
    return details


def _figure(
    test: list[str],
    subgroups: list[str],
    n_cells: dict[str, int],
    de: dict[str, np.ndarray],
    genes: list[str],
    ctrl: np.ndarray,
    refs: dict[str, Reference],
    preds: dict[str, np.ndarray],
    order: list[str],
    p: PerturbEvalParams,
) -> list[dict[str, Any]]:
    """True and predicted changes on the DE genes of up to ``n_figure_conditions`` test
    conditions, taken in turn from each subgroup (most cells first, then by name)."""
    queues = {
        s: sorted(
            (c for c, sub in zip(test, subgroups, strict=True) if sub == s),
            key=lambda c: (-n_cells[c], c),
        )
        for s in ordered_subgroups(subgroups)
    }
    chosen: list[str] = []
    while len(chosen) < min(p.n_figure_conditions, len(test)):
        for s in queues:
            if queues[s] and len(chosen) < p.n_figure_conditions:
                chosen.append(queues[s].pop(0))
    position = {c: i for i, c in enumerate(test)}
    out = []
    for c in chosen:
        i, idx = position[c], de[c]
        entry: dict[str, Any] = {
            "condition": c,
            "subgroup": subgroups[i],
            "genes": [genes[j] for j in idx],
            "true_delta": (refs[""].true[i, idx] - ctrl[idx]).tolist(),
            "pred_delta": {m: (preds[m][i, idx] - ctrl[idx]).tolist() for m in order},
        }
        if TRUTH_PREFIX in refs:
            entry["truth_delta"] = (refs[TRUTH_PREFIX].true[i, idx] - ctrl[idx]).tolist()
        out.append(entry)
    return out
