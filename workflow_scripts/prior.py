"""Rule prior: build a prior network from a curated source (evoformer.priors.build_prior).

output: resources/priors/<name>.tsv (source, target, weight, sign, signed, curation_effort,
        resource, licence; a # provenance header)
params: settings  - experiment.prior's source settings (resources, organism, filters...)
        cache_dir - the omnipath client's file cache
The log states where the edges came from and how many edges, genes and regulators it holds.
"""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.step import run_step  # noqa: E402
from evoformer.priors import build_prior  # noqa: E402

run_step(
    snakemake.log[0],
    build_prior,
    settings=dict(snakemake.params.settings),
    out=snakemake.output[0],
    cache_dir=snakemake.params.cache_dir,
)
