# Helpers shared by the rules: config validation messages, the config slices each
# rule gets as params (plain dicts and scalars, so a change to an unrelated key
# never reruns a rule), the dataset paths and the target lists. The Snakefile
# validates the config (filling defaults) before the rules use these.
import contextlib
import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema

from evoformer import priors
from evoformer.data import resources as data_resources
from evoformer.data.arrays import BINNED_FILES
from evoformer.data.planted import planted_paths, resolve_planted_params
from evoformer.errors import InputError
from evoformer.memory.spec import MEMORY_TRAIN_KEYS
from evoformer.perturb.evaluate import PerturbEvalParams
from evoformer.perturb import models as perturb_models
from evoformer.perturb.layouts import PerturbSpec
from evoformer.perturb.screen import resolve_screen_params
from evoformer.perturb.splits import PerturbSplitParams

PBMC68K_PATH = "resources/pbmc68k.h5ad"
SYNTHETIC_DIR = "resources/synthetic"
PLANTED_DIR = "resources/planted"
SCREEN_DIR = "resources/screens"


def training_shell(extra_inputs=""):
    """The shell line of the rules that train (train, perturb_pretrain, perturb_train): the
    launcher on every node of the job (slurm/per_node.sh: torchrun, one process per GPU or
    train.cpu_processes on a CPU), the log in {log}, and on failure its first ``error:`` line
    (else its last 5 lines) on stderr, where Snakemake and Slurm's log show it.
    ``extra_inputs``: further ``--name {input.name:q} `` arguments (before --spec)."""
    return (
        "PYTHONPATH={params.repo:q}${{PYTHONPATH:+:$PYTHONPATH}} "
        "bash {params.repo:q}/slurm/per_node.sh "
        "python -m evoformer.launch --cpu-processes {params.cpu_processes} -- "
        "--binned {params.binned:q} --split {input.split:q} "
        + extra_inputs
        + "--spec {params.spec:q} --out {params.out:q} --ckpt-dir {params.ckpt:q} "
        "--preflight {input.preflight:q} "
        "> {log:q} 2>&1 || {{ rc=$?; "
        "grep -m1 '^error: ' {log:q} >&2 || tail -n 5 {log:q} >&2; exit $rc; }}"
    )


def canonical(obj):
    """A deep copy with every dict's keys sorted: a job's params are compared by their text
    with the last run's, so reordering keys in config.yaml must not rerun anything."""
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    return copy.deepcopy(obj)


def dataset_entry(name):
    """The config entry datasets.<name> (raises a one-line error for unknown names)."""
    if name not in config["datasets"]:
        raise WorkflowError(
            f"invalid config: unknown dataset {name!r}; "
            f"datasets: {', '.join(sorted(config['datasets']))}"
        )
    return config["datasets"][name]


def dataset_file(name):
    """The .h5ad file of a dataset, relative to the workflow directory; for a dataset
    given as several files (``paths:``), the list of them (read as one dataset)."""
    entry = dataset_entry(name)
    if entry["kind"] == "pbmc68k":
        return PBMC68K_PATH
    if entry["kind"] == "synthetic":
        return f"{SYNTHETIC_DIR}/{name}.h5ad"
    if entry["kind"] == "planted":
        return f"{PLANTED_DIR}/{name}.h5ad"
    if entry["kind"] == "screen":
        return f"{SCREEN_DIR}/{name}.h5ad"
    if entry.get("paths"):
        return list(entry["paths"])
    return entry["path"]


def network_file(name):
    """The true gene-gene network of a planted dataset ([] for other kinds)."""
    if dataset_entry(name)["kind"] == "planted":
        return [f"{PLANTED_DIR}/{name}_network.tsv"]
    return []


def expression_config(name):
    """How to read a dataset's expression: expression, value_type, label_key, and for a
    Perturb-seq dataset its perturbation block (absent otherwise, so that the params of
    other datasets stay as they were)."""
    entry = dataset_entry(name)
    keys = ("expression", "value_type", "label_key", "perturbation")
    return canonical({k: entry[k] for k in keys if k in entry})


