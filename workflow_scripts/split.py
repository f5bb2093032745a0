"""Rule split: train/val/test split and CV folds of a dataset's cells (evoformer.data.split)."""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.split import run_split  # noqa: E402
from evoformer.data.step import run_step  # noqa: E402

run_step(
    snakemake.log[0],
    run_split,
    dataset_path=snakemake.input.dataset,
    dataset_name=snakemake.wildcards.dataset,
    label_key=snakemake.params.label_key,
    split=dict(snakemake.params.split),
    out_tsv=snakemake.output[0],
)
