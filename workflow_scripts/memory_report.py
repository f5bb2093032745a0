"""Rule memory_report: analytical / traced / measured memory of one experiment (Markdown, HTML,
stacked bar chart, summary JSON), or, with output.tsv, the table across experiments
(evoformer.memory.report).

Per experiment -- input: preflight (preflight.json), summary (performance_summary.json,
optional); output: md, png, html (optional), json; params: experiment (name).
Summary table -- input: reports (the per-experiment JSONs); output: tsv
(results/tables/memory.tsv).
"""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.step import run_step  # noqa: E402
from evoformer.memory.report import memory_table_from_json, report  # noqa: E402

if "tsv" in snakemake.output.keys():
    run_step(
        snakemake.log[0],
        memory_table_from_json,
        paths=list(snakemake.input.reports),
        out_tsv=snakemake.output.tsv,
    )
else:
    run_step(
        snakemake.log[0],
        report,
        preflight_json=snakemake.input.preflight,
        performance_summary_json=snakemake.input.get("summary"),
        out_md=snakemake.output.md,
        out_png=snakemake.output.png,
        out_html=snakemake.output.get("html"),
        out_json=snakemake.output.json,
        experiment=str(snakemake.params.get("experiment", "")),
    )
