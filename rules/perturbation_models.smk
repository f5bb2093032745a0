# The perturbation models (perturbation.model; rules/common.smk: perturb_*): every grid point of
# perturbation.sweep is pre-flighted (the perturbation step traced, as for masked expression;
# the masked-expression pretraining's step too),
# trained on each split's training conditions (init pretrained: from a masked-expression model
# pretrained on the split's training cells), and predicts the split's validation and test
# conditions; perturb_evaluate scores the predictions beside the baselines.
PERTURB_HVG_DIR = hvg_dir(
    config["perturbation"]["dataset"], config["perturbation"]["n_hvg"]
)
PERTURB_MODEL_DIR = f"{PERTURB_HVG_DIR}/perturbation"


wildcard_constraints:
    model="[A-Za-z0-9_.+~-]+",
    pre="[A-Za-z0-9_.+~-]+",


rule perturb_preflight:
    input:
        meta=lambda wc: f"{perturbation_binned_dir()}/meta.json",
        cells=lambda wc: f"{perturbation_binned_dir()}/cells.tsv",
    output:
        json=f"{PERTURB_MODEL_DIR}/preflight/{{model}}.json",
    log:
        "logs/perturbation/preflight_{model}.log",
    benchmark:
        "results/benchmarks/perturbation/preflight_{model}.tsv"
    localrule: True
    conda:
        "../envs/train.yaml"
    params:
        preflight=perturb_preflight_params,
    script:
        "../workflow_scripts/preflight.py"


rule perturb_pretrain_preflight:
    input:
        meta=lambda wc: f"{perturbation_binned_dir()}/meta.json",
        cells=lambda wc: f"{perturbation_binned_dir()}/cells.tsv",
    output:
        json=f"{PERTURB_MODEL_DIR}/preflight/pretrain/{{pre}}.json",
    log:
        "logs/perturbation/preflight_pretrain_{pre}.log",
    benchmark:
        "results/benchmarks/perturbation/preflight_pretrain_{pre}.tsv"
    localrule: True
    conda:
        "../envs/train.yaml"
    params:
        preflight=perturb_pretrain_preflight_params,
    script:
        "../workflow_scripts/preflight.py"


rule perturb_pretrain:
    input:
        binned=lambda wc: perturbation_binned_files(),
        split=f"{PERTURB_MODEL_DIR}/{{split}}/split.tsv",
        preflight=f"{PERTURB_MODEL_DIR}/preflight/pretrain/{{pre}}.json",
        prior=lambda wc: perturb_prior_input(wc, perturb_pretrain_points()[wc.pre]),
    output:
        model=f"{PERTURB_MODEL_DIR}/{{split}}/pretrain/{{pre}}/train/model.pt",
        metrics=f"{PERTURB_MODEL_DIR}/{{split}}/pretrain/{{pre}}/train/metrics.tsv",
        summary=f"{PERTURB_MODEL_DIR}/{{split}}/pretrain/{{pre}}/train/performance_summary.json",
        run_info=f"{PERTURB_MODEL_DIR}/{{split}}/pretrain/{{pre}}/train/run_info.json",
        curve=f"{PERTURB_MODEL_DIR}/{{split}}/pretrain/{{pre}}/train/learning_curve.png",
    log:
        "logs/perturbation/pretrain_{split}_{pre}.log",
    benchmark:
        "results/benchmarks/perturbation/pretrain_{split}_{pre}.tsv"
    conda:
        "../envs/train.yaml"
    threads: lambda wc: perturb_pretrain_spec(wc)["train"]["cpu_processes"]
    params:
        spec=lambda wc: json.dumps(perturb_pretrain_spec(wc)),
        binned=lambda wc: perturbation_binned_dir(),
        ckpt=lambda wc: f"checkpoints/perturbation/{wc.split}/pretrain/{wc.pre}",
        repo=workflow.basedir,
        cpu_processes=lambda wc: perturb_pretrain_spec(wc)["train"]["cpu_processes"],
        out=lambda wc, output: str(Path(output.model).parent),
    shell:
        training_shell()


rule perturb_train:
    input:
        binned=lambda wc: perturbation_binned_files(),
        split=f"{PERTURB_MODEL_DIR}/{{split}}/split.tsv",
        hvg=f"{PERTURB_HVG_DIR}/hvg.h5ad",
        preflight=f"{PERTURB_MODEL_DIR}/preflight/{{model}}.json",
        prior=lambda wc: perturb_prior_input(wc, perturb_point(wc)),
        pretrained=perturb_pretrained_model,
    output:
        model=f"{PERTURB_MODEL_DIR}/{{split}}/models/{{model}}/train/model.pt",
        metrics=f"{PERTURB_MODEL_DIR}/{{split}}/models/{{model}}/train/metrics.tsv",
        summary=f"{PERTURB_MODEL_DIR}/{{split}}/models/{{model}}/train/performance_summary.json",
        run_info=f"{PERTURB_MODEL_DIR}/{{split}}/models/{{model}}/train/run_info.json",
        curve=f"{PERTURB_MODEL_DIR}/{{split}}/models/{{model}}/train/learning_curve.png",
    log:
        "logs/perturbation/train_{split}_{model}.log",
    benchmark:
        "results/benchmarks/perturbation/train_{split}_{model}.tsv"
    conda:
        "../envs/train.yaml"
    threads: lambda wc: perturb_train_spec(wc)["train"]["cpu_processes"]
    params:
        spec=lambda wc: json.dumps(perturb_train_spec(wc)),
        binned=lambda wc: perturbation_binned_dir(),
        ckpt=lambda wc: f"checkpoints/perturbation/{wc.split}/models/{wc.model}",
        repo=workflow.basedir,
        cpu_processes=lambda wc: perturb_train_spec(wc)["train"]["cpu_processes"],
        out=lambda wc, output: str(Path(output.model).parent),
    shell:
        training_shell("--hvg {input.hvg:q} ")


rule perturb_predict:
    input:
        model=f"{PERTURB_MODEL_DIR}/{{split}}/models/{{model}}/train/model.pt",
        binned=lambda wc: perturbation_binned_files(),
        split=f"{PERTURB_MODEL_DIR}/{{split}}/split.tsv",
        hvg=f"{PERTURB_HVG_DIR}/hvg.h5ad",
    output:
        predictions=f"{PERTURB_MODEL_DIR}/{{split}}/models/{{model}}/predictions.tsv",
    log:
        "logs/perturbation/predict_{split}_{model}.log",
    benchmark:
        "results/benchmarks/perturbation/predict_{split}_{model}.tsv"
    conda:
        "../envs/train.yaml"
    resources:
        mem_mb=lambda wc, input, attempt: data_resources.mem_mb(
            "perturb_evaluate", input.size_mb, attempt
        ),
        runtime=lambda wc, input, attempt: data_resources.runtime_min(
            "perturb_evaluate", input.size_mb, attempt
        ),
    params:
        binned=lambda wc: perturbation_binned_dir(),
    script:
        "../workflow_scripts/perturb_predict.py"
