"""Rule split: train/val/test split and CV folds of a dataset's cells (evoformer.data.split)."""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.split import run_split  # noqa: E402
from evoformer.data.step import run_step  # noqa: E402

# one .h5ad file, or the list of files of a dataset given as several (paths:)
dataset = snakemake.input.dataset
dataset_path = dataset if isinstance(dataset, str) else list(dataset)
if isinstance(dataset_path, list) and len(dataset_path) == 1:
    dataset_path = dataset_path[0]

run_step(
    snakemake.log[0],
    run_split,
    dataset_path=dataset_path,
    dataset_name=snakemake.wildcards.dataset,
    label_key=snakemake.params.label_key,
    split=dict(snakemake.params.split),
    out_tsv=snakemake.output[0],
)
