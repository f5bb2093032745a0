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

from evoformer.errors import InputError
from evoformer.io import atomic_path
from evoformer.perturb.baselines import BASELINES, COMPETITORS
from evoformer.perturb.metrics import (
    ALL,
    LOWER_IS_BETTER,
    MIN_INTERVAL_CONDITIONS,
    SUBGROUP_COLUMNS,
    TRUTH_PREFIX,
)
from evoformer.tables import as_float, verdict, write_tsv
from evoformer.train_config import lower_is_better

#: The metrics the summary speaks about, in order, with their names in sentences.
HEADLINE = {
    "pearson_delta": "Pearson-delta (vs training control mean)",
    "pearson_delta_pert": "Pearson-delta vs the mean perturbation (Systema)",
    "pearson_delta_de": "Pearson-delta on the top DE genes",
    "mse": "MSE of the condition mean",
    "de_sign": "share of top DE genes with the right sign",
    "centroid_acc": "centroid accuracy",
    "pearson_interaction": (
        "Pearson of the interaction term (doubles; no change scores the doubles' sub-additivity)"
    ),
}
#: Headline metrics also stated against the noise-free truth (synthetic screens).
TRUTH_HEADLINE = ("pearson_delta", "pearson_interaction")
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
    splits: dict[str, pd.DataFrame], provenance: dict[str, Any], out: str | os.PathLike
) -> None:
    """Write ``perturbation.tsv``: ``provenance`` columns (dataset, n_hvg, commit...), ``split``,
    then :data:`~evoformer.perturb.metrics.SUBGROUP_COLUMNS`: one row per split, subgroup,
    method and metric, in the evaluation's order."""
    front = [*provenance, "split"]
    rows = [
        {**provenance, "split": name, **row}
        for name, subgroups in splits.items()
        for row in subgroups.to_dict("records")
    ]
    write_tsv(out, front + list(SUBGROUP_COLUMNS), rows)


def _g3(v: Any) -> str:
    v = as_float(v)
    return "NA" if math.isnan(v) else f"{v:.3g}"


def _with_ci(row: pd.Series) -> str:
    """``value [lo, hi]``, and for how many conditions the metric is undefined (a constant
    prediction has no correlation: it stays NA, never 0)."""
    n, bad = int(as_float(row["n_conditions"]) or 0), int(as_float(row["n_undefined"]) or 0)
    if math.isnan(as_float(row["value"])):
        return f"undefined for all {n} conditions"
    lo, hi = as_float(row["lo"]), as_float(row["hi"])
    ci = "" if math.isnan(lo) else f" [{lo:.3g}, {hi:.3g}]"
    return f"{_g3(row['value'])}{ci}" + (f" (undefined for {bad} of {n})" if bad else "")


def _verdict(row: pd.Series, lower_better: bool) -> str:
    """:func:`evoformer.tables.verdict` of a model's paired difference, saying why there is no
    interval when its conditions were too few for one (``MIN_INTERVAL_CONDITIONS``)."""
    v = verdict(as_float(row["diff_lo"]), as_float(row["diff_hi"]), lower_better)
    defined = int(as_float(row["n_conditions"]) or 0) - int(as_float(row["n_undefined"]) or 0)
    if v.startswith("undecided") and defined < MIN_INTERVAL_CONDITIONS:
        return (
            f"undecided (an interval needs {MIN_INTERVAL_CONDITIONS} conditions, {defined} defined)"
        )
    return v


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
        v = _verdict(r, low)
        v = v.replace("the model", model).replace("the baseline", METHOD_NAMES.get(best, "it"))
        parts.append(
            f"Model `{model}`: {_with_ci(r)}; difference to the strongest baseline "
            f"{_g3(r['diff'])} [{_g3(r['diff_lo'])}, {_g3(r['diff_hi'])}]: {v}."
        )
    if "oracle" in rows.index:
        parts.append(f"Ceiling (oracle): {_with_ci(rows.loc['oracle'])}.")
    return "- " + " ".join(parts)


#: How a double's genes combine in a synthetic screen (``<screen>_conditions.tsv`` facts).
DOUBLE_KINDS = (
    (
        "additive",
        "no planted interaction and no shared descendant (additive but for normalisation)",
    ),
    ("natural", "a shared descendant (interacting through the network's saturation)"),
    ("cooperative", "planted cooperative targets (a synergy)"),
)