def synthetic_config(name):
    """Generator parameters of a synthetic dataset."""
    entry = dataset_entry(name)
    if entry["kind"] != "synthetic":
        raise WorkflowError(f"dataset {name!r} is not of kind synthetic")
    return canonical(entry.get("synthetic", {}))


def planted_config(name):
    """Generator parameters of a planted-network dataset."""
    entry = dataset_entry(name)
    if entry["kind"] != "planted":
        raise WorkflowError(f"dataset {name!r} is not of kind planted")
    return canonical(entry.get("planted", {}))


def screen_config(name):
    """Generator parameters of a synthetic screen and the layout it is written in (its
    perturbation block's, the one it is read with)."""
    entry = dataset_entry(name)
    if entry["kind"] != "screen":
        raise WorkflowError(f"dataset {name!r} is not of kind screen")
    return canonical(
        {"params": entry.get("screen", {}), "layout": entry["perturbation"]["layout"]}
    )


def screen_side_file(name, what):
    """A synthetic screen's side file (what: truth, conditions, network); [] for other kinds."""
    if dataset_entry(name)["kind"] != "screen":
        return []
    suffix = {
        "truth": "_truth.npz",
        "conditions": "_conditions.tsv",
        "network": "_network.tsv",
    }
    return [f"{SCREEN_DIR}/{name}{suffix[what]}"]


# ------------------------------------------------------------------ the perturbation benchmark
def tasks():
    return config["tasks"]


def perturbation_config():
    """The perturbation section (validated: check_config refuses the task without it)."""
    return canonical(config["perturbation"])


def perturbation_dir():
    p = config["perturbation"]
    return f"{hvg_dir(p['dataset'], p['n_hvg'])}/perturbation"


def perturbation_split_params(split):
    """One named split's parameters (perturbation.splits.<split>)."""
    return canonical(config["perturbation"]["splits"][split])


def perturbation_eval_files(name):
    """``name`` (subgroups.tsv, per_condition.tsv, details.json) of every split's evaluation."""
    return [
        f"{perturbation_dir()}/{s}/eval/{name}"
        for s in config["perturbation"]["splits"]
    ]


def masked_expression_targets():
    """The masked-expression tables and memory table (task masked_expression)."""
    if "masked_expression" not in tasks():
        return []
    return [*rules.tables.output, *rules.memory_table.output]


def perturbation_targets():
    """The perturbation chain's final outputs, and the binned variant built for models."""
    if "perturbation" not in tasks():
        return []
    p = config["perturbation"]
    return [
        *binned_files(p["dataset"], p["n_hvg"], p["n_bins"]),
        "results/tables/perturbation.tsv",
        "results/tables/perturbation_summary.md",
        "results/tables/perturbation_de_changes.png",
    ]


def perturbation_provenance():
    """What every perturbation table row was made from (the split column is added per split)."""
    p = config["perturbation"]
    return {"dataset": p["dataset"], "n_hvg": p["n_hvg"], "git_commit": GIT_COMMIT}


def check_perturbation():
    """The perturbation section against the datasets (one line naming the key)."""
    if "perturbation" not in tasks():
        return
    if "perturbation" not in config:
        raise InputError(
            "tasks: perturbation needs a perturbation section (perturbation.dataset)"
        )
    p = config["perturbation"]
    if p["dataset"] not in config["datasets"]:
        raise InputError(
            f"perturbation.dataset: unknown dataset {p['dataset']!r}; "
            f"datasets: {', '.join(sorted(config['datasets']))}"
        )
    if config["datasets"][p["dataset"]].get("perturbation") is None:
        raise InputError(
            f"perturbation.dataset: datasets.{p['dataset']} has no perturbation block "
            "(how its cells' conditions are read)"
        )
    for name, split in p["splits"].items():
        PerturbSplitParams.from_dict(split, f"perturbation.splits.{name}")
    PerturbEvalParams.from_dict(p.get("evaluation"), "perturbation.evaluation")
    if perturb_models.has_model(config):
        if not config["binning"]["include_zero_genes"]:
            raise InputError(
                "binning.include_zero_genes: the perturbation model needs every gene as a "
                "token (true)"
            )
        perturb_models.check(config)
        experiments.source_priors(config)


