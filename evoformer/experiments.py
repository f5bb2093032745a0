"""Experiments: the base experiment of config.yaml, expanded over the sweep grid.

The config holds one base experiment and a grid::

    experiment:
      dataset: pbmc68k
      n_hvg: 64          # preprocessing variant: results/<dataset>/hvg<n_hvg>/bins<n_bins>/
      n_bins: 11
      model: {preset: bioformer, c_m: 32, ln_order: pre, ...}   # evoformer.model.ModelConfig
      train: {lr: 1e-3, seed: 0, ...}                          # evoformer.train_config.TrainConfig
    sweep:
      n_bins: [11, 21]
      ln_order: [pre, post]

A sweep key names a key of ``experiment`` (``n_hvg``, ``n_bins``), of ``experiment.model``
(``ln_order``, ``c_z``, ``c_opm``, ...) or of ``experiment.train`` (``lr``, ``seed``, ...);
the grid is the Cartesian product. Every grid point is a row of a table whose columns are
``n_hvg``, ``n_bins`` and the sweep keys, which Snakemake's ``Paramspace`` turns into readable
paths such as ``n_hvg~64/n_bins~11/ln_order~pre``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import Any

import pandas as pd

from evoformer.errors import InputError
from evoformer.model import ModelConfig
from evoformer.train_config import TrainConfig

#: Keys that choose the preprocessing variant; always columns of the grid.
DATA_KEYS = ("n_hvg", "n_bins")


def _section_of(key: str) -> str:
    """Which part of the experiment a sweep key lives in: 'data', 'model' or 'train'."""
    if key in DATA_KEYS:
        return "data"
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
        f"ln_order/c_z/c_opm, or a train key such as lr/seed)"
    )


def grid(config: dict[str, Any]) -> pd.DataFrame:
    """One row per grid point; columns ``n_hvg``, ``n_bins`` then the sweep keys in config order."""
    exp = config["experiment"]
    sweep = config.get("sweep") or {}
    for key, values in sweep.items():
        _section_of(key)
        if not isinstance(values, list) or not values:
            raise InputError(f"config key 'sweep.{key}' must be a non-empty list of values")
        if len(set(map(repr, values))) != len(values):
            raise InputError(f"config key 'sweep.{key}' lists a value twice")
    base = {k: exp[k] for k in DATA_KEYS}
    keys = list(DATA_KEYS) + [k for k in sweep if k not in DATA_KEYS]
    axes = [sweep.get(k, [base.get(k)]) if k in DATA_KEYS else sweep[k] for k in keys]
    rows = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]
    return pd.DataFrame(rows, columns=keys)


def spec(config: dict[str, Any], point: dict[str, Any], fold: int | str) -> dict[str, Any]:
    """Plain-typed training spec for one grid point and fold (what the train rule passes on).

    fold: an int k >= 0 (cross-validation fold k), ``"holdout"`` (train on the train split,
    validate on val) or ``"final"`` (train on train+val, the retrain of the selected point).
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
    ModelConfig.from_dict(model)  # fail early, at DAG building, on a bad key
    TrainConfig.from_dict(train)
    return {
        "model": model,
        "train": train,
        "fold": fold if isinstance(fold, int) else -1,
        "final": fold == "final",
        "prior": exp.get("prior"),
    }


def config_hash(obj: Any) -> str:
    """Short, stable hash of a plain-typed object (provenance column of the result tables)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def folds(config: dict[str, Any]) -> list[int | str]:
    """The training runs of each grid point: CV folds 0..k-1, or ``["holdout"]`` without CV."""
    if (config.get("cv") or {}).get("enabled") and config["split"].get("n_folds", 0) >= 2:
        return list(range(int(config["split"]["n_folds"])))
    return ["holdout"]


def _plain(value: Any) -> Any:
    """numpy/pandas scalars -> Python scalars (params must be plain types)."""
    return value.item() if hasattr(value, "item") else value
