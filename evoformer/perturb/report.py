"""The perturbation results a person reads: the table, its sentences and its figure.

From the evaluation outputs of :func:`evoformer.perturb.evaluate.evaluate_perturbation`
(``subgroups.tsv``, ``per_condition.tsv``, ``details.json``) of one screen:

* :func:`perturbation_table`: ``results/tables/perturbation.tsv``, the subgroup table with the
  dataset and provenance in front (one row per subgroup, method and metric);
* :func:`summary_markdown`: ``perturbation_summary.md``, per subgroup and headline metric, the
  strongest baseline with its interval, every other method against it, the oracle's ceiling on
  synthetic screens, and (given the screen's per-condition facts) whether the additive
  baseline reaches the noise-free truth on doubles without a planted interaction and misses it
  on doubles with one;
* :func:`plot_de_changes`: predicted against true change (``- ctrl``) over the top DE genes of a
  few test conditions, one panel each.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evoformer.io import atomic_path
from evoformer.perturb.baselines import BASELINES, COMPETITORS
from evoformer.perturb.metrics import ALL, LOWER_IS_BETTER, SUBGROUP_COLUMNS, TRUTH_PREFIX
from evoformer.tables import verdict, write_tsv

#: The metrics the summary speaks about, in order, with their names in sentences.
HEADLINE = {
    "pearson_delta": "Pearson-delta (vs training control mean)",
    "pearson_delta_pert": "Pearson-delta vs the mean perturbation (Systema)",
    "pearson_delta_de": "Pearson-delta on the top DE genes",
    "mse": "MSE of the condition mean",
    "de_sign": "share of top DE genes with the right sign",
    "centroid_acc": "centroid accuracy",
    "pearson_interaction": "Pearson of the interaction term (doubles)",
}
METHOD_NAMES = {
    "no_change": "no change",
    "mean_perturbation": "mean perturbation",
    "additive": "additive",
    "linear": "linear (Ahlmann-Eltze et al.)",
    "oracle": "oracle (noise-free truth)",
}
SUBGROUP_NAMES = {
    "unseen_single": "unseen singles",
    "seen_single": "singles whose gene was seen in a training double",
    "combo_seen0": "doubles, neither gene seen as a single",
    "combo_seen1": "doubles, one gene seen as a single",
    "combo_seen2": "doubles, both genes seen as singles",
    ALL: "all test conditions",
}


def read_subgroups(path: str | os.PathLike) -> pd.DataFrame:
    """``subgroups.tsv`` as written by the evaluation (NA stays NaN)."""
    return pd.read_csv(path, sep="\t", keep_default_na=True, na_values=["NA"])


def perturbation_table(
    subgroups: pd.DataFrame, provenance: dict[str, Any], out: str | os.PathLike
) -> None:
    """Write ``perturbation.tsv``: ``provenance`` columns (dataset, n_hvg, split kind, commit...)
    then :data:`~evoformer.perturb.metrics.SUBGROUP_COLUMNS`, one row per subgroup, method and
    metric, in the evaluation's order."""
    front = list(provenance)
    rows = [{**provenance, **row} for row in subgroups.to_dict("records")]
    write_tsv(out, front + list(SUBGROUP_COLUMNS), rows)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _g3(v: Any) -> str:
    v = _num(v)
    return "NA" if math.isnan(v) else f"{v:.3g}"


def _with_ci(row: pd.Series) -> str:
    """``value [lo, hi]``, and for how many conditions the metric is undefined (a constant
    prediction has no correlation: it stays NA, never 0)."""
    n, bad = int(_num(row["n_conditions"]) or 0), int(_num(row["n_undefined"]) or 0)
    if math.isnan(_num(row["value"])):
        return f"undefined for all {n} conditions"
    lo, hi = _num(row["lo"]), _num(row["hi"])
    ci = "" if math.isnan(lo) else f" [{lo:.3g}, {hi:.3g}]"
    return f"{_g3(row['value'])}{ci}" + (f" (undefined for {bad} of {n})" if bad else "")


