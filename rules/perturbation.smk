# The perturbation benchmark (task `perturbation`, config section `perturbation`): a Perturb-seq
# screen goes hvg -> bin -> perturbation-level split -> baselines and evaluation on the test
# conditions -> results/tables/perturbation*, once per named split (perturbation.splits), all
# splits side by side in the table. The work is done by evoformer.perturb.


wildcard_constraints:
    split="[A-Za-z0-9_.-]+",


rule screen:
    output:
        h5ad=f"{SCREEN_DIR}/{{dataset}}.h5ad",
        truth=f"{SCREEN_DIR}/{{dataset}}_truth.npz",
        conditions=f"{SCREEN_DIR}/{{dataset}}_conditions.tsv",
        network=f"{SCREEN_DIR}/{{dataset}}_network.tsv",
    log:
        "logs/datasets/screen_{dataset}.log",
    benchmark:
        "results/benchmarks/datasets/screen_{dataset}.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=lambda wc, input, attempt: data_resources.mem_mb(
            "screen", input.size_mb, attempt
        ),
        runtime=lambda wc, input, attempt: data_resources.runtime_min(
            "screen", input.size_mb, attempt
        ),
    params:
        screen=lambda wc: screen_config(wc.dataset),
    script:
        "../workflow_scripts/screen.py"


rule perturb_split:
    input:
        hvg="results/{dataset}/hvg{n_hvg}/hvg.h5ad",
    output:
        split="results/{dataset}/hvg{n_hvg}/perturbation/{split}/split.tsv",
        summary="results/{dataset}/hvg{n_hvg}/perturbation/{split}/split_conditions.tsv",
    log:
        "logs/perturbation/split_{dataset}_hvg{n_hvg}_{split}.log",
    benchmark:
        "results/benchmarks/perturbation/split_{dataset}_hvg{n_hvg}_{split}.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=lambda wc, input, attempt: data_resources.mem_mb(
            "perturb_split", input.size_mb, attempt
        ),
        runtime=lambda wc, input, attempt: data_resources.runtime_min(
            "perturb_split", input.size_mb, attempt
        ),
    params:
        split=lambda wc: perturbation_split_params(wc.split),
        where=lambda wc: f"perturbation.splits.{wc.split}",
    script:
        "../workflow_scripts/perturb_split.py"


rule perturb_evaluate:
    input:
        hvg="results/{dataset}/hvg{n_hvg}/hvg.h5ad",
        split="results/{dataset}/hvg{n_hvg}/perturbation/{split}/split.tsv",
        truth=lambda wc: screen_side_file(wc.dataset, "truth"),
        # the perturbation models' predictions of this split's test conditions (if any)
        predictions=lambda wc: perturb_prediction_files(wc.split),
    output:
        subgroups="results/{dataset}/hvg{n_hvg}/perturbation/{split}/eval/subgroups.tsv",
        per_condition="results/{dataset}/hvg{n_hvg}/perturbation/{split}/eval/per_condition.tsv",
        details="results/{dataset}/hvg{n_hvg}/perturbation/{split}/eval/details.json",
    log:
        "logs/perturbation/evaluate_{dataset}_hvg{n_hvg}_{split}.log",
    benchmark:
        "results/benchmarks/perturbation/evaluate_{dataset}_hvg{n_hvg}_{split}.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=lambda wc, input, attempt: data_resources.mem_mb(
            "perturb_evaluate", input.size_mb, attempt
        ),
        runtime=lambda wc, input, attempt: data_resources.runtime_min(
            "perturb_evaluate", input.size_mb, attempt
        ),
    params:
        evaluation=lambda wc: perturbation_config()["evaluation"],
        methods=lambda wc: list(perturb_methods().values()),
    script:
        "../workflow_scripts/perturb_evaluate.py"


rule perturb_tables:
    input:
        subgroups=lambda wc: perturbation_eval_files("subgroups.tsv"),
        per_condition=lambda wc: perturbation_eval_files("per_condition.tsv"),
        details=lambda wc: perturbation_eval_files("details.json"),
        facts=lambda wc: screen_side_file(
            perturbation_config()["dataset"], "conditions"
        ),
        # the models' trainings: the validation metric each reached (the model selection)
        model_summaries=lambda wc: [
            f for split in perturb_model_summaries().values() for f in split.values()
        ],
    output:
        table=report(
            "results/tables/perturbation.tsv",
            caption="../report/perturbation.rst",
            category="Perturbation",
        ),
        summary=report(
            "results/tables/perturbation_summary.md",
            caption="../report/perturbation_summary.rst",
            category="Perturbation",
        ),
        figure=report(
            "results/tables/perturbation_de_changes.png",
            caption="../report/perturbation_de_changes.rst",
            category="Perturbation",
        ),
    log:
        "logs/perturbation/tables.log",
    benchmark:
        "results/benchmarks/perturbation/tables.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=lambda wc, input, attempt: data_resources.mem_mb(
            "perturb_tables", input.size_mb, attempt
        ),
        runtime=lambda wc, input, attempt: data_resources.runtime_min(
            "perturb_tables", input.size_mb, attempt
        ),
    params:
        provenance=lambda wc: perturbation_provenance(),
        splits=lambda wc: list(config["perturbation"]["splits"]),
        model_summaries=lambda wc: perturb_model_summaries(),
    script:
        "../workflow_scripts/perturb_tables.py"
