"""Rule prior: build a prior network from a source (evoformer.priors.build_source_prior).

input:  network, genes - a planted source's true network and gene table (none for omnipath)
output: resources/priors/<name>.tsv (omnipath: source, target, weight, sign, signed,
        curation_effort, resource, licence; planted: source, target, weight, sign, true;
        a # provenance header)
params: source    - omnipath or planted
        settings  - the prior's source settings (resources, organism, filters; dataset, drop...)
        cache_dir - the omnipath client's file cache
The log states where the edges came from and how many edges, genes and regulators it holds.
"""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.step import run_step  # noqa: E402
from evoformer.priors import build_source_prior  # noqa: E402

run_step(
    snakemake.log[0],
    build_source_prior,
    source=snakemake.params.source,
    settings=dict(snakemake.params.settings),
    out=snakemake.output[0],
    cache_dir=snakemake.params.cache_dir,
    network=snakemake.input.get("network"),
    genes=snakemake.input.get("genes"),
)
