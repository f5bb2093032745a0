"""The perturbation models of the benchmark: the grid of ``perturbation.sweep``, each grid
point's training spec (and its masked-expression pretraining's), and its name in the table.

The config (``perturbation`` section, next to ``dataset``, ``splits`` and ``evaluation``)::

    perturbation:
      model: {preset: bioformer, c_m: 32, ...}        # as experiment.model; absent: no model
      train: {epochs: 20, lr: 0.005, ...}              # as experiment.train
      target: mean                                     # mean | cell (evoformer.tasks.perturbation)
      n_eval_controls: 32
      init: scratch                                    # scratch | pretrained
      prior: {source: planted, dataset: screen, drop: 0.5, add: 0.5}   # optional
      pretrain: {train: {epochs: 10, mask_ratio: 0.3}} # the pretraining of init: pretrained
      sweep: {preset: [none, bioformer], init: [scratch, pretrained]}

A sweep key is a model key (``preset``, ``c_z`` ...), a train key (``lr``, ``seed`` ...),
``init`` or ``prior`` (names of the top-level ``priors`` entries, or ``none``; it replaces
``perturbation.prior``; preset ``none`` with a prior is left out of the grid: without a pair
representation there is nothing for the prior to enter). Every grid point is trained on each split's training conditions
(validated on its validation conditions with ``train.monitor``, ``val_pearson_delta`` by
default: the same metric for every grid point) and is a method of the split's table, named by
:func:`method_name`. ``init: pretrained`` starts from a masked-expression model with the same
model settings and prior, trained on the same split's training cells (controls and training
conditions; never a validation or test condition's cells): :func:`pretrain_spec`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from evoformer.errors import InputError
from evoformer.experiments import NO_PRIOR, PRIOR_KEY, _check_value, _plain, _section_of
from evoformer.priors import prior_run_config
from evoformer.train_config import INITS, RunSpec, TrainConfig

#: The sweep key over where a model starts (:data:`evoformer.train_config.INITS`).
INIT_KEY = "init"
SECTION = "perturbation"
#: What early stopping follows unless ``perturbation.train.monitor`` says otherwise.
DEFAULT_MONITOR = "val_pearson_delta"
#: ``perturbation.pretrain.train`` defaults (masked expression on a screen's training cells).
PRETRAIN_DEFAULTS = {"mask_ratio": 0.3}


def has_model(config: dict[str, Any]) -> bool:
    """Whether the perturbation benchmark trains a model (``perturbation.model`` given)."""
    return (config.get(SECTION) or {}).get("model") is not None


def _sweep(config: dict[str, Any]) -> dict[str, list[Any]]:
    sweep = (config.get(SECTION) or {}).get("sweep") or {}
    for key, values in sweep.items():
        where = f"{SECTION}.sweep.{key}"
        if key == INIT_KEY:
            bad = [v for v in values if v not in INITS]
            if bad:
                raise InputError(f"config key '{where}': {bad[0]!r} is not one of {INITS}")
        elif key in ("n_hvg", "n_bins"):
            raise InputError(
                f"config key '{where}': the perturbation benchmark has one n_hvg and n_bins "
                "(perturbation.n_hvg, perturbation.n_bins)"
            )
        else:
            try:
                _section_of(key)
            except InputError as e:
                raise InputError(str(e).replace("'sweep.", f"'{SECTION}.sweep.")) from None
        if not isinstance(values, list) or not values:
            raise InputError(f"config key '{where}' must be a non-empty list of values")
        for v in values:
            try:
                _check_value(key, v)
            except InputError as e:
                raise InputError(str(e).replace("'sweep.", f"'{SECTION}.sweep.")) from None
        if len(set(map(repr, values))) != len(values):
            raise InputError(f"config key '{where}' lists a value twice")
    return sweep


def model_grid(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid points (sweep key -> value, in config order); ``[{}]`` without a sweep, ``[]``
    without a model."""
    if not has_model(config):
        return []
    sweep = _sweep(config)
    named = config.get("priors") or {}
    for v in sweep.get(PRIOR_KEY, []):
        if v != NO_PRIOR and v not in named:
            raise InputError(
                f"config key '{SECTION}.sweep.prior': {v!r} is not an entry of priors (entries: "
                f"{', '.join(sorted(named)) or 'none'}; or '{NO_PRIOR}')"
            )
    if PRIOR_KEY in sweep and config[SECTION].get("prior") is not None:
        raise InputError(
            f"config key '{SECTION}.prior': give the prior either there or as "
            f"{SECTION}.sweep.prior over the entries of priors, not both"
        )
    keys = list(sweep)
    points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*sweep.values())]
    # a prior has nothing to enter without a pair representation: a swept preset none with a
    # prior is left out of the grid (none x no prior stays: the model without z)
    return [
        p
        for p in points
        if not (
            "preset" in p
            and _prior(config, p)[0] is not None
            and _model_train(config, p)[0].get("preset", "bioformer") == "none"
        )
    ]


def point_id(point: dict[str, Any]) -> str:
    """The grid point as one path part: ``preset~bioformer_init~scratch`` (``default`` without
    a sweep)."""
    return "_".join(f"{k}~{v}" for k, v in point.items()) or "default"