# ------------------------------------------------------------------ the perturbation models
def perturb_model_points():
    """Grid point id -> grid point of the perturbation models (empty without a model)."""
    if "perturbation" not in tasks():
        return {}
    return {perturb_models.point_id(p): p for p in perturb_models.model_grid(config)}


def perturb_point(wildcards):
    return perturb_model_points()[wildcards.model]


def perturb_pretrain_points():
    """Pretraining id -> the grid point it is pretrained for (one per model settings)."""
    out = {}
    for p in perturb_model_points().values():
        if perturb_models.is_pretrained(config, p):
            pre = perturb_models.pretrain_point(p)
            out.setdefault(perturb_models.point_id(pre), p)
    return out


def perturb_pretrained_model(wildcards):
    """The pretrained model.pt a grid point of one split starts from ([] for init scratch)."""
    point = perturb_point(wildcards)
    if not perturb_models.is_pretrained(config, point):
        return []
    pre = perturb_models.point_id(perturb_models.pretrain_point(point))
    return [f"{perturbation_dir()}/{wildcards.split}/pretrain/{pre}/train/model.pt"]


def perturb_train_spec(wildcards):
    """The plain spec of one perturbation model of one split (its only config)."""
    pre = perturb_pretrained_model(wildcards)
    spec = perturb_models.run_spec(
        config, perturb_point(wildcards), pre[0] if pre else None
    )
    return canonical(spec)


def perturb_pretrain_spec(wildcards):
    point = perturb_pretrain_points()[wildcards.pre]
    return canonical(perturb_models.pretrain_spec(config, point))


def perturb_prior_input(wildcards, point):
    prior = perturb_models.point_prior(config, point)
    return [prior["path"]] if prior else []


def perturbation_binned_dir():
    p = config["perturbation"]
    return binned_dir(p["dataset"], p["n_hvg"], p["n_bins"])


def perturbation_binned_files():
    p = config["perturbation"]
    return binned_files(p["dataset"], p["n_hvg"], p["n_bins"])


def perturb_prediction_files(split):
    """The test predictions of every perturbation model of a split."""
    return [
        f"{perturbation_dir()}/{split}/models/{m}/predictions.tsv"
        for m in perturb_model_points()
    ]


def perturb_model_summaries():
    """Split -> method -> its training's performance_summary.json (the validation choice)."""
    if "perturbation" not in tasks():
        return {}
    return {
        s: {
            name: f"{perturbation_dir()}/{s}/models/{m}/train/performance_summary.json"
            for m, name in perturb_methods().items()
        }
        for s in config["perturbation"]["splits"]
    }


def perturb_methods():
    """Grid point id -> the method's name in the tables."""
    return {
        m: perturb_models.method_name(p, config)
        for m, p in perturb_model_points().items()
    }


def _perturb_preflight(spec, task):
    p = config["perturbation"]
    return canonical(
        {
            "model": spec["model"],
            "train": {k: v for k, v in spec["train"].items() if k in MEMORY_TRAIN_KEYS},
            "n_hvg": int(p["n_hvg"]),
            "n_bins": int(p["n_bins"]),
            "include_zero_genes": True,
            "prior": spec.get("prior") is not None,
            **({"prior_mode": spec["prior"]["mode"]} if spec.get("prior") else {}),
            **({"task": task} if task else {}),
            **config["memory"],
        }
    )


def perturb_preflight_params(wildcards):
    """What the pre-flight of a perturbation model reads (as preflight_params does)."""
    spec = perturb_models.run_spec(config, perturb_point(wildcards))
    return _perturb_preflight(spec, "perturbation")


