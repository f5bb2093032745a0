"""Experiments: the base experiment of config.yaml, expanded over the sweep grid, and every check
that must pass before any job starts.

The config holds one base experiment and a grid::

    experiment:
      dataset: pbmc68k
      n_hvg: 64          # preprocessing variant: results/<dataset>/hvg<n_hvg>/bins<n_bins>/
      n_bins: 11
      model: {preset: bioformer, c_m: 32, ln_order: pre, ...}   # evoformer.model.ModelConfig
      train: {lr: 1.0e-3, seed: 0, ...}                        # evoformer.train_config.TrainConfig
    sweep:
      n_bins: [11, 21]
      preset: [none, bioformer]

A sweep key names a key of ``experiment`` (``n_hvg``, ``n_bins``), of ``experiment.model``
(``preset``, ``ln_order``, ``c_z``, ...) or of ``experiment.train`` (``lr``, ``seed``, ...), or
is ``prior``; the grid is the Cartesian product.

``sweep.prior`` takes names of the entries of a top-level ``priors`` mapping (each what
``experiment.prior`` takes; :mod:`evoformer.priors`), and ``none`` for no prior; it replaces
``experiment.prior``, which must then be absent::

    priors:
      exact: {source: planted, dataset: planted}
      noisy: {source: planted, dataset: planted, drop: 0.5, add: 0.5}
    sweep:
      prior: [none, exact, noisy]

Every grid point is a row of a table whose columns are ``n_hvg``,
``n_bins`` and the sweep keys, which Snakemake's ``Paramspace`` turns into readable paths such as
``n_hvg~64/n_bins~11/ln_order~pre`` - so sweep values that are strings are restricted to
``[A-Za-z0-9_.+-]`` (never ``.`` or ``..``) and can never leave ``results/``.

:func:`check` runs at DAG time (the Snakefile calls it for every target): it builds every grid
point's :class:`~evoformer.train_config.RunSpec` (all types and values), the evaluation
settings, the batch arithmetic for the process counts, the split sizes and the selection metric,
and raises :class:`~evoformer.errors.InputError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from typing import Any

import pandas as pd

from evoformer.errors import InputError
from evoformer.model import ModelConfig
from evoformer.priors import (
    PlantedPriorSettings,
    check_planted_dataset,
    prior_run_config,
    prior_source,
)
from evoformer.train_config import BIN_SPACE_METRICS, VALIDATION_METRICS, RunSpec, TrainConfig

#: Keys that choose the preprocessing variant; always columns of the grid.
DATA_KEYS = ("n_hvg", "n_bins")
#: Sweep values that are strings become path parts: this much and no more.
SAFE_VALUE = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.+-]+$")
#: Grid keys that make bin-space validation metrics incomparable between grid points.
BIN_SPACE_KEYS = ("n_bins", "loss", "label_head")
#: The sweep key over prior networks, and its value for no prior.
PRIOR_KEY, NO_PRIOR = "prior", "none"


def _section_of(key: str) -> str:
    """Which part of the experiment a sweep key lives in: 'data', 'model', 'train' or 'prior'."""
    if key in DATA_KEYS:
        return "data"
    if key == PRIOR_KEY:
        return "prior"
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)} - {"profiler"}
    if key in model_keys and key in train_keys:
        raise InputError(f"config key 'sweep.{key}' is ambiguous (a model and a train key)")
    if key in model_keys:
        return "model"
    if key in train_keys:
        return "train"
    raise InputError(
        f"config key 'sweep.{key}' is not an experiment key (n_hvg, n_bins, a model key such as "
        f"preset/ln_order/c_z/c_opm, a train key such as lr/seed, or prior)"
    )


def _check_priors(config: dict[str, Any]) -> None:
    """``priors`` is a mapping of name -> prior; ``sweep.prior`` names its entries (or
    ``none``) and comes without ``experiment.prior``."""
    named = config.get("priors")
    if named is not None and not isinstance(named, dict):
        raise InputError(f"config key 'priors': expected a mapping of name -> prior, got {named!r}")
    named = named or {}
    if NO_PRIOR in named:
        raise InputError(
            f"config key 'priors.{NO_PRIOR}': '{NO_PRIOR}' means no prior in sweep.prior"
        )
    values = (config.get("sweep") or {}).get(PRIOR_KEY)
    if values is None:
        return
    if config["experiment"].get("prior") is not None:
        raise InputError(
            "config key 'experiment.prior': give the prior either there or as sweep.prior over "
            "the entries of priors, not both"
        )
    for v in values:
        if v != NO_PRIOR and v not in named:
            raise InputError(
                f"config key 'sweep.prior': {v!r} is not an entry of priors (entries: "
                f"{', '.join(sorted(named)) or 'none'}; or '{NO_PRIOR}')"
            )


def point_prior(config: dict[str, Any], point: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The prior of a grid point and its config key: ``priors.<name>`` when the grid sweeps
    ``prior`` (None for ``none``), else ``experiment.prior``."""
    if PRIOR_KEY in point:
        name = point[PRIOR_KEY]
        if name == NO_PRIOR:
            return None, f"sweep.{PRIOR_KEY}"
        return (config.get("priors") or {})[name], f"priors.{name}"
    return config["experiment"].get("prior"), "experiment.prior"


