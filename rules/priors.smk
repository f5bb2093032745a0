# Prior networks from a curated source (experiment.prior.source): built once into
# resources/priors/<name>.tsv by evoformer.priors (the omnipath client with its cache in
# resources/priors/omnipath_cache, or the vendored extract offline); the training restricts
# the file to its HVGs. A local job (seconds): on a cluster the login node is the one that
# can reach the OmniPath web service. A prior given as a path needs no rule.


wildcard_constraints:
    prior_name=r"[A-Za-z0-9_.+-]+",


rule prior:
    output:
        f"{priors.PRIOR_DIR}/{{prior_name}}.tsv",
    log:
        "logs/priors/{prior_name}.log",
    benchmark:
        "results/benchmarks/priors/{prior_name}.tsv"
    localrule: True
    conda:
        "../envs/workflow.yaml"
    params:
        settings=lambda wc: prior_source_config(wc.prior_name),
        cache_dir=priors.OMNIPATH_CACHE,
    script:
        "../workflow_scripts/prior.py"