def perturb_pretrain_preflight_params(wildcards):
    """What the pre-flight of a masked-expression pretraining reads (its own train keys)."""
    point = perturb_pretrain_points()[wildcards.pre]
    return _perturb_preflight(perturb_models.pretrain_spec(config, point), None)


def hvg_config():
    return canonical(config["hvg"])


def binning_config():
    return canonical(config["binning"])


def split_config():
    return canonical(config["split"])


def hvg_dir(dataset, n_hvg):
    return f"results/{dataset}/hvg{n_hvg}"


def binned_dir(dataset, n_hvg, n_bins):
    return f"{hvg_dir(dataset, n_hvg)}/bins{n_bins}"


def binned_files(dataset, n_hvg, n_bins):
    return [f"{binned_dir(dataset, n_hvg, n_bins)}/{f}" for f in BINNED_FILES]


def split_file(dataset):
    return f"results/{dataset}/split.tsv"


def preprocess_targets(experiment=None):
    """Binned files and split table of an experiment (default: the base experiment; nothing
    when the masked-expression task is not asked for)."""
    if experiment is None and "masked_expression" not in tasks():
        return []
    exp = config["experiment"] if experiment is None else experiment
    dataset_entry(exp["dataset"])
    return [
        *binned_files(exp["dataset"], exp["n_hvg"], exp["n_bins"]),
        split_file(exp["dataset"]),
    ]


@contextlib.contextmanager
def one_line_config_errors():
    """Turn a schema validation error into one line: 'invalid config: <key>: <what>'."""
    try:
        yield
    except WorkflowError as exc:
        cause = exc.__cause__ or exc.__context__
        if not isinstance(cause, jsonschema.ValidationError):
            raise
        err = jsonschema.exceptions.best_match([cause, *cause.context])
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise WorkflowError(f"invalid config: {key}: {err.message}") from None


def check_config():
    """Checks that the schema cannot express, with messages naming the key: every grid point's
    model and training settings, the evaluation settings, batch arithmetic, split sizes and the
    selection metric (evoformer.experiments.check), the datasets' planted and perturbation
    blocks, for every target, before any job runs.
    """
    try:
        check_datasets()
        check_perturbation()
    except InputError as e:
        raise WorkflowError(f"invalid config: {e}") from None
    if "masked_expression" in tasks():
        check_masked_expression()


def check_masked_expression():
    """The experiment, split and CV settings (task masked_expression)."""
    if "experiment" not in config:
        raise WorkflowError(
            "invalid config: experiment: required by the masked_expression task (tasks)"
        )
    name = config["experiment"]["dataset"]
    if name not in config["datasets"]:
        raise WorkflowError(
            f"invalid config: experiment.dataset: unknown dataset {name!r}; "
            f"datasets: {', '.join(sorted(config['datasets']))}"
        )
    if config["split"]["n_folds"] == 1:
        raise WorkflowError(
            "invalid config: split.n_folds: 1 fold is no cross-validation; use 0 (no CV) or >= 2"
        )
    if experiments.cv_enabled(config) and config["split"]["n_folds"] < 2:
        raise WorkflowError(
            "invalid config: split.n_folds: cv.enabled needs split.n_folds >= 2"
        )
    fractions = config["split"]["fractions"]
    if abs(sum(fractions.values()) - 1) > 1e-6:
        raise WorkflowError(
            f"invalid config: split.fractions: {fractions} must sum to 1"
        )
    if fractions["train"] <= 0:
        raise WorkflowError("invalid config: split.fractions.train: must be > 0")
    try:
        experiments.check(config, known_cells_by_label(name))
    except InputError as e:
        raise WorkflowError(f"invalid config: {e}") from None


