"""Snakemake ``script:`` of the ``cv_select`` checkpoint: pick the grid point with the best mean
validation metric over the CV folds (test cells are never read) and write it as JSON.

    input:  the fold runs' metrics.tsv / performance_summary.json (for the DAG)
    params: records (as for the tables rule, no eval_metrics), sweep_keys, selection_metric
    output: results/{dataset}/cv_selection.json  {"selected": {key: value, ...},
            "selection_metric": ..., "final_epochs": <mean epochs early stopping chose>}
"""

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repository root

from evoformer.data.step import run_step  # noqa: E402
from evoformer.errors import InputError  # noqa: E402
from evoformer.io import write_text_atomic  # noqa: E402
from evoformer.tables import selection  # noqa: E402


def main() -> None:
    result = selection(
        list(snakemake.params.records),
        list(snakemake.params.sweep_keys),
        str(snakemake.params.selection_metric),
    )
    if result is None:
        raise InputError("cv_select: no grid point has a validation metric in every fold")
    logging.getLogger(__name__).info("selected grid point: %s", result)
    text = json.dumps(result, indent=2, sort_keys=True, default=str) + "\n"
    write_text_atomic(snakemake.output[0], text)


run_step(snakemake.log[0], main)
