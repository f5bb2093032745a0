"""Rule bin: per-cell value binning into memory-mappable arrays (evoformer.data.binning)."""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.binning import bin_h5ad  # noqa: E402
from evoformer.data.step import run_step  # noqa: E402

binning = snakemake.params.binning
run_step(
    snakemake.log[0],
    bin_h5ad,
    hvg_path=snakemake.input.hvg,
    out_dir=str(Path(snakemake.output.meta).parent),
    n_bins=int(snakemake.wildcards.n_bins),
    include_zero_genes=bool(binning["include_zero_genes"]),
    tie_mode=binning["tie_mode"],
    seed=int(binning["seed"]),
    n_threads=snakemake.threads,
)