def check_datasets():
    """The generator parameters of planted and screen datasets, and the perturbation blocks."""
    for ds, entry in config["datasets"].items():
        if entry["kind"] == "planted":
            resolve_planted_params(entry.get("planted") or {}, f"datasets.{ds}.planted")
        if entry["kind"] == "screen":
            if entry.get("perturbation") is None:
                raise InputError(
                    f"datasets.{ds}.perturbation: a screen needs a perturbation block "
                    "(layout: gears or scperturb, the layout it is written in)"
                )
            screen = resolve_screen_params(
                entry.get("screen") or {}, f"datasets.{ds}.screen"
            )
            declared = entry["perturbation"].get("type")
            if declared is not None and declared != screen["perturbation"]:
                raise InputError(
                    f"datasets.{ds}.perturbation.type: {declared!r}, but the screen makes "
                    f"{screen['perturbation']!r} perturbations (datasets.{ds}.screen)"
                )
        if entry.get("perturbation") is not None:
            PerturbSpec.from_config(ds, entry["perturbation"])


def known_cells_by_label(name):
    """Cells per label of a dataset whose files already exist and can be read (None otherwise:
    the split-size checks wait for the split job, which reports an unreadable file itself).
    """
    from collections import Counter

    from evoformer.data.split import cells_by_label

    entry = dataset_entry(name)
    files = dataset_file(name)
    files = files if isinstance(files, list) else [files]
    if not all(Path(f).exists() for f in files):
        return None
    label = entry.get("label_key") if config["split"].get("stratify", True) else None
    total = Counter()
    for f in files:
        try:
            total.update(cells_by_label(f, label))
        except (OSError, KeyError, ValueError):
            return None
    return dict(total)


# ------------------------------------------------------------------ experiments (training on)
# The grid of the base experiment (evoformer.experiments): columns n_hvg, n_bins and the
# sweep keys; Paramspace turns each row into a readable path n_hvg~64/n_bins~11/ln_order~pre.
def setup_experiments():
    global DATASET, PARAMSPACE, EXP_DIR, EXP_LOG, FOLDS
    DATASET = config["experiment"]["dataset"]
    PARAMSPACE = Paramspace(experiments.grid(config), filename_params="*")
    EXP_DIR = f"results/{DATASET}/exp/{PARAMSPACE.wildcard_pattern}"
    EXP_LOG = (
        f"{DATASET}_{PARAMSPACE.wildcard_pattern}"  # filename_params="*": no slashes
    )
    FOLDS = experiments.folds(config)