def configured_priors(config: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Every prior the config gives, with its key: ``experiment.prior``, the entries of
    ``priors`` the grid uses, and those of the perturbation models
    (:func:`evoformer.perturb.models.configured_priors`)."""
    from evoformer.perturb.models import configured_priors as perturbation_priors

    used = (config.get("sweep") or {}).get(PRIOR_KEY) or []
    named = config.get("priors") or {}
    out = [(named[n], f"priors.{n}") for n in used if n in named]
    experiment = config.get("experiment") or {}
    if experiment.get("prior") is not None:
        out.insert(0, (experiment["prior"], "experiment.prior"))
    if "perturbation" in (config.get("tasks") or []):
        out += [p for p in perturbation_priors(config) if p not in out]
    return out


def source_priors(config: dict[str, Any]) -> dict[str, Any]:
    """Name -> settings of every source prior the grid uses (what the ``prior`` rule builds).

    Raises:
        InputError: two priors build the same file with different settings, or a planted
            prior names a dataset that is not planted (:func:`check_planted_dataset`).
    """
    out: dict[str, Any] = {}
    for d, key in configured_priors(config):
        source = prior_source(d, key)
        if source is None:
            continue
        name, settings = source
        if name in out and out[name] != settings:
            raise InputError(
                f"config key '{key}': builds resources/priors/{name}.tsv like another prior, "
                "with other settings; give it a name"
            )
        if isinstance(settings, PlantedPriorSettings):
            check_planted_dataset(settings, config.get("datasets") or {}, key)
        out[name] = settings
    return out


def _check_value(key: str, value: Any) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"config key 'sweep.{key}': {value!r} is not a finite number")
        return
    if not isinstance(value, str) or not SAFE_VALUE.match(value):
        raise InputError(
            f"config key 'sweep.{key}': value {value!r} becomes part of a results path; use only "
            "letters, digits and _ . + - (not '.' or '..')"
        )


def grid(config: dict[str, Any]) -> pd.DataFrame:
    """One row per grid point; columns ``n_hvg``, ``n_bins`` then the sweep keys in config order."""
    exp = config["experiment"]
    sweep = config.get("sweep") or {}
    for key, values in sweep.items():
        _section_of(key)
        if not isinstance(values, list) or not values:
            raise InputError(f"config key 'sweep.{key}' must be a non-empty list of values")
        for v in values:
            _check_value(key, v)
        if len(set(map(repr, values))) != len(values):
            raise InputError(f"config key 'sweep.{key}' lists a value twice")
    _check_priors(config)
    base = {k: exp[k] for k in DATA_KEYS}
    keys = list(DATA_KEYS) + [k for k in sweep if k not in DATA_KEYS]
    axes = [sweep.get(k, [base.get(k)]) if k in DATA_KEYS else sweep[k] for k in keys]
    rows = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]
    return pd.DataFrame(rows, columns=keys)


def run_spec(
    config: dict[str, Any],
    point: dict[str, Any],
    fold: int | str,
    final_epochs: float | None = None,
) -> RunSpec:
    """The typed training spec of one grid point and fold.

    fold: an int k >= 0 (cross-validation fold k), ``"holdout"`` (train on the train split,
    validate on val) or ``"final"`` (train on train+val, the retrain of the selected point, for
    ``final_epochs`` epochs when CV chose them by early stopping).
    """
    exp = config["experiment"]
    model = dict(exp.get("model") or {})
    train = dict(exp.get("train") or {})
    for key, value in point.items():
        section = _section_of(key)
        if section == "model":
            model[key] = _plain(value)
        elif section == "train":
            train[key] = _plain(value)
    evaluation = config.get("evaluation") or {}
    prior, prior_key = point_prior(config, point)
    return RunSpec.from_dict(
        {
            "model": model,
            "train": train,
            "fold": fold if isinstance(fold, int) else -1,
            "final": fold == "final",
            "prior": prior_run_config(prior, prior_key),
            "val_mask_ratio": evaluation.get("mask_ratio", 0.15),
            "final_epochs": final_epochs if fold == "final" else None,
        }
    )


def spec(
    config: dict[str, Any],
    point: dict[str, Any],
    fold: int | str,
    final_epochs: float | None = None,
) -> dict[str, Any]:
    """:func:`run_spec` as plain types (what the train rule passes on as JSON)."""
    return run_spec(config, point, fold, final_epochs).to_dict()


def config_hash(obj: Any) -> str:
    """Short, stable hash of a plain-typed object (provenance column of the result tables)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def cv_enabled(config: dict[str, Any]) -> bool:
    return bool((config.get("cv") or {}).get("enabled"))


def folds(config: dict[str, Any]) -> list[int | str]:
    """The training runs of each grid point: CV folds 0..k-1, or ``["holdout"]`` without CV."""
    if cv_enabled(config) and config["split"].get("n_folds", 0) >= 2:
        return list(range(int(config["split"]["n_folds"])))
    return ["holdout"]


def selection_metric(config: dict[str, Any]) -> str:
    return (config.get("cv") or {}).get("selection_metric", "val_expr_mse")


def check(config: dict[str, Any], n_cells_by_label: dict[str, int] | None = None) -> None:
    """Every check that can run before any job starts (see the module docstring).

    ``n_cells_by_label``: the dataset's cells per label (one key when it is unlabelled or the
    split is not stratified), when known without running a job; enables the split-size checks.
    """
    from evoformer.data.split import split_sizes
    from evoformer.evaluate import EvalParams

    EvalParams.from_dict(config.get("evaluation"), "evaluation")
    metric = selection_metric(config)
    if metric not in VALIDATION_METRICS:
        raise InputError(
            f"config key 'cv.selection_metric': {metric!r} is not a validation metric "
            f"({', '.join(VALIDATION_METRICS)})"
        )
    points = grid(config).to_dict("records")
    runs = folds(config)
    specs = [run_spec(config, point, runs[0]) for point in points]
    source_priors(config)
    memory = config.get("memory") or {}
    processes = {
        "train.cpu_processes": lambda s: s.train.cpu_processes,
        "memory.n_gpus": lambda s: int(memory.get("n_gpus", 1)),
    }
    for point, s in zip(points, specs, strict=True):
        t = s.train
        for what, count in processes.items():
            per_step = t.micro_batch_size * count(s)
            if t.global_batch_size % per_step:
                raise InputError(
                    f"config key 'experiment.train.global_batch_size' ({t.global_batch_size}) is "
                    f"not a multiple of micro_batch_size x processes ({t.micro_batch_size} x "
                    f"{count(s)} from {what}){_at(point)}"
                )
    split = config.get("split") or {}
    fractions = split.get("fractions", {"train": 0.8, "val": 0.1, "test": 0.1})
    if fractions.get("test", 0) <= 0:
        raise InputError("config key 'split.fractions.test': must be > 0 (the model is evaluated)")
    if fractions.get("val", 0) <= 0 and runs == ["holdout"]:
        raise InputError(
            "config key 'split.fractions.val': must be > 0 without cross-validation (early "
            "stopping and the best weights need validation cells); or set cv.enabled: true"
        )
    if runs != ["holdout"] and metric in BIN_SPACE_METRICS:
        varying = [k for k in BIN_SPACE_KEYS if _varies(k, points, specs)]
        if varying:
            raise InputError(
                f"config key 'cv.selection_metric': {metric} is a bin-space metric, not comparable "
                f"across grid points that differ in {', '.join(varying)}; use an expression-space "
                "metric such as val_expr_mse"
            )
    if n_cells_by_label:
        sizes = split_sizes(n_cells_by_label, fractions, int(split.get("n_folds", 0)))
        for name in ("train", "test") + (("val",) if runs == ["holdout"] else ()):
            if sizes[name] == 0:
                raise InputError(
                    f"config key 'split.fractions.{name}': leaves no {name} cells among the "
                    f"{sum(n_cells_by_label.values())} cells of dataset "
                    f"'{config['experiment']['dataset']}'"
                )
        n_train = sizes["train"] if runs == ["holdout"] else sizes["smallest_fold_train"]
        for point, s in zip(points, specs, strict=True):
            if s.train.global_batch_size > n_train:
                raise InputError(
                    f"config key 'experiment.train.global_batch_size' ({s.train.global_batch_size}) "
                    f"exceeds the {n_train} training cells of a run{_at(point)}"
                )


def _varies(key: str, points: list[dict[str, Any]], specs: list[RunSpec]) -> bool:
    if key == "n_bins":
        return len({p["n_bins"] for p in points}) > 1
    if key == "loss":
        return len({s.model.loss for s in specs}) > 1
    return len({getattr(s.train, key) for s in specs}) > 1


def _at(point: dict[str, Any]) -> str:
    return " at grid point " + ", ".join(f"{k}={v}" for k, v in point.items()) if point else ""


def _plain(value: Any) -> Any:
    """numpy/pandas scalars -> Python scalars (params must be plain types)."""
    return value.item() if hasattr(value, "item") else value
