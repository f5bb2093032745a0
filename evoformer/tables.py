"""Result tables and plots of a sweep: the numbers the workflow exists to produce.

Input: one *record* per trained model (a plain dict the ``tables`` rule builds)::

    {"id": "n_hvg~64/n_bins~11/ln_order~pre",     # readable experiment id (Paramspace path)
     "n_hvg": 64, "n_bins": 11, "ln_order": "pre", # one entry per sweep key
     "fold": 0,                                     # k >= 0 (CV fold), -1 / "holdout", "final"
     "eval_metrics": ".../eval/eval_metrics.json",  # evoformer.evaluate output   (optional)
     "performance_summary": ".../train/performance_summary.json",            # (optional)
     "train_metrics": ".../train/metrics.tsv",      # train/val curves          (optional)
     "config_hash": "...",  or  "spec": {...}}      # provenance (optional, see below)

Outputs:

* ``metrics.tsv``: one row per record: id, sweep keys, fold, the last validation metrics of
  training (``val_*``), the last logged training loss, the test metrics of the model and of its
  baselines side by side (``model_*`` / ``baseline_*``, ``probe_{cls,mean,pca}_*``), provenance.
* ``cv_summary.tsv``: one row per grid point: mean and standard deviation (ddof 1) over its CV
  folds of the *validation* metrics, its rank and whether it is ``selected`` (best mean of the
  selection metric). Test metrics are never read for it. Without CV folds, the holdout runs
  stand in (one "fold", std NA).
* ``performance.tsv``: speed, achieved model TFLOP/s and share of the devices' peak
  (:mod:`evoformer.flops`), step times and peak memory per record: measurements that vary from
  run to run, kept out of the two tables above.
* ``summary.md``: per evaluated model and expression-space metric, the model, the strongest
  baseline and their difference with its 95% bootstrap interval, and which is better, in
  sentences; then the CV selection.
* ``metric_vs_key.png`` (selection metric vs each sweep key, CV error bars) and
  ``learning_curves.png`` (training and validation loss of every run overlaid).

Byte-identical reruns: rows sorted by (sweep key values, fold, id) whatever the record order,
fixed number formatting (``%.6g``, ``NA`` for missing), no timestamps, hostnames or timings in
``metrics.tsv`` / ``cv_summary.tsv``.

Provenance columns: ``config_hash`` (the record's ``config_hash``, else the hash of its
``spec``, else of the resolved config in ``performance_summary.json``), ``evoformer_version`` and
``scanpy`` (from the evaluation's ``versions``), ``git_commit`` (given by the caller: this module
never runs git), ``torch`` and ``device`` (of the training run, ``performance_summary.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import evoformer
from evoformer.errors import InputError
from evoformer.flops.peaks import THROUGHPUT_FIELDS
from evoformer.io import atomic_path, write_text_atomic

log = logging.getLogger("evoformer.tables")

PROVENANCE_COLUMNS = ("config_hash", "evoformer_version", "git_commit", "torch", "scanpy", "device")
PERFORMANCE_FIELDS = (
    "total_samples",
    "total_steps",
    "average_speed_samples_per_s",
    *THROUGHPUT_FIELDS,
    "average_batch_time_ms",
    "average_forward_time_ms",
    "average_backward_time_ms",
    "average_optimizer_time_ms",
    "peak_memory_bytes",
    "peak_memory_mb",
    "peak_memory_source",
    "precision",
    "compile",
    "grad_accumulation",
    "final_loss",
    "n_parameters",
    "selected_step",
    "stopped_early",
    "n_nonfinite_steps",
)
SYSTEM_FIELDS = ("world_size", "hostname", "slurm_job_id")
OUTPUT_NAMES = {
    "summary": "summary.md",
    "metrics": "metrics.tsv",
    "cv_summary": "cv_summary.tsv",
    "performance": "performance.tsv",
    "metric_plot": "metric_vs_key.png",
    "learning_curves": "learning_curves.png",
}


# ----------------------------------------------------------------------------- records
@dataclass
class Record:
    """One trained model with everything read from its files."""

    id: str
    point: dict[str, Any]  # sweep key -> value
    fold: int | str  # k >= 0, "holdout" or "final"
    eval: dict[str, Any] = field(default_factory=dict)  # eval_metrics.json
    perf: dict[str, Any] = field(default_factory=dict)  # performance_summary.json
    curves: pd.DataFrame | None = None  # train metrics.tsv
    config_hash: str = "unknown"

    @property
    def is_cv(self) -> bool:
        return isinstance(self.fold, int)

    def val_metrics(self) -> dict[str, float]:
        """The last validation row of training (``val_*`` columns); {} without validation."""
        if self.curves is None or "kind" not in self.curves:
            return {}
        val = self.curves[self.curves["kind"] == "val"]
        if val.empty:
            return {}
        last = val.sort_values("step", kind="stable").iloc[-1]
        cols = [c for c in self.curves.columns if c.startswith("val_")]
        return {c: as_float(last[c]) for c in cols}

    def train_loss(self) -> float:
        """The last logged training loss (NaN when there is no curve)."""
        if self.curves is None or "kind" not in self.curves:
            return math.nan
        tr = self.curves[self.curves["kind"] == "train"]
        return (
            as_float(tr.sort_values("step", kind="stable")["loss"].iloc[-1])
            if len(tr)
            else math.nan
        )


def normalise_fold(fold: Any, where: str) -> int | str:
    """``k >= 0`` -> k; ``-1`` / ``"holdout"`` / None -> ``"holdout"``; ``"final"`` -> ``"final"``."""
    if fold is None or fold == "holdout" or (isinstance(fold, int | np.integer) and fold == -1):
        return "holdout"
    if fold == "final":
        return "final"
    try:
        k = int(fold)
    except (TypeError, ValueError):
        raise InputError(
            f"{where}: fold {fold!r} is not an int >= -1, 'holdout' or 'final'"
        ) from None
    if k < -1 or str(k) != str(fold).strip():
        raise InputError(f"{where}: fold {fold!r} is not an int >= -1, 'holdout' or 'final'")
    return "holdout" if k == -1 else k


def _read_json(path: Any, what: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: {what} not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: {what} is not valid JSON ({e.msg} at line {e.lineno})") from e


def config_hash(obj: Any) -> str:
    """Short, stable hash of a plain-typed object (same definition as evoformer.experiments)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_records(records: list[dict[str, Any]], sweep_keys: list[str]) -> list[Record]:
    """Read the files of every record; sorted by (sweep key values, fold, id).

    Raises ``InputError`` for a record without ``id``/``fold``/a sweep key, a duplicate
    (id, fold), or a file that is missing or unreadable.
    """
    out: list[Record] = []
    seen: set[tuple[str, str]] = set()
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "id" not in r:
            raise InputError(f"tables record {i}: needs an 'id'")
        where = f"tables record {r['id']!r}"
        if "fold" not in r:
            raise InputError(f"{where}: needs a 'fold'")
        missing = [k for k in sweep_keys if k not in r]
        if missing:
            raise InputError(f"{where}: missing sweep key(s) {missing}")
        fold = normalise_fold(r["fold"], where)
        key = (str(r["id"]), str(fold))
        if key in seen:
            raise InputError(f"{where}: fold {fold} listed twice")
        seen.add(key)
        rec = Record(id=str(r["id"]), point={k: _plain(r[k]) for k in sweep_keys}, fold=fold)
        if r.get("eval_metrics"):
            rec.eval = _read_json(r["eval_metrics"], "evaluation metrics")
            if not isinstance(rec.eval.get("metrics"), dict):
                raise InputError(
                    f"{r['eval_metrics']}: no 'metrics' object (evoformer.evaluate output?)"
                )
        if r.get("performance_summary"):
            rec.perf = _read_json(r["performance_summary"], "performance summary")
        if r.get("train_metrics"):
            p = Path(r["train_metrics"])
            if not p.is_file():
                raise InputError(f"{p}: training metrics not found")
            try:
                rec.curves = pd.read_csv(p, sep="\t")
            except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
                raise InputError(f"{p}: cannot read training metrics ({e})") from e
            if not {"kind", "step"} <= set(rec.curves.columns):
                raise InputError(f"{p}: training metrics need columns 'kind' and 'step'")
        if r.get("config_hash"):
            rec.config_hash = str(r["config_hash"])
        elif r.get("spec") is not None:
            rec.config_hash = config_hash(r["spec"])
        elif rec.perf.get("config") is not None:
            rec.config_hash = config_hash(rec.perf["config"])
        out.append(rec)
    return sorted(out, key=lambda x: (_point_key(x.point, sweep_keys), _fold_key(x.fold), x.id))


