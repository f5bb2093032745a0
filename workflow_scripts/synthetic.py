"""Rule synthetic: generate a seeded negative-binomial dataset."""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.datasets import write_synthetic  # noqa: E402
from evoformer.data.step import run_step  # noqa: E402

run_step(
    snakemake.log[0],
    write_synthetic,
    out=snakemake.output[0],
    params=dict(snakemake.params.synthetic),
)