def _double_kind(fact: pd.Series) -> str:
    if str(fact["cooperative"]) == "True":
        return "cooperative"
    return "additive" if str(fact["additive"]) == "True" else "natural"


def _interaction_paragraph(per_condition: pd.DataFrame, facts: pd.DataFrame) -> list[str]:
    """Additive vs the noise-free truth on the test doubles whose singles were both trained on
    (``combo_seen2``: where the additive model is defined), by how their genes combine."""
    needed = {"cooperative", "additive", "condition"}
    if "truth_mse" not in per_condition.columns or not needed <= set(facts.columns):
        return []
    kind = {f["condition"]: _double_kind(f) for _, f in facts.iterrows()}
    doubles = per_condition[
        (per_condition["subgroup"] == "combo_seen2") & per_condition["condition"].isin(kind)
    ]
    if doubles.empty:
        return []
    lines = [
        "Doubles with both singles in training (`combo_seen2`): does the additive model reach "
        "the noise-free truth? Mean over the doubles of the MSE against the truth (the oracle "
        "scores 0):",
        "",
    ]
    for key, what in DOUBLE_KINDS:
        sel = doubles[doubles["condition"].map(kind) == key]
        if sel.empty:
            continue
        mse = sel.groupby("method")["truth_mse"].mean()
        floor = ""
        if "truth_interaction_msq" in sel.columns:
            floor = (
                f" (with exact singles it would be {_g3(sel['truth_interaction_msq'].mean())}, "
                "the interaction's mean square; the rest is the noise of the observed singles)"
            )
        others = ", ".join(
            f"{METHOD_NAMES.get(m, m)} {_g3(mse[m])}"
            for m in COMPETITORS
            if m in mse and m != "additive"
        )
        lines.append(
            f"- {sel['condition'].nunique()} with {what}: additive {_g3(mse.get('additive'))}"
            f"{floor}; "
            f"{others}."
        )
    return [*lines, ""]


def _split_section(
    name: str,
    subgroups: pd.DataFrame,
    details: dict[str, Any],
    per_condition: pd.DataFrame | None,
    facts: pd.DataFrame | None,
    validation: dict[str, Any] | None = None,
) -> list[str]:
    n_test = len(details.get("test_conditions", {}))
    n_train = len(details.get("train_conditions", []))
    lines = [
        f"## Split `{name}`",
        "",
        f"{n_test} test conditions predicted from {n_train} training conditions and "
        f"{details.get('n_train_control_cells')} training control cells.",
        "",
    ]
    if validation and validation["ranked"]:
        ranked = ", ".join(f"`{m}` {_g3(v)}" for m, v in validation["ranked"])
        n_val = f" {validation['n_val']}" if validation.get("n_val") else ""
        lines += [
            f"Model selection on the{n_val} validation conditions ({validation['monitor']}, "
            f"the same for every model; test conditions never seen): {ranked}. Chosen: "
            f"`{validation['chosen']}`; the test figures below are every model's, the chosen "
            "one is the one to quote.",
            "",
        ]
    for sub in dict.fromkeys(subgroups["subgroup"]):
        block = subgroups[subgroups["subgroup"] == sub]
        n = int(block["n_conditions"].max())
        lines += [f"### {SUBGROUP_NAMES.get(sub, sub)} (`{sub}`, {n} conditions)", ""]
        for metric, label in HEADLINE.items():
            for prefix in ("", TRUTH_PREFIX):
                if prefix and metric not in TRUTH_HEADLINE:
                    continue
                sentence = _metric_sentence(block, prefix + metric, label)
                if sentence and prefix:
                    sentence = sentence.replace("- **", "- **Against the noise-free truth: ", 1)
                if sentence:
                    lines.append(sentence)
        lines.append("")
    if per_condition is not None and facts is not None:
        lines += _interaction_paragraph(per_condition, facts)
    return lines