def _prior(config: dict[str, Any], point: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    if PRIOR_KEY in point:
        name = point[PRIOR_KEY]
        if name == NO_PRIOR:
            return None, f"{SECTION}.sweep.{PRIOR_KEY}"
        return (config.get("priors") or {})[name], f"priors.{name}"
    return config[SECTION].get("prior"), f"{SECTION}.prior"


def point_prior(config: dict[str, Any], point: dict[str, Any]) -> dict[str, Any] | None:
    """What the training of ``point`` reads of its prior (``path`` ...; None without one)."""
    return prior_run_config(*_prior(config, point))


def configured_priors(config: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Every prior the model grid uses, with its config key (what the prior rule may build)."""
    out = []
    for point in model_grid(config):
        prior, key = _prior(config, point)
        if prior is not None and (prior, key) not in out:
            out.append((prior, key))
    return out


def _init(config: dict[str, Any], point: dict[str, Any]) -> str:
    return str(point.get(INIT_KEY, config[SECTION].get("init", "scratch")))


def is_pretrained(config: dict[str, Any], point: dict[str, Any]) -> bool:
    return _init(config, point) == "pretrained"


def pretrain_point(point: dict[str, Any]) -> dict[str, Any]:
    """The pretraining a grid point starts from: the point without ``init`` and train keys
    (model settings and prior decide the pretrained weights)."""
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in point.items() if k != INIT_KEY and k not in train_keys}


def _model_train(config: dict[str, Any], point: dict[str, Any]) -> tuple[dict, dict]:
    p = config[SECTION]
    model = dict(p.get("model") or {})
    train = {"monitor": DEFAULT_MONITOR, **(p.get("train") or {})}
    for key, value in point.items():
        if key in (INIT_KEY, PRIOR_KEY):
            continue
        section = _section_of(key)
        (model if section == "model" else train)[key] = _plain(value)
    return model, train


def run_spec(
    config: dict[str, Any], point: dict[str, Any], pretrained: str | None = None
) -> dict[str, Any]:
    """The plain training spec of a grid point (what ``perturb_train`` passes as JSON);
    ``pretrained``: the ``model.pt`` an ``init: pretrained`` point starts from (None: left
    out, for what does not read it: the pre-flight, the checks)."""
    p = config[SECTION]
    model, train = _model_train(config, point)
    spec = RunSpec.from_dict(
        {
            "task": "perturbation",
            "model": model,
            "train": train,
            "prior": point_prior(config, point),
            "perturbation": {
                "target": p.get("target", "mean"),
                "n_eval_controls": p.get("n_eval_controls", 32),
            },
            "init": pretrained if is_pretrained(config, point) else None,
        },
        where=SECTION,
    )
    return spec.to_dict()


def pretrain_spec(config: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The plain spec of the masked-expression pretraining of a grid point (its model settings
    and prior, ``perturbation.pretrain.train``; validated on the split's validation cells)."""
    pre = config[SECTION].get("pretrain") or {}
    model, _ = _model_train(config, point)
    spec = RunSpec.from_dict(
        {
            "model": model,
            "train": {**PRETRAIN_DEFAULTS, **(pre.get("train") or {})},
            "prior": point_prior(config, point),
            "val_mask_ratio": pre.get("val_mask_ratio", 0.15),
        },
        where=f"{SECTION}.pretrain",
    )
    return spec.to_dict()


def method_name(point: dict[str, Any], config: dict[str, Any]) -> str:
    """The grid point's name in the table: the preset, ``+pretrained``, ``+prior:<name>`` and
    the other swept keys as ``key=value`` (e.g. ``bioformer+pretrained+prior:noisy``)."""
    preset = point.get("preset", (config[SECTION].get("model") or {}).get("preset", "bioformer"))
    parts = [str(preset)]
    if is_pretrained(config, point):
        parts.append("pretrained")
    prior = point.get(PRIOR_KEY)
    if prior is None and config[SECTION].get("prior") is not None:
        parts.append("prior")
    elif prior not in (None, NO_PRIOR):
        parts.append(f"prior:{prior}")
    parts += [f"{k}={v}" for k, v in point.items() if k not in ("preset", INIT_KEY, PRIOR_KEY)]
    return "+".join(parts)


def check(config: dict[str, Any]) -> None:
    """Every grid point's spec (and pretraining spec) builds; batch arithmetic for the process
    counts; the method names are distinct. Raises InputError naming the key."""
    from evoformer.perturb.baselines import BASELINES

    points = model_grid(config)
    memory = config.get("memory") or {}
    names = {}
    for point in points:
        spec = RunSpec.from_dict(run_spec(config, point), where=SECTION)
        specs = [(spec, f"{SECTION}.train")]
        if is_pretrained(config, point):
            specs.append(
                (RunSpec.from_dict(pretrain_spec(config, point)), f"{SECTION}.pretrain.train")
            )
        for s, key in specs:
            for what, count in (
                ("train.cpu_processes", s.train.cpu_processes),
                ("memory.n_gpus", int(memory.get("n_gpus", 1))),
            ):
                if s.train.global_batch_size % (s.train.micro_batch_size * count):
                    raise InputError(
                        f"config key '{key}.global_batch_size' ({s.train.global_batch_size}) is "
                        f"not a multiple of micro_batch_size x processes "
                        f"({s.train.micro_batch_size} x {count} from {what}) at {point_id(point)}"
                    )
        name = method_name(point, config)
        if name in BASELINES or name in names:
            raise InputError(f"config key '{SECTION}.sweep': two methods named {name!r}")
        names[name] = point
