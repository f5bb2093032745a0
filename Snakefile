# evoformer-workflow: preprocessing (HVG selection, binning, splitting), the memory
# pre-flight, training (torchrun/DDP), evaluation, result tables and memory reports.
#
#   snakemake --cores all                      # the experiments of config.yaml
#   snakemake --cores all --configfile my.yaml # another configuration, instead of config.yaml
#                                              # (configs/*.yaml: the published experiments)
import sys

from snakemake.utils import Paramspace, validate

sys.path.insert(0, workflow.basedir)  # the evoformer package, also under --sdm conda
from evoformer import experiments

# A configuration given with --configfile replaces config.yaml (it is not merged into it):
# every file in configs/ is a complete description of its experiments.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "rules/common.smk"


# Validate against the schema, filling in its defaults; an error names the key.
with one_line_config_errors():
    validate(config, "schemas/config.schema.yaml")
check_config()


include: "rules/preprocess.smk"
include: "rules/priors.smk"


# The masked-expression experiment: grid, pre-flight, training, evaluation, tables.
if "masked_expression" in config["tasks"]:

    setup_experiments()

    wildcard_constraints:
        fold=r"\d+|holdout|final",
        n_hvg=r"\d+",
        n_bins=r"\d+",

    include: "rules/memory.smk"
    include: "rules/train.smk"
    include: "rules/evaluate.smk"


include: "rules/perturbation.smk"


# The perturbation models beside the perturbation benchmark's baselines.
if perturb_model_points():

    include: "rules/perturbation_models.smk"


rule all:
    default_target: True
    input:
        preprocess_targets(),
        masked_expression_targets(),
        perturbation_targets(),


# Only the preprocessing stages of the base experiment: snakemake preprocess
rule preprocess:
    input:
        preprocess_targets(),
