# Evaluation on the held-out test cells (once per evaluated model: the CV-selected grid point's
# final retrain, or every grid point's holdout run without CV), and the result tables.


rule evaluate:
    input:
        model=f"{EXP_DIR}/fold~{{fold}}/train/model.pt",
        binned=lambda wc: f"{binned_dir(DATASET, wc.n_hvg, wc.n_bins)}/meta.json",
        split=lambda wc: split_file(DATASET),
        hvg=lambda wc: f"{hvg_dir(DATASET, wc.n_hvg)}/hvg.h5ad",
        prior=prior_input,
        network=lambda wc: network_file(DATASET),
    output:
        metrics=f"{EXP_DIR}/fold~{{fold}}/eval/eval_metrics.json",
        embeddings=f"{EXP_DIR}/fold~{{fold}}/eval/embeddings.h5ad",
        umap=report(
            f"{EXP_DIR}/fold~{{fold}}/eval/umap.png",
            caption="../report/umap.rst",
            category="Embeddings",
        ),
    log:
        f"logs/evaluate/{EXP_LOG}_{{fold}}.log",
    benchmark:
        f"results/benchmarks/evaluate/{EXP_LOG}_{{fold}}.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        fold=lambda wc: wc.fold,
        eval=lambda wc: canonical(config.get("evaluation") or {}),
    script:
        "../workflow_scripts/evaluate.py"


checkpoint cv_select:
    input:
        lambda wc: [p for r in cv_runs() for p in record_files(r)],
    output:
        f"results/{DATASET}/cv_selection.json",
    log:
        "logs/cv_select.log",
    benchmark:
        "results/benchmarks/cv_select.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        records=lambda wc: cv_runs(),
        sweep_keys=list(PARAMSPACE.dataframe.columns),
        selection_metric=experiments.selection_metric(config),
    script:
        "../workflow_scripts/cv_select.py"


rule tables:
    input:
        lambda wc: [p for r in table_records() for p in record_files(r)],
    output:
        summary=report(
            "results/tables/summary.md",
            caption="../report/summary.rst",
            category="Tables",
        ),
        metrics=report(
            "results/tables/metrics.tsv",
            caption="../report/metrics.rst",
            category="Tables",
        ),
        cv_summary=report(
            "results/tables/cv_summary.tsv",
            caption="../report/cv_summary.rst",
            category="Tables",
        ),
        performance=report(
            "results/tables/performance.tsv",
            caption="../report/performance.rst",
            category="Tables",
        ),
        metric_plot=report(
            "results/tables/metric_vs_key.png",
            caption="../report/metric_vs_key.rst",
            category="Plots",
        ),
        learning_curves=report(
            "results/tables/learning_curves.png",
            caption="../report/learning_curves.rst",
            category="Plots",
        ),
    log:
        "logs/tables.log",
    benchmark:
        "results/benchmarks/tables.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        records=lambda wc: table_records(),
        sweep_keys=list(PARAMSPACE.dataframe.columns),
        selection_metric=experiments.selection_metric(config),
        git_commit=GIT_COMMIT,
    script:
        "../workflow_scripts/tables.py"
