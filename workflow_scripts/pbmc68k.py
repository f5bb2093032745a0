"""Rule pbmc68k: write scanpy's bundled pbmc68k_reduced to resources/ (no download)."""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.datasets import materialise_pbmc68k  # noqa: E402
from evoformer.data.step import run_step  # noqa: E402

run_step(snakemake.log[0], materialise_pbmc68k, out=snakemake.output[0])