def validation_choice(summaries: dict[str, str | os.PathLike]) -> dict[str, Any] | None:
    """The models of one split ranked by their best validation metric (``train.monitor`` on the
    split's validation conditions, the same metric for every model): ``{"monitor", "ranked":
    [(method, value)], "chosen", "n_val"}``; None without models."""
    import json

    rows, monitors, n_val = [], set(), set()
    for method, path in summaries.items():
        d = json.loads(Path(path).read_text())
        monitors.add(d.get("monitor"))
        n_val.add(d.get("n_val_items"))
        rows.append((method, as_float(d.get("best_metric"))))
    if not rows:
        return None
    if len(monitors) != 1:
        raise InputError(f"the models were validated on different metrics: {sorted(monitors)}")
    monitor = monitors.pop()
    lower = lower_is_better(monitor)
    ranked = sorted(
        (r for r in rows if math.isfinite(r[1])), key=lambda r: r[1] if lower else -r[1]
    )
    return {
        "monitor": monitor,
        "ranked": ranked,
        "chosen": ranked[0][0] if ranked else None,
        # validation conditions (the same for every model of a split); None if not recorded
        "n_val": n_val.pop() if len(n_val) == 1 else None,
    }


def _in_short(splits: dict[str, dict[str, Any]]) -> str:
    """The opening sentences: what was compared, on how many conditions, who won, where next."""
    parts = []
    models: list[str] = []
    for name, split in splits.items():
        sub, details = split["subgroups"], split["details"]
        models = [m for m in details.get("methods", []) if m not in BASELINES]
        rows = sub[(sub["subgroup"] == ALL) & (sub["metric"] == "pearson_delta")]
        rows = rows[rows["method"] != "oracle"]
        scored = rows[rows["value"].map(as_float).map(math.isfinite)]
        text = (
            f"split `{name}`: {len(details.get('test_conditions', {}))} held-out conditions, "
            f"{len(details.get('train_conditions', []))} in training"
        )
        if len(scored):
            best = scored.loc[scored["value"].map(as_float).idxmax()]
            text += (
                f"; the best Pearson-delta over all test conditions is "
                f"{METHOD_NAMES.get(best['method'], best['method'])}'s ({_with_ci(best)})"
            )
        groups: dict[str, list[str]] = {}
        for model in models:
            row = rows[rows["method"] == model]
            if len(row):
                r = row.iloc[0]
                v = _verdict(r, False)
                word = {"the model is better": "better", "the baseline is better": "worse"}
                w = "undecided (no interval)" if v.startswith("undecided") else None
                groups.setdefault(w or word.get(v, "not clearly different"), []).append(
                    f"`{model}`"
                )
        if groups:
            text += "; compared with the strongest baseline, " + ", ".join(
                f"{', '.join(ms)} {'is' if len(ms) == 1 else 'are'} {w}" for w, ms in groups.items()
            )
        choice = split.get("validation")
        if choice and choice["chosen"]:
            text += f"; chosen on the validation conditions: `{choice['chosen']}`"
        parts.append(text)
    compared = (
        f"the models {', '.join(f'`{m}`' for m in models)} and " if models else "no model (only "
    )
    baselines = "the no-change, mean-perturbation, additive and linear baselines"
    return (
        "**In short.** Each method predicted the mean expression of cells under perturbations "
        f"held out of training; compared are {compared}{baselines}"
        + ("" if models else "; perturbation.model trains one)")
        + ". "
        + "; ".join(p[0].upper() + p[1:] for p in parts)
        + ". The published experiments are in `configs/` and their results in `RESULTS.md`."
    )


def summary_markdown(
    splits: dict[str, dict[str, Any]],
    provenance: dict[str, Any],
    facts: pd.DataFrame | None = None,
) -> str:
    """``perturbation_summary.md``: the table in sentences (see the module doc). ``splits``:
    name -> {"subgroups": DataFrame, "details": dict, "per_condition": DataFrame}."""
    any_details = next(iter(splits.values()))["details"]
    lines = [
        "# Perturbation benchmark",
        "",
        _in_short(splits),
        "",
        f"Dataset `{provenance.get('dataset')}` ({any_details.get('n_genes')} genes), commit "
        f"`{provenance.get('git_commit')}`. Each split is evaluated on its own: no test "
        "condition has a cell in training. Every number is a mean over test conditions (each "
        "condition's mean log1p expression), with a 95% bootstrap interval over conditions "
        f"(none over fewer than {MIN_INTERVAL_CONDITIONS} conditions, and no difference is "
        "claimed there); "
        "the perturbed genes are left out of every metric. Baselines are fitted on training "
        "conditions and training control cells only; the strongest baseline is named per "
        "subgroup and metric (the oracle, the noise-free truth of a synthetic screen, is a "
        "ceiling, never a competitor). A metric that is undefined for a condition (a constant "
        "prediction has no correlation) is left out of its mean and counted.",
        "",
    ]
    for name, split in splits.items():
        lines += _split_section(
            name,
            split["subgroups"],
            split["details"],
            split.get("per_condition"),
            facts,
            split.get("validation"),
        )
    return "\n".join(lines) + "\n"


