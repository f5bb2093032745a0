# Prior networks from a source (experiment.prior.source, or the priors entries sweep.prior
# names): built once into resources/priors/<name>.tsv by evoformer.priors (omnipath: the client
# with its cache in resources/priors/omnipath_cache, or the vendored extract offline; planted: a
# noisy copy of a planted dataset's true network); the training restricts the file to its HVGs. A local job (seconds): on a cluster the login node is the one that
# can reach the OmniPath web service. A prior given as a path needs no rule.


wildcard_constraints:
    prior_name=r"[A-Za-z0-9_.+-]+",


rule prior:
    input:
        unpack(prior_source_inputs),
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
        source=lambda wc: priors.source_of(prior_settings(wc.prior_name)),
        settings=lambda wc: prior_source_config(wc.prior_name),
        cache_dir=priors.OMNIPATH_CACHE,
    script:
        "../workflow_scripts/prior.py"
