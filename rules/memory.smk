# Memory: the out-of-memory pre-flight of every grid point (a local job that traces the
# training step on fake tensors in seconds; the grid point's train jobs wait for it, so a
# configuration that cannot fit stops the run before its training is queued), the
# per-experiment memory report (analytical / traced / measured) and the table across
# experiments.


rule preflight:
    input:
        meta=lambda wc: f"{binned_dir(DATASET, wc.n_hvg, wc.n_bins)}/meta.json",
        cells=lambda wc: f"{binned_dir(DATASET, wc.n_hvg, wc.n_bins)}/cells.tsv",
    output:
        json=f"{EXP_DIR}/preflight.json",
    log:
        f"logs/preflight/{EXP_LOG}.log",
    benchmark:
        f"results/benchmarks/preflight/{EXP_LOG}.tsv"
    localrule: True
    conda:
        "../envs/train.yaml"
    params:
        preflight=preflight_params,
    script:
        "../workflow_scripts/preflight.py"


rule memory_report:
    input:
        preflight=f"{EXP_DIR}/preflight.json",
        summary=f"{EXP_DIR}/fold~{FOLDS[0]}/train/performance_summary.json",
    output:
        md=f"{EXP_DIR}/memory/memory_report.md",
        html=f"{EXP_DIR}/memory/memory_report.html",
        json=f"{EXP_DIR}/memory/memory_report.json",
        png=report(
            f"{EXP_DIR}/memory/memory_breakdown.png",
            caption="../report/memory_breakdown.rst",
            category="Memory",
        ),
    log:
        f"logs/memory_report/{EXP_LOG}.log",
    benchmark:
        f"results/benchmarks/memory_report/{EXP_LOG}.tsv"
    conda:
        "../envs/train.yaml"
    params:
        experiment=lambda wc: PARAMSPACE.wildcard_pattern.format(**point_of(wc)),
    script:
        "../workflow_scripts/memory_report.py"


rule memory_table:
    input:
        reports=memory_report_files(),
    output:
        tsv=report(
            "results/tables/memory.tsv",
            caption="../report/memory.rst",
            category="Tables",
        ),
    log:
        "logs/memory_table.log",
    benchmark:
        "results/benchmarks/memory_table.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/memory_report.py"
