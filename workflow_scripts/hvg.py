"""Rule hvg: highly variable gene selection (evoformer.data.hvg.run_hvg)."""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.hvg import run_hvg  # noqa: E402
from evoformer.data.step import run_step  # noqa: E402

# one .h5ad file, or the list of files of a dataset given as several (paths:)
dataset = snakemake.input.dataset
dataset_path = dataset if isinstance(dataset, str) else list(dataset)
if isinstance(dataset_path, list) and len(dataset_path) == 1:
    dataset_path = dataset_path[0]

run_step(
    snakemake.log[0],
    run_hvg,
    dataset_path=dataset_path,
    dataset_name=snakemake.wildcards.dataset,
    dataset=dict(snakemake.params.dataset),
    n_hvg=int(snakemake.wildcards.n_hvg),
    hvg=dict(snakemake.params.hvg),
    out_h5ad=snakemake.output.h5ad,
    out_genes=snakemake.output.genes,
    out_plot=snakemake.output.plot,
)