def _metric_sentence(block: pd.DataFrame, metric: str, name: str) -> str | None:
    """One bullet: the strongest baseline, the others, the models against it, the oracle."""
    rows = block[block["metric"] == metric].set_index("method")
    if rows.empty or rows["value"].isna().all():
        return None
    low = LOWER_IS_BETTER[metric.removeprefix(TRUTH_PREFIX)]
    best = rows["best_baseline"].dropna()
    best = str(best.iloc[0]) if len(best) else None
    parts = [f"**{name}** ({'lower' if low else 'higher'} is better):"]
    if best in rows.index:
        parts.append(
            f"strongest baseline {METHOD_NAMES.get(best, best)} {_with_ci(rows.loc[best])};"
        )
    others = [m for m in COMPETITORS if m != best and m in rows.index]
    if others:
        parts.append(
            "then "
            + ", ".join(f"{METHOD_NAMES.get(m, m)} {_with_ci(rows.loc[m])}" for m in others)
            + "."
        )
    for model in [m for m in rows.index if m not in BASELINES]:
        r = rows.loc[model]
        v = verdict(_num(r["diff_lo"]), _num(r["diff_hi"]), low)
        v = v.replace("the model", model).replace("the baseline", METHOD_NAMES.get(best, "it"))
        parts.append(
            f"Model `{model}`: {_with_ci(r)}; difference to the strongest baseline "
            f"{_g3(r['diff'])} [{_g3(r['diff_lo'])}, {_g3(r['diff_hi'])}]: {v}."
        )
    if "oracle" in rows.index:
        parts.append(f"Ceiling (oracle): {_with_ci(rows.loc['oracle'])}.")
    return "- " + " ".join(parts)


def _interaction_paragraph(per_condition: pd.DataFrame, facts: pd.DataFrame) -> list[str]:
    """Additive vs the noise-free truth on test doubles with and without planted interactions."""
    if "truth_mse" not in per_condition.columns or "cooperative" not in facts.columns:
        return []
    coop = dict(zip(facts["condition"], facts["cooperative"].astype(str) == "True", strict=True))
    doubles = per_condition[per_condition["condition"].str.contains("+", regex=False)]
    doubles = doubles[doubles["condition"].isin(coop)]
    if doubles.empty:
        return []
    lines = ["### Doubles: is the additive model enough?", ""]
    for flag, what in ((False, "without"), (True, "with")):
        sel = doubles[doubles["condition"].map(coop) == flag]
        n = sel["condition"].nunique()
        if not n:
            continue
        by = sel.groupby("method")["truth_mse"].mean()
        spread = sel.groupby("method")["truth_pearson_delta"].mean()
        if "additive" not in by:
            continue
        lines.append(
            f"- Test doubles {what} a planted interaction ({n}): additive's MSE against the "
            f"noise-free truth {_g3(by['additive'])} (Pearson-delta {_g3(spread['additive'])}), "
            f"the oracle's {_g3(by.get('oracle'))}, no change {_g3(by.get('no_change'))}."
        )
    return [*lines, ""] if len(lines) > 2 else []