def _git_commit():
    """The workflow's commit (provenance of every table), or "unknown" outside a checkout."""
    try:
        return subprocess.run(
            ["git", "-C", workflow.basedir, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


GIT_COMMIT = _git_commit()


def point_of(wildcards):
    """The typed grid point (key -> value) of a job's wildcards."""
    return {k: experiments._plain(v) for k, v in PARAMSPACE.instance(wildcards).items()}


def fold_value(fold):
    return int(fold) if str(fold).isdigit() else str(fold)


def train_spec(wildcards):
    """Plain-typed training spec of one grid point and fold (the train rule's only config).
    The final retrain trains for the epochs early stopping chose in CV (cv_selection.json).
    """
    fold = fold_value(wildcards.fold)
    final_epochs = None
    if fold == "final":
        with open(checkpoints.cv_select.get().output[0]) as f:
            final_epochs = json.load(f).get("final_epochs")
    return canonical(experiments.spec(config, point_of(wildcards), fold, final_epochs))


def prior_input(wildcards):
    """The prior network file of a grid point (an input of training and evaluation when it has
    one): the given path, or the file the prior rule builds from its source."""
    prior = priors.prior_run_config(
        *experiments.point_prior(config, point_of(wildcards))
    )
    return [prior["path"]] if prior else []


def prior_settings(name):
    """The settings of the source prior resources/priors/<name>.tsv."""
    settings = experiments.source_priors(config).get(name)
    if settings is None:
        raise WorkflowError(
            f"{priors.prior_file(name)}: not a prior network experiment.prior or priors builds"
        )
    return settings


def prior_source_config(name):
    """The settings of the source prior <name> as plain types (the prior rule's params)."""
    return canonical(prior_settings(name).to_dict())


def prior_source_inputs(wildcards):
    """The input files of the prior rule (a planted prior's true network and gene table)."""
    settings = prior_settings(wildcards.prior_name)
    if not isinstance(settings, priors.PlantedPriorSettings):
        return {}
    if config["datasets"][settings.dataset]["kind"] == "screen":
        return {
            "network": screen_side_file(settings.dataset, "network")[0],
            "genes": screen_side_file(settings.dataset, "truth")[0],
        }
    _, network, genes = planted_paths(f"{PLANTED_DIR}/{settings.dataset}.h5ad")
    return {"network": str(network), "genes": str(genes)}


def run_dir(point, fold):
    return f"results/{DATASET}/exp/{PARAMSPACE.wildcard_pattern.format(**point)}/fold~{fold}"


def record(point, fold, evaluated):
    """One run of the result tables: grid point, fold, and the files of its outputs."""
    d = run_dir(point, fold)
    rec = {
        "id": PARAMSPACE.wildcard_pattern.format(**point),
        **point,
        "fold": fold,
        "performance_summary": f"{d}/train/performance_summary.json",
        "train_metrics": f"{d}/train/metrics.tsv",
        "spec": canonical(experiments.spec(config, point, fold)),
    }
    # provenance: everything that shaped this run, preprocessing included
    rec["config_hash"] = experiments.config_hash(
        {
            "spec": rec["spec"],
            "dataset": dataset_entry(DATASET),
            "n_hvg": point["n_hvg"],
            "n_bins": point["n_bins"],
            **{k: config[k] for k in ("hvg", "binning", "split")},
        }
    )
    if evaluated:
        rec["eval_metrics"] = f"{d}/eval/eval_metrics.json"
    return rec


def grid_points():
    return [
        {k: experiments._plain(v) for k, v in row.items()}
        for row in PARAMSPACE.dataframe.to_dict("records")
    ]


def cv_runs():
    """Records of every (grid point, fold) training run; not evaluated on test under CV."""
    return [
        record(p, f, evaluated=FOLDS == ["holdout"])
        for p in grid_points()
        for f in FOLDS
    ]


def table_records():
    """cv_runs plus, under CV, the final retrain of the selected grid point (evaluated on test)."""
    records = cv_runs()
    if FOLDS != ["holdout"]:
        with open(checkpoints.cv_select.get().output[0]) as f:
            selected = json.load(f)["selected"]
        records.append(record(selected, "final", evaluated=True))
    return records


def record_files(rec):
    return [
        rec[k]
        for k in ("performance_summary", "train_metrics", "eval_metrics")
        if k in rec
    ]


# ------------------------------------------------------------------ memory (pre-flight, reports)
def preflight_params(wildcards):
    """What the pre-flight of one grid point reads: the model, the training keys that change
    memory, the data shape keys and the memory section (the target GPU). Nothing else, as
    the training waits on the pre-flight and reruns when it reruns."""
    spec = experiments.spec(config, point_of(wildcards), FOLDS[0])
    return canonical(
        {
            "model": spec["model"],
            "train": {k: v for k, v in spec["train"].items() if k in MEMORY_TRAIN_KEYS},
            "n_hvg": int(wildcards.n_hvg),
            "n_bins": int(wildcards.n_bins),
            "include_zero_genes": bool(config["binning"]["include_zero_genes"]),
            "prior": spec["prior"] is not None,
            # only with a prior: the params (and the pre-flight) of other runs stay as they were
            **({"prior_mode": spec["prior"]["mode"]} if spec["prior"] else {}),
            **config["memory"],
        }
    )


def memory_report_files():
    """The per-experiment memory report JSONs of every grid point (for results/tables/memory.tsv)."""
    return [
        f"results/{DATASET}/exp/{PARAMSPACE.wildcard_pattern.format(**p)}/memory/memory_report.json"
        for p in grid_points()
    ]
