"""Rule perturb_evaluate: baselines and the perturbation models on a screen's test conditions
(evoformer.perturb.evaluate); params.methods names input.predictions in order."""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.step import run_step  # noqa: E402
from evoformer.perturb.evaluate import PerturbEvalParams, evaluate_perturbation  # noqa: E402
from evoformer.tasks.perturbation import read_predictions  # noqa: E402


def main() -> None:
    truth = snakemake.input.truth
    files = list(snakemake.input.predictions)
    names = list(snakemake.params.methods)
    evaluate_perturbation(
        hvg_h5ad=snakemake.input.hvg,
        split_tsv=snakemake.input.split,
        out_dir=str(Path(snakemake.output.subgroups).parent),
        params=PerturbEvalParams.from_dict(dict(snakemake.params.evaluation)),
        truth_npz=truth[0] if truth else None,
        predictions={n: read_predictions(f) for n, f in zip(names, files, strict=True)},
    )


run_step(snakemake.log[0], main)