def summary_markdown(
    subgroups: pd.DataFrame,
    details: dict[str, Any],
    provenance: dict[str, Any],
    per_condition: pd.DataFrame | None = None,
    facts: pd.DataFrame | None = None,
) -> str:
    """``perturbation_summary.md``: the subgroup table in sentences (see the module doc)."""
    n_test = len(details.get("test_conditions", {}))
    n_train = len(details.get("train_conditions", []))
    lines = [
        "# Perturbation benchmark",
        "",
        f"Dataset `{provenance.get('dataset')}` ({provenance.get('n_genes', details.get('n_genes'))}"
        f" genes), split `{provenance.get('split')}`, commit `{provenance.get('git_commit')}`. "
        f"{n_test} test conditions are predicted from {n_train} training conditions and "
        f"{details.get('n_train_control_cells')} training control cells; no test condition has a "
        "cell in training. Every number is a mean over test conditions (each condition's mean "
        "log1p expression), with a 95% bootstrap interval over conditions; the perturbed genes "
        "are left out of every metric. Baselines are fitted on training conditions only; the "
        "strongest baseline is named per subgroup and metric (the oracle, the noise-free truth of "
        "a synthetic screen, is a ceiling, never a competitor).",
        "",
    ]
    order = list(dict.fromkeys(subgroups["subgroup"]))
    for sub in order:
        block = subgroups[subgroups["subgroup"] == sub]
        n = int(block["n_conditions"].max())
        lines += [f"## {SUBGROUP_NAMES.get(sub, sub)} (`{sub}`, {n} conditions)", ""]
        for metric, name in HEADLINE.items():
            sentence = _metric_sentence(block, metric, name)
            if sentence:
                lines.append(sentence)
        truth = _metric_sentence(block, TRUTH_PREFIX + "pearson_delta", HEADLINE["pearson_delta"])
        if truth:
            lines.append(truth.replace("**Pearson", "**Against the noise-free truth: Pearson", 1))
        lines.append("")
    if per_condition is not None and facts is not None:
        lines += _interaction_paragraph(per_condition, facts)
    return "\n".join(lines) + "\n"


def plot_de_changes(details: dict[str, Any], out: str | os.PathLike) -> None:
    """Predicted vs true change (``- ctrl``) over each figure condition's top DE genes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    panels = details.get("figure") or []
    n = max(1, len(panels))
    fig = Figure(figsize=(4.2 * n, 3.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    markers = dict(zip(BASELINES, "osD^vP", strict=False))
    for ax, panel in zip(axes, panels, strict=False):
        x = np.arange(len(panel["genes"]))
        ax.axhline(0, color="0.8", lw=0.8)
        ax.plot(x, panel["true_delta"], "k_", ms=14, mew=2, label="observed")
        if panel.get("truth_delta") is not None:
            ax.plot(x, panel["truth_delta"], "_", color="0.5", ms=14, mew=2, label="noise-free")
        for method, values in sorted(panel["pred_delta"].items()):
            if method == "oracle":
                continue
            ax.plot(x, values, markers.get(method, "*"), ms=4, alpha=0.8, label=method)
        ax.set_xticks(x, panel["genes"], rotation=90, fontsize=6)
        ax.set_title(f"{panel['condition']} ({panel['subgroup']})", fontsize=9)
        ax.set_ylabel("change vs control (log1p)")
    if not panels:
        axes[0].text(0.5, 0.5, "no test condition", ha="center", va="center")
    else:
        axes[-1].legend(fontsize=6, loc="best")
    with atomic_path(Path(out)) as tmp:
        fig.savefig(tmp, dpi=120, metadata={"Software": None})


def write_perturbation_tables(
    eval_dir: str | os.PathLike,
    provenance: dict[str, Any],
    table: str | os.PathLike,
    summary: str | os.PathLike,
    figure: str | os.PathLike,
    facts: str | os.PathLike | None = None,
) -> None:
    """The ``perturbation_tables`` step: from an evaluation folder (``subgroups.tsv``,
    ``per_condition.tsv``, ``details.json``) and, for a synthetic screen, its per-condition facts
    (``<screen>_conditions.tsv``), write the table, the summary and the figure."""
    import json

    from evoformer.io import write_text_atomic

    eval_dir = Path(eval_dir)
    subgroups = read_subgroups(eval_dir / "subgroups.tsv")
    details = json.loads((eval_dir / "details.json").read_text())
    per_condition = pd.read_csv(eval_dir / "per_condition.tsv", sep="\t", na_values=["NA"])
    facts_table = pd.read_csv(facts, sep="\t", dtype=str) if facts else None
    perturbation_table(subgroups, provenance, table)
    text = summary_markdown(subgroups, details, provenance, per_condition, facts_table)
    write_text_atomic(summary, text)
    plot_de_changes(details, figure)