# ----------------------------------------------------------------------------- formatting
def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def as_float(v: Any) -> float:
    """A table cell as a float (NaN for missing or non-numeric values)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _value_key(v: Any) -> tuple:
    """Total order over mixed sweep values: None < numbers (by value) < strings / bools."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return (0, 0.0, "")
    if isinstance(v, int | float) and not isinstance(v, bool):
        return (1, float(v), "")
    return (2, 0.0, str(v))


def _point_key(point: dict[str, Any], keys: list[str]) -> tuple:
    return tuple(_value_key(point[k]) for k in keys)


def _fold_key(fold: int | str) -> tuple:
    return (0, fold) if isinstance(fold, int) else (1 if fold == "holdout" else 2, 0)


def fmt(v: Any) -> str:
    """One TSV cell: ``%.6g`` floats, ``NA`` for None/NaN, ``true``/``false``, no tabs/newlines."""
    v = _plain(v)
    if v is None:
        return "NA"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "NA" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, dict | list):
        v = json.dumps(v, sort_keys=True)
    return " ".join(str(v).split()) if str(v) else "NA"


def write_tsv(path: str | os.PathLike, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts) as a TSV with a header, cells formatted by :func:`fmt`, atomically."""
    lines = ["\t".join(columns)]
    lines += ["\t".join(fmt(row.get(c)) for c in columns) for row in rows]
    write_text_atomic(path, "\n".join(lines) + "\n")


def _union(keys: list[list[str]]) -> list[str]:
    out: list[str] = []
    for ks in keys:
        out += [k for k in ks if k not in out]
    return out


def provenance_of(rec: Record, provenance: dict[str, Any]) -> dict[str, Any]:
    """The provenance columns of one record (see the module docstring)."""
    versions = rec.eval.get("versions") or {}
    system = rec.perf.get("system") or {}
    return {
        "config_hash": rec.config_hash,
        "evoformer_version": versions.get("evoformer")
        or provenance.get("evoformer_version")
        or evoformer.__version__,
        "git_commit": provenance.get("git_commit") or "unknown",
        "torch": system.get("torch")
        or versions.get("torch")
        or provenance.get("torch")
        or "unknown",
        "scanpy": versions.get("scanpy") or provenance.get("scanpy") or "unknown",
        "device": system.get("device") or provenance.get("device") or "unknown",
    }


# ----------------------------------------------------------------------------- tables
def metrics_table(
    recs: list[Record], sweep_keys: list[str], provenance: dict[str, Any]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of ``metrics.tsv`` (``recs`` already sorted)."""
    val_cols = _union([sorted(r.val_metrics()) for r in recs])
    eval_cols = _union([list(r.eval.get("metrics", {})) for r in recs])
    rows = []
    for r in recs:
        row: dict[str, Any] = {"id": r.id, **r.point, "fold": r.fold}
        row["n_parameters"] = r.perf.get("n_parameters")
        row["selected_step"] = r.perf.get("selected_step")
        row.update(r.val_metrics())
        row["train_loss"] = r.train_loss()
        row.update(r.eval.get("metrics", {}))
        row.update(provenance_of(r, provenance))
        rows.append(row)
    eval_cols = [c for c in eval_cols if c not in ("n_parameters",)]
    cols = [
        "id",
        *sweep_keys,
        "fold",
        "n_parameters",
        "selected_step",
        *val_cols,
        "train_loss",
        *eval_cols,
        *PROVENANCE_COLUMNS,
    ]
    return cols, rows


