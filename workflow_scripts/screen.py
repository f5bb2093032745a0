"""Rule screen: generate a seeded synthetic Perturb-seq screen with a known answer
(evoformer.perturb.screen): the h5ad in the configured layout, the noise-free effects, the
per-condition facts and the planted network."""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.step import run_step  # noqa: E402
from evoformer.perturb.screen import write_screen  # noqa: E402

screen = dict(snakemake.params.screen)
run_step(
    snakemake.log[0],
    write_screen,
    out_h5ad=snakemake.output.h5ad,
    params=dict(screen["params"]),
    layout=screen["layout"],
)
