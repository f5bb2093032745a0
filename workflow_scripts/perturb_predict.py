"""Rule perturb_predict: a trained perturbation model's predicted mean expression of its split's
validation and test conditions (evoformer.tasks.perturbation.predict_file).

input:  model, binned (folder in params), split, hvg
output: predictions - TSV, one row per condition, one column per gene
"""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.step import run_step  # noqa: E402
from evoformer.tasks.perturbation import predict_file  # noqa: E402

run_step(
    snakemake.log[0],
    predict_file,
    model_pt=snakemake.input.model,
    binned=snakemake.params.binned,
    split_tsv=snakemake.input.split,
    hvg_h5ad=snakemake.input.hvg,
    out_tsv=snakemake.output.predictions,
)
