"""Rule perturb_tables: the perturbation table, its summary and figure
(evoformer.perturb.report)."""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.step import run_step  # noqa: E402
from evoformer.perturb.report import write_perturbation_tables  # noqa: E402

facts = snakemake.input.facts
run_step(
    snakemake.log[0],
    write_perturbation_tables,
    eval_dirs={
        split: str(Path(path).parent)
        for split, path in zip(snakemake.params.splits, snakemake.input.subgroups, strict=True)
    },
    provenance=dict(snakemake.params.provenance),
    table=snakemake.output.table,
    summary=snakemake.output.summary,
    figure=snakemake.output.figure,
    facts=facts[0] if facts else None,
    model_summaries={k: dict(v) for k, v in dict(snakemake.params.model_summaries).items()},
)
