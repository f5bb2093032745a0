"""Snakemake ``script:`` of the ``tables`` rule: metrics, CV summary, performance and plots.

Expects (the rule's names)::

    input:  every file the records name (eval_metrics.json, performance_summary.json, train
            metrics.tsv of every experiment/fold): only for the DAG, the script reads the
            paths from params.records
    output: summary="results/tables/summary.md",
            metrics="results/tables/metrics.tsv",
            cv_summary="results/tables/cv_summary.tsv",
            performance="results/tables/performance.tsv",
            metric_plot="results/tables/metric_vs_key.png",
            learning_curves="results/tables/learning_curves.png"
    params: records=[{id, <sweep key>: value, ..., fold, eval_metrics, performance_summary,
                      train_metrics, config_hash | spec}, ...],
            sweep_keys=["n_hvg", "n_bins", ...],
            selection_metric="val_expr_mse",           (optional)
            higher_is_better=None,                     (optional; None: inferred from the name)
            git_commit="<git rev-parse HEAD or 'unknown'>",
            provenance={...}                           (optional fallbacks: torch, scanpy, device)
    log:    "logs/tables.log"

Errors from bad input end up as one line in the log (and the job fails).
"""

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repository root

from evoformer.data.step import run_step  # noqa: E402


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def main() -> None:
    import evoformer
    from evoformer.tables import build_tables

    out, params = snakemake.output, snakemake.params
    provenance = {
        "evoformer_version": evoformer.__version__,
        "torch": _version("torch"),
        "scanpy": _version("scanpy"),
        **dict(getattr(params, "provenance", None) or {}),
    }
    provenance["git_commit"] = getattr(params, "git_commit", None) or provenance.get(
        "git_commit", "unknown"
    )
    outputs = {k: getattr(out, k) for k in out.keys()}
    build_tables(
        list(params.records),
        list(params.sweep_keys),
        Path(out.metrics).parent,
        provenance,
        selection_metric=getattr(params, "selection_metric", None) or "val_expr_mse",
        higher_is_better=getattr(params, "higher_is_better", None),
        outputs=outputs,
    )


run_step(snakemake.log[0], main)
