# Training: one job per grid point (Paramspace over n_hvg, n_bins and the sweep keys) and
# fold (CV folds 0..k-1, or "holdout"), plus the retrain of the CV-selected grid point on
# train+val ("final"). Each job gets its plain-typed spec as a JSON param; checkpoints live in
# checkpoints/ (not a declared output, so Snakemake's cleanup of a failed job keeps them).
# A job starts only after its grid point's memory pre-flight has passed (rules/memory.smk),
# and trains with the micro-batch the pre-flight chose under memory.auto_micro_batch. A failed
# training prints its one-line error (or the log's last lines) in Snakemake's output.


rule train:
    input:
        binned=lambda wc: binned_files(DATASET, wc.n_hvg, wc.n_bins),
        split=lambda wc: split_file(DATASET),
        preflight=f"{EXP_DIR}/preflight.json",
        prior=prior_input,
        # the final retrain's epochs come from the CV selection
        selection=lambda wc: (
            [checkpoints.cv_select.get().output[0]] if wc.fold == "final" else []
        ),
    output:
        model=f"{EXP_DIR}/fold~{{fold}}/train/model.pt",
        metrics=f"{EXP_DIR}/fold~{{fold}}/train/metrics.tsv",
        summary=f"{EXP_DIR}/fold~{{fold}}/train/performance_summary.json",
        run_info=f"{EXP_DIR}/fold~{{fold}}/train/run_info.json",
        curve=f"{EXP_DIR}/fold~{{fold}}/train/learning_curve.png",
    log:
        f"logs/train/{EXP_LOG}_{{fold}}.log",
    benchmark:
        f"results/benchmarks/train/{EXP_LOG}_{{fold}}.tsv"
    conda:
        "../envs/train.yaml"
    # CPU-only runs start train.cpu_processes processes (GPU jobs: one per GPU of the gres)
    threads: lambda wc: train_spec(wc)["train"]["cpu_processes"]
    params:
        spec=lambda wc: json.dumps(train_spec(wc)),
        binned=lambda wc: binned_dir(DATASET, wc.n_hvg, wc.n_bins),
        ckpt=lambda wc: f"checkpoints/{DATASET}/{PARAMSPACE.wildcard_pattern.format(**wc)}/{wc.fold}",
        repo=workflow.basedir,
        cpu_processes=lambda wc: train_spec(wc)["train"].get("cpu_processes", 2),
        out=lambda wc, output: str(Path(output.model).parent),
    shell:
        training_shell()
