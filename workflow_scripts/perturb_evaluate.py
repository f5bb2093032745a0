"""Rule perturb_evaluate: baselines (and models) on a screen's test conditions
(evoformer.perturb.evaluate)."""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.step import run_step  # noqa: E402
from evoformer.perturb.evaluate import PerturbEvalParams, evaluate_perturbation  # noqa: E402

truth = snakemake.input.truth
run_step(
    snakemake.log[0],
    evaluate_perturbation,
    hvg_h5ad=snakemake.input.hvg,
    split_tsv=snakemake.input.split,
    out_dir=str(Path(snakemake.output.subgroups).parent),
    params=PerturbEvalParams.from_dict(dict(snakemake.params.evaluation)),
    truth_npz=truth[0] if truth else None,
)