def performance_table(
    recs: list[Record], sweep_keys: list[str], provenance: dict[str, Any]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of ``performance.tsv``: measurements of each training run."""
    rows = []
    for r in recs:
        system = r.perf.get("system") or {}
        row: dict[str, Any] = {"id": r.id, **r.point, "fold": r.fold}
        row.update({k: r.perf.get(k) for k in PERFORMANCE_FIELDS})
        row.update({k: system.get(k) for k in SYSTEM_FIELDS})
        row.update(provenance_of(r, provenance))
        rows.append(row)
    cols = ["id", *sweep_keys, "fold", *PERFORMANCE_FIELDS, *SYSTEM_FIELDS, *PROVENANCE_COLUMNS]
    return cols, rows


def lower_is_better(metric: str) -> bool:
    """Direction of a selection metric: losses and errors are minimised, the rest maximised."""
    tokens = set(metric.lower().replace("-", "_").split("_"))
    return bool(tokens & {"loss", "error", "mse", "mre", "ce", "nll"})


# ----------------------------------------------------------------------------- summary
METRIC_NAMES = {
    "expr_mse": "masked expression MSE (all masked values)",
    "expr_mse_nonzero": "masked expression MSE on non-zero values",
    "expr_pearson": "Pearson correlation of predicted and true masked values",
    "expr_pearson_nonzero": "Pearson correlation on non-zero masked values",
    "expr_auroc_zero": "AUROC for telling zero from non-zero masked values",
    "expr_gene_pearson": "per-gene Pearson correlation across test cells (mean over genes)",
}
BASELINE_NAMES = {
    "mean": "the per-gene mean of the training cells",
    "ridge": "ridge co-expression (each gene from the cell's other genes)",
    "knn": "kNN (mean of the nearest training cells on the observed genes)",
}


def _g4(v: Any) -> str:
    v = as_float(v)
    return "NA" if math.isnan(v) else f"{v:.4g}"


def _ci(m: dict[str, Any], key: str) -> str:
    lo, hi = as_float(m.get(f"{key}_lo")), as_float(m.get(f"{key}_hi"))
    if math.isnan(lo) or math.isnan(hi):
        return "no interval"
    return f"95% CI {lo:.4g} to {hi:.4g}"


def verdict(diff_lo: float, diff_hi: float, lower_better: bool) -> str:
    """Which side a paired difference (model - baseline) and its interval favour."""
    if math.isnan(diff_lo) or math.isnan(diff_hi):
        return "undecided (no interval)"
    model_better = diff_hi < 0 if lower_better else diff_lo > 0
    base_better = diff_lo > 0 if lower_better else diff_hi < 0
    if model_better:
        return "the model is better"
    if base_better:
        return "the baseline is better"
    return "no clear difference (the interval includes 0)"


def _verdicts(m: dict[str, Any]) -> tuple[int, int, int]:
    """(wins, losses, metrics) of the model against the strongest baseline in ``m``."""
    from evoformer.metrics import EXPR_METRICS, LOWER_IS_BETTER

    wins = losses = n = 0
    for metric in EXPR_METRICS:
        if f"model_{metric}" not in m:
            continue
        v = verdict(
            as_float(m.get(f"diff_{metric}_lo")),
            as_float(m.get(f"diff_{metric}_hi")),
            LOWER_IS_BETTER[metric],
        )
        n += 1
        wins += v == "the model is better"
        losses += v == "the baseline is better"
    return wins, losses, n


def _in_short(r: Record, recs: list[Record], sweep_keys: list[str]) -> str:
    """The opening sentences: what was compared, on how many cells, who won, where next."""
    d = r.eval.get("details") or {}
    n_points = len({_point_key(x.point, sweep_keys) for x in recs})
    n_train, n_test = d.get("n_train_cells"), d.get("n_test_cells")
    wins, losses, n = _verdicts(r.eval["metrics"])
    if wins and not losses:
        outcome = f"The model beats the strongest baseline on {wins} of the {n} metrics."
    elif losses and not wins:
        outcome = (
            f"The strongest baseline beats the model on {losses} of the {n} metrics: on this "
            "data the model does not predict masked expression better than a simple baseline."
        )
    else:
        outcome = (
            f"The model beats the strongest baseline on {wins} of the {n} metrics, loses on "
            f"{losses} and ties on the rest."
        )
    grid = (
        f"{n_points} model configurations ({', '.join(sweep_keys)})"
        if n_points > 1 and sweep_keys
        else "one model configuration"
    )
    return (
        f"**In short.** BioFormer models learned to predict the expression of masked genes in "
        f"single cells: {grid}, the best chosen on validation cells only, then tested on "
        f"{fmt(n_test)} held-out cells (trained on {fmt(n_train)}) against three baselines that "
        f"need no deep learning (each gene's mean, a ridge regression on the cell's other genes, "
        f"the nearest training cells). {outcome} The details follow; the published experiments "
        "are in `configs/` and their results in `RESULTS.md`."
    )


def summary_markdown(
    recs: list[Record],
    sweep_keys: list[str],
    cv_rows: list[dict[str, Any]],
    selection_metric: str,
    provenance: dict[str, Any],
) -> str:
    """``summary.md``: what the tables say, in sentences (see the module docstring)."""
    from evoformer.metrics import EXPR_METRICS, LOWER_IS_BETTER

    evaluated = [r for r in recs if r.eval.get("metrics")]
    lines = [
        "# Results summary",
        "",
        *([_in_short(evaluated[0], recs, sweep_keys), ""] if evaluated else []),
        f"Commit `{provenance.get('git_commit') or 'unknown'}`. Every number is on held-out test "
        "cells, on the same masked positions for the model and the baselines (log1p expression); "
        "intervals are 95% bootstrap intervals over test cells, differences are paired "
        "(model minus baseline). Baselines are fitted on the model's training cells only.",
        "",
    ]
    if not evaluated:
        lines.append("No model was evaluated on the test cells.")
    for r in evaluated:
        m = r.eval["metrics"]
        where = (
            "final retrain of the CV-selected grid point" if r.fold == "final" else "holdout run"
        )
        lines += [f"## {_label(r.point, sweep_keys)} ({where})", ""]
        n_params = m.get("n_parameters")
        lines.append(
            f"{int(as_float(m.get('n_masked')) or 0)} masked values in the test cells "
            f"({int(as_float(m.get('n_masked_nonzero')) or 0)} non-zero); model parameters: "
            f"{fmt(n_params)}."
        )
        lines.append("")
        wins = losses = 0
        for metric in EXPR_METRICS:
            if f"model_{metric}" not in m:
                continue
            best = m.get(f"best_baseline_{metric}", "mean")
            low = LOWER_IS_BETTER[metric]
            v = verdict(
                as_float(m.get(f"diff_{metric}_lo")), as_float(m.get(f"diff_{metric}_hi")), low
            )
            wins += v == "the model is better"
            losses += v == "the baseline is better"
            floor = ""
            if not math.isnan(as_float(m.get(f"diff_mean_{metric}"))) and best != "mean":
                v_mean = verdict(
                    as_float(m.get(f"diff_mean_{metric}_lo")),
                    as_float(m.get(f"diff_mean_{metric}_hi")),
                    low,
                )
                floor = (
                    f" Against the per-gene mean ({_g4(m.get(f'mean_{metric}'))}): difference "
                    f"{_g4(m.get(f'diff_mean_{metric}'))} ({_ci(m, f'diff_mean_{metric}')}), "
                    + v_mean.replace("the baseline", "the mean")
                    + "."
                )
            lines.append(
                f"- **{METRIC_NAMES.get(metric, metric)}** ({'lower' if low else 'higher'} is "
                f"better): the model scores {_g4(m.get(f'model_{metric}'))} "
                f"({_ci(m, f'model_{metric}')}); the strongest baseline, "
                f"{BASELINE_NAMES.get(best, best)}, scores {_g4(m.get(f'{best}_{metric}'))} "
                f"({_ci(m, f'{best}_{metric}')}). Difference {_g4(m.get(f'diff_{metric}'))} "
                f"({_ci(m, f'diff_{metric}')}): {v}.{floor}"
            )
        lines += [
            "",
            f"Overall: the model beats the strongest baseline on {wins} of the "
            f"{len(EXPR_METRICS)} metrics and loses on {losses}.",
            "",
        ]
        auprc = as_float(m.get("grn_model_auprc"))
        if not math.isnan(auprc):
            lines += [
                f"Network recovery (AUPRC against the known network): model attention "
                f"{auprc:.3g}, ridge coefficients {as_float(m.get('grn_ridge_auprc')):.3g}, "
                f"random {as_float(m.get('grn_random_auprc')):.3g}.",
                "",
            ]
    if cv_rows:
        lines += ["## Model selection", ""]
        ranked = sorted((r for r in cv_rows if r.get("rank")), key=lambda r: r["rank"])
        for row in ranked:
            mean = as_float(row.get(f"{selection_metric}_mean"))
            std = as_float(row.get(f"{selection_metric}_std"))
            lines.append(
                f"{row['rank']}. {_label(row, sweep_keys)}: {selection_metric} {_g4(mean)}"
                + (f" ± {_g4(std)} over {row['n_folds']} folds" if not math.isnan(std) else "")
                + (" (selected)" if row.get("selected") else "")
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def cv_summary(
    recs: list[Record],
    sweep_keys: list[str],
    selection_metric: str = "val_expr_mse",
    higher_is_better: bool | None = None,
    provenance: dict[str, Any] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of ``cv_summary.tsv``: one row per grid point.

    Uses only the CV-fold records (``fold >= 0``); when there are none, the ``holdout`` records.
    Per grid point and validation metric ``m``: ``m_mean`` and ``m_std`` (sample std, ddof 1;
    NA with one fold) over its folds. ``rank`` 1 = best mean ``selection_metric`` (lower is
    better for losses/errors unless ``higher_is_better``); ties go to the earlier grid point in
    sorted order; grid points without the metric get no rank. Exactly one row is ``selected``
    (none when no grid point has the metric). Test metrics are never read.
    """
    provenance = provenance or {}
    if higher_is_better is None:
        higher_is_better = not lower_is_better(selection_metric)
    cv = [r for r in recs if r.is_cv] or [r for r in recs if r.fold == "holdout"]
    groups: dict[tuple, list[Record]] = {}
    for r in cv:
        groups.setdefault(_point_key(r.point, sweep_keys), []).append(r)
    val_cols = _union([sorted(r.val_metrics()) for r in cv])
    if selection_metric not in val_cols and cv:
        raise InputError(
            f"selection metric '{selection_metric}' is not a validation metric of the CV runs "
            f"(have: {val_cols or 'none'}; do the runs validate?)"
        )
    rows = []
    for key in sorted(groups):
        members = groups[key]
        row: dict[str, Any] = dict(members[0].point)
        row["n_folds"] = len(members)
        row["folds"] = ",".join(str(m.fold) for m in members)
        for c in val_cols:
            vals = np.array([m.val_metrics().get(c, math.nan) for m in members], np.float64)
            vals = vals[~np.isnan(vals)]
            row[f"{c}_mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{c}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        prov = [provenance_of(m, provenance) for m in members]
        row["config_hash"] = config_hash(sorted(p["config_hash"] for p in prov))
        for c in PROVENANCE_COLUMNS[1:]:
            row[c] = ",".join(sorted({str(p[c]) for p in prov}))
        rows.append(row)
    score = [row.get(f"{selection_metric}_mean", math.nan) for row in rows]
    ranked = [i for i in range(len(rows)) if not math.isnan(score[i])]
    sign = -1.0 if higher_is_better else 1.0
    ranked.sort(key=lambda i: (sign * score[i], i))
    for row in rows:
        row["selection_metric"] = selection_metric
        row["rank"] = None
        row["selected"] = False
    for rank, i in enumerate(ranked, start=1):
        rows[i]["rank"] = rank
    if ranked:
        rows[ranked[0]]["selected"] = True
    elif rows:
        log.warning("no grid point has a %s: none selected", selection_metric)
    stats = [f"{c}_{s}" for c in val_cols for s in ("mean", "std")]
    cols = [
        *sweep_keys,
        "n_folds",
        "folds",
        *stats,
        "selection_metric",
        "rank",
        "selected",
        *PROVENANCE_COLUMNS,
    ]
    return cols, rows


def select_best(
    records: list[dict[str, Any]],
    sweep_keys: list[str],
    selection_metric: str = "val_expr_mse",
    higher_is_better: bool | None = None,
) -> dict[str, Any] | None:
    """The selected grid point (sweep key -> value) of the CV records; None if none qualifies.

    For a Snakemake checkpoint that decides which grid point the final retrain uses.
    """
    recs = load_records(records, sweep_keys)
    _, rows = cv_summary(recs, sweep_keys, selection_metric, higher_is_better)
    for row in rows:
        if row["selected"]:
            return {k: row[k] for k in sweep_keys}
    return None


def selection(
    records: list[dict[str, Any]],
    sweep_keys: list[str],
    selection_metric: str = "val_expr_mse",
) -> dict[str, Any] | None:
    """What the ``cv_select`` checkpoint writes: ``selected`` (the grid point),
    ``selection_metric`` and ``final_epochs``, the mean over the selected point's folds of the
    epochs at which early stopping kept its weights (the final retrain trains that long; None
    when the runs do not report it). None when no grid point qualifies."""
    selected = select_best(records, sweep_keys, selection_metric)
    if selected is None:
        return None
    recs = load_records(records, sweep_keys)
    chosen = [r for r in recs if r.point == selected and r.is_cv]
    epochs = [as_float(r.perf.get("selected_epochs")) for r in chosen]
    epochs = [e for e in epochs if not math.isnan(e)]
    return {
        "selected": selected,
        "selection_metric": selection_metric,
        "final_epochs": round(float(np.mean(epochs)), 6) if epochs else None,
        "fold_epochs": epochs,
    }


def read_selected(path: str | os.PathLike, sweep_keys: list[str]) -> dict[str, str] | None:
    """The selected grid point of a written ``cv_summary.tsv`` (values as their TSV strings,
    the form Paramspace paths use); None when no row is selected."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: CV summary not found")
    df = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
    missing = [k for k in [*sweep_keys, "selected"] if k not in df]
    if missing:
        raise InputError(f"{p}: missing column(s) {missing}")
    sel = df[df["selected"] == "true"]
    return None if sel.empty else {k: sel.iloc[0][k] for k in sweep_keys}


# ----------------------------------------------------------------------------- plots
def _label(point: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={fmt(point[k])}" for k in keys) or "base"


def plot_metric_vs_key(
    rows: list[dict[str, Any]], sweep_keys: list[str], metrics: list[str], path: Path
) -> None:
    """One panel per (metric, sweep key): mean over folds vs the key's values, one line per
    combination of the other keys, error bars = std over folds, the selected point starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sweep_keys or ["(base)"]
    fig, axes = plt.subplots(
        len(metrics), len(keys), figsize=(4.5 * len(keys), 3.6 * len(metrics)), squeeze=False
    )
    for mi, metric in enumerate(metrics):
        for ki, key in enumerate(keys):
            ax = axes[mi][ki]
            if not rows or f"{metric}_mean" not in rows[0]:
                ax.text(0.5, 0.5, f"no {metric}", ha="center", va="center")
                ax.set_axis_off()
                continue
            values = sorted(
                {fmt(r.get(key, "base")) for r in rows}, key=lambda s: _value_key(_num(s))
            )
            xpos = {v: i for i, v in enumerate(values)}
            others = [k for k in sweep_keys if k != key]
            series: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                series.setdefault(_label(r, others), []).append(r)
            for name, members in series.items():
                members = sorted(members, key=lambda r: xpos[fmt(r.get(key, "base"))])
                x = [xpos[fmt(r.get(key, "base"))] for r in members]
                y = [as_float(r[f"{metric}_mean"]) for r in members]
                e = [as_float(r.get(f"{metric}_std")) for r in members]
                e = [0.0 if math.isnan(v) else v for v in e]
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name if others else None)
                for xi, yi, r in zip(x, y, members, strict=True):
                    if r.get("selected"):
                        ax.plot([xi], [yi], "*", ms=14, color="gold", mec="k", zorder=5)
            ax.set_xticks(range(len(values)), values)
            ax.set_xlabel(key)
            ax.set_ylabel(f"{metric} (mean ± std over folds)")
            if others and len(series) > 1:
                ax.legend(fontsize="x-small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _num(s: str) -> Any:
    try:
        return float(s)
    except ValueError:
        return s


def plot_learning_curves(
    recs: list[Record], sweep_keys: list[str], path: Path, metric: str = "val_expr_mse"
) -> None:
    """Training loss (left, bin space) and the validation ``metric`` (right: the selection
    metric, comparable across grid points) vs optimizer step for every run; one colour per grid
    point, one line per fold (the final retrain dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tr, ax_va) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.get_cmap("tab10")
    points: dict[tuple, int] = {}
    labelled: set[int] = set()
    for r in recs:
        if r.curves is None:
            continue
        ci = points.setdefault(_point_key(r.point, sweep_keys), len(points))
        style = "--" if r.fold == "final" else "-"
        label = _label(r.point, sweep_keys) if ci not in labelled else None
        labelled.add(ci)
        tr = r.curves[r.curves["kind"] == "train"]
        va = r.curves[r.curves["kind"] == "val"]
        colour = colours(ci % 10)
        if len(tr):
            ax_tr.plot(tr["step"], tr["loss"], style, color=colour, alpha=0.8, lw=1, label=label)
        if len(va) and metric in va:
            ax_va.plot(va["step"], va[metric], style, marker="o", ms=3, color=colour, alpha=0.8)
    ax_tr.set_title("training loss (bin space)")
    ax_va.set_title(f"validation {metric}")
    for ax in (ax_tr, ax_va):
        ax.set_xlabel("optimizer step")
    ax_tr.set_ylabel("masked-value loss")
    ax_va.set_ylabel(metric)
    if labelled:
        ax_tr.legend(fontsize="x-small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point
def build_tables(
    records: list[dict[str, Any]],
    sweep_keys: list[str],
    out_dir: str | os.PathLike,
    provenance: dict[str, Any] | None = None,
    selection_metric: str = "val_expr_mse",
    higher_is_better: bool | None = None,
    outputs: dict[str, str | os.PathLike] | None = None,
) -> dict[str, Path]:
    """Write metrics.tsv, cv_summary.tsv, performance.tsv and the two plots.

    Args:
        records: one dict per trained model (module docstring), in any order.
        sweep_keys: the grid's columns (e.g. ``["n_hvg", "n_bins", "ln_order"]``).
        out_dir: folder of the default output names (:data:`OUTPUT_NAMES`).
        provenance: ``git_commit`` (required for a meaningful column; the caller runs git) and
            fallbacks ``evoformer_version``, ``torch``, ``scanpy``, ``device``.
        selection_metric: validation metric the CV selection ranks by (``val_expr_mse``).
        higher_is_better: direction; None = inferred (losses/errors lower).
        outputs: explicit paths for any of the keys of :data:`OUTPUT_NAMES`.

    Returns:
        The paths written, by key.
    """
    provenance = dict(provenance or {})
    sweep_keys = list(sweep_keys)
    paths = {k: Path(out_dir) / name for k, name in OUTPUT_NAMES.items()}
    for k, v in (outputs or {}).items():
        if k not in paths:
            raise InputError(f"tables output '{k}' is unknown (known: {sorted(paths)})")
        paths[k] = Path(v)
    recs = load_records(records, sweep_keys)
    if not recs:
        raise InputError("tables: no experiment records")

    # everything is computed before anything is written: bad input leaves no partial tables
    tables = {
        "metrics": metrics_table(recs, sweep_keys, provenance),
        "cv_summary": cv_summary(recs, sweep_keys, selection_metric, higher_is_better, provenance),
        "performance": performance_table(recs, sweep_keys, provenance),
    }
    cv_rows = tables["cv_summary"][1]
    summary = summary_markdown(recs, sweep_keys, cv_rows, selection_metric, provenance)
    for key, (cols, rows) in tables.items():
        write_tsv(paths[key], cols, rows)
    write_text_atomic(paths["summary"], summary)
    plot_metric_vs_key(cv_rows, sweep_keys, [selection_metric], paths["metric_plot"])
    plot_learning_curves(recs, sweep_keys, paths["learning_curves"], selection_metric)
    return paths
