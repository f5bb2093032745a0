"""Rule planted: generate a seeded dataset with a planted gene regulatory network
(evoformer.data.planted): the h5ad, the true network TSV and the per-gene variance table."""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.planted import write_planted  # noqa: E402
from evoformer.data.step import run_step  # noqa: E402

run_step(
    snakemake.log[0],
    write_planted,
    out_h5ad=snakemake.output.h5ad,
    params=dict(snakemake.params.planted),
)
