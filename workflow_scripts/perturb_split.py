"""Rule perturb_split: the perturbation-level split of a screen's cells
(evoformer.perturb.splits), from the conditions in its hvg.h5ad."""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.step import run_step  # noqa: E402
from evoformer.perturb.splits import split_hvg_cells  # noqa: E402

run_step(
    snakemake.log[0],
    split_hvg_cells,
    hvg_h5ad=snakemake.input.hvg,
    params=dict(snakemake.params.split),
    out_tsv=snakemake.output.split,
    summary_tsv=snakemake.output.summary,
    where=snakemake.params.where,
)
