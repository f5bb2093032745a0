# Preprocessing: dataset materialisation, HVG selection, binning, splitting.
# Each rule gets only the config slice it uses as params; the work is done by the
# evoformer package (evoformer/data), called from thin workflow_scripts.
# The data steps size their cluster resources from their input (all files of a multi-file
# dataset), times the attempt (a retry after an out-of-memory or time-out kill asks for
# more): evoformer.data.resources holds the formulas, checked against measured peaks at
# 10k, 100k and 1M cells by benchmarks/bench_hvg.py (BENCHMARKS.md states the margins).


wildcard_constraints:
    dataset="[A-Za-z0-9_.-]+",
    n_hvg=r"\d+",
    n_bins=r"\d+",


rule pbmc68k:
    output:
        PBMC68K_PATH,
    log:
        "logs/datasets/pbmc68k.log",
    benchmark:
        "results/benchmarks/datasets/pbmc68k.tsv"
    conda:
        "../envs/workflow.yaml"
    script:
        "../workflow_scripts/pbmc68k.py"


rule synthetic:
    output:
        f"{SYNTHETIC_DIR}/{{dataset}}.h5ad",
    log:
        "logs/datasets/synthetic_{dataset}.log",
    benchmark:
        "results/benchmarks/datasets/synthetic_{dataset}.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        synthetic=lambda wc: synthetic_config(wc.dataset),
    script:
        "../workflow_scripts/synthetic.py"


rule planted:
    output:
        h5ad=f"{PLANTED_DIR}/{{dataset}}.h5ad",
        network=f"{PLANTED_DIR}/{{dataset}}_network.tsv",
        genes=f"{PLANTED_DIR}/{{dataset}}_genes.tsv",
    log:
        "logs/datasets/planted_{dataset}.log",
    benchmark:
        "results/benchmarks/datasets/planted_{dataset}.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        planted=lambda wc: planted_config(wc.dataset),
    script:
        "../workflow_scripts/planted.py"


rule hvg:
    input:
        dataset=lambda wc: dataset_file(wc.dataset),
    output:
        h5ad="results/{dataset}/hvg{n_hvg}/hvg.h5ad",
        genes="results/{dataset}/hvg{n_hvg}/genes.tsv",
        plot="results/{dataset}/hvg{n_hvg}/hvg.png",
    log:
        "logs/hvg/{dataset}_hvg{n_hvg}.log",
    benchmark:
        "results/benchmarks/hvg/{dataset}_hvg{n_hvg}.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=lambda wc, input, attempt: data_resources.mem_mb(
            "hvg", input.size_mb, attempt
        ),
        runtime=lambda wc, input, attempt: data_resources.runtime_min(
            "hvg", input.size_mb, attempt
        ),
    params:
        dataset=lambda wc: expression_config(wc.dataset),
        hvg=hvg_config(),
    script:
        "../workflow_scripts/hvg.py"


rule bin:
    input:
        hvg="results/{dataset}/hvg{n_hvg}/hvg.h5ad",
    output:
        values="results/{dataset}/hvg{n_hvg}/bins{n_bins}/values.npy",
        gene_index="results/{dataset}/hvg{n_hvg}/bins{n_bins}/gene_index.npy",
        edges="results/{dataset}/hvg{n_hvg}/bins{n_bins}/edges.npy",
        expression_indptr="results/{dataset}/hvg{n_hvg}/bins{n_bins}/expression_indptr.npy",
        expression_slot="results/{dataset}/hvg{n_hvg}/bins{n_bins}/expression_slot.npy",
        expression_data="results/{dataset}/hvg{n_hvg}/bins{n_bins}/expression_data.npy",
        cells="results/{dataset}/hvg{n_hvg}/bins{n_bins}/cells.tsv",
        genes="results/{dataset}/hvg{n_hvg}/bins{n_bins}/genes.tsv",
        meta="results/{dataset}/hvg{n_hvg}/bins{n_bins}/meta.json",
    log:
        "logs/bin/{dataset}_hvg{n_hvg}_bins{n_bins}.log",
    benchmark:
        "results/benchmarks/bin/{dataset}_hvg{n_hvg}_bins{n_bins}.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: 4
    resources:
        mem_mb=lambda wc, input, attempt: data_resources.mem_mb(
            "bin", input.size_mb, attempt
        ),
        runtime=lambda wc, input, attempt: data_resources.runtime_min(
            "bin", input.size_mb, attempt
        ),
    params:
        binning=binning_config(),
    script:
        "../workflow_scripts/bin.py"


rule split:
    input:
        dataset=lambda wc: dataset_file(wc.dataset),
    output:
        "results/{dataset}/split.tsv",
    log:
        "logs/split/{dataset}.log",
    benchmark:
        "results/benchmarks/split/{dataset}.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=lambda wc, input, attempt: data_resources.mem_mb(
            "split", input.size_mb, attempt
        ),
        runtime=lambda wc, input, attempt: data_resources.runtime_min(
            "split", input.size_mb, attempt
        ),
    params:
        label_key=lambda wc: dataset_entry(wc.dataset)["label_key"],
        split=split_config(),
    script:
        "../workflow_scripts/split.py"