def plot_de_changes(splits: dict[str, dict[str, Any]], out: str | os.PathLike) -> None:
    """Predicted vs true change (``- ctrl``) over the top DE genes of each split's figure
    conditions: one row of panels per split (``splits``: name -> details.json content)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = {name: details.get("figure") or [] for name, details in splits.items()}
    n_cols = max([1, *(len(p) for p in rows.values())])
    fig = Figure(figsize=(4.2 * n_cols, 3.6 * len(rows)), layout="constrained")
    grid = fig.subplots(len(rows), n_cols, squeeze=False)
    markers = dict(zip(BASELINES, "osD^vP", strict=False))
    for axes, (name, panels) in zip(grid, rows.items(), strict=True):
        for ax in axes[len(panels) :]:
            ax.set_axis_off()
        if not panels:
            axes[0].text(0.5, 0.5, f"{name}: no test condition", ha="center", va="center")
        for ax, panel in zip(axes, panels, strict=False):
            x = np.arange(len(panel["genes"]))
            ax.axhline(0, color="0.8", lw=0.8)
            ax.plot(x, panel["true_delta"], "k_", ms=14, mew=2, label="observed")
            if panel.get("truth_delta") is not None:
                ax.plot(x, panel["truth_delta"], "_", color="0.5", ms=14, mew=2, label="noise-free")
            for method, values in sorted(panel["pred_delta"].items()):
                if method != "oracle":
                    ax.plot(x, values, markers.get(method, "*"), ms=4, alpha=0.8, label=method)
            ax.set_xticks(x, panel["genes"], rotation=90, fontsize=6)
            ax.set_title(f"{name}: {panel['condition']} ({panel['subgroup']})", fontsize=9)
            ax.set_ylabel("change vs control (log1p)")
        if panels:
            axes[len(panels) - 1].legend(fontsize=6, loc="best")
    with atomic_path(Path(out)) as tmp:
        fig.savefig(tmp, dpi=110, metadata={"Software": None})


def write_perturbation_tables(
    eval_dirs: dict[str, str | os.PathLike],
    provenance: dict[str, Any],
    table: str | os.PathLike,
    summary: str | os.PathLike,
    figure: str | os.PathLike,
    facts: str | os.PathLike | None = None,
    model_summaries: dict[str, dict[str, str | os.PathLike]] | None = None,
) -> None:
    """The ``perturb_tables`` step: from each split's evaluation folder (``subgroups.tsv``,
    ``per_condition.tsv``, ``details.json``; ``eval_dirs``: split name -> folder), for a
    synthetic screen its per-condition facts (``<screen>_conditions.tsv``), and the models'
    trainings (``model_summaries``: split -> method -> ``performance_summary.json``: the
    validation metric each reached), write the table, the summary and the figure."""
    import json

    from evoformer.io import write_text_atomic

    splits = {}
    for name, folder in eval_dirs.items():
        folder = Path(folder)
        splits[name] = {
            "subgroups": read_subgroups(folder / "subgroups.tsv"),
            "details": json.loads((folder / "details.json").read_text()),
            "per_condition": pd.read_csv(folder / "per_condition.tsv", sep="\t", na_values=["NA"]),
            "validation": validation_choice((model_summaries or {}).get(name) or {}),
        }
    facts_table = pd.read_csv(facts, sep="\t", dtype=str) if facts else None
    perturbation_table({k: v["subgroups"] for k, v in splits.items()}, provenance, table)
    write_text_atomic(summary, summary_markdown(splits, provenance, facts_table))
    plot_de_changes({k: v["details"] for k, v in splits.items()}, figure)
