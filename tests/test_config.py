"""Configuration: the schema lists exactly the dataclasses' keys, and every config error that can
be found before a job runs is found then, with one line naming the key (evoformer.experiments)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from evoformer.errors import InputError
from evoformer.evaluate import EvalParams
from evoformer.experiments import check, grid, run_spec
from evoformer.model import ModelConfig
from evoformer.train_config import ProfilerConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())
BASE = yaml.safe_load((ROOT / "config.yaml").read_text())
CELLS = {"A": 400, "B": 300}


def names(cls: type, skip: tuple[str, ...] = ()) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - set(skip)


def test_schema_lists_exactly_the_dataclass_keys() -> None:
    defs = SCHEMA["$defs"]
    assert set(defs["model"]["properties"]) == names(ModelConfig)
    assert set(defs["train"]["properties"]) == names(TrainConfig)
    assert set(defs["train"]["properties"]["profiler"]["properties"]) == names(ProfilerConfig)
    # fold / final are set per run by the rule, not by the user
    evaluation = SCHEMA["properties"]["evaluation"]["properties"]
    assert set(evaluation) == names(EvalParams, ("fold", "final"))
    train_enum = defs["train"]["properties"]["monitor"]["enum"]
    cv_enum = SCHEMA["properties"]["cv"]["properties"]["selection_metric"]["enum"]
    from evoformer.train_config import TASK_METRICS, VALIDATION_METRICS

    assert list(cv_enum) == list(VALIDATION_METRICS)
    every = [m for metrics in TASK_METRICS.values() for m in metrics]
    assert list(train_enum) == list(dict.fromkeys(every))


def test_schema_states_the_memory_defaults_of_the_preflight() -> None:
    """The memory section's defaults are the pre-flight's (memory.workspace_mib: WORKSPACE_MIB)."""
    from evoformer.memory.preflight import WORKSPACE_MIB, preflight

    memory = SCHEMA["properties"]["memory"]["properties"]
    assert memory["workspace_mib"]["default"] == WORKSPACE_MIB
    params = inspect.signature(preflight).parameters
    for key in ("safety_margin", "workspace_mib", "auto_micro_batch"):
        assert memory[key]["default"] == params[key].default, key


def test_schema_lists_exactly_the_perturbation_keys_and_defaults() -> None:
    """datasets.<name>.perturbation: the keys of PerturbSpec, its defaults, and each layout's
    default of a layout-dependent key stated in that key's description."""
    from evoformer.perturb.layouts import LAYOUT_DEFAULTS, LAYOUTS, TYPES, PerturbSpec

    entry = SCHEMA["properties"]["datasets"]["additionalProperties"]["properties"]
    block = entry["perturbation"]["properties"]
    assert set(block) == names(PerturbSpec)
    fields = {f.name: f for f in dataclasses.fields(PerturbSpec)}
    for key in ("min_cells", "strict"):
        assert block[key]["default"] == fields[key].default
    assert block["layout"]["enum"] == list(LAYOUTS)
    assert block["type"]["enum"] == [*TYPES, None]

    def shown(value: object) -> str:
        if value is None:
            return "null"
        return f"[{', '.join(value)}]" if isinstance(value, tuple) else str(value)

    for key in LAYOUT_DEFAULTS["gears"]:
        text = " ".join(block[key]["description"].split())
        expected = "; ".join(f"{lay}: {shown(LAYOUT_DEFAULTS[lay][key])}" for lay in LAYOUTS)
        assert f"({expected})" in text, (key, text)


def config(**updates) -> dict:
    cfg = copy.deepcopy(BASE)
    for dotted, value in updates.items():
        *path, last = dotted.split("__")
        node = cfg
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def test_the_default_config_passes() -> None:
    check(config(), CELLS)


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"evaluation__knn": 3}, "config key 'evaluation.knn' is unknown"),
        ({"experiment__train__epochs": "three"}, "'experiment.train.epochs': got 'three'"),
        ({"experiment__train__label_head": "false"}, "'experiment.train.label_head'"),
        ({"experiment__model__c_z": 8.5}, "'experiment.model.c_z': got 8.5"),
        ({"experiment__train__bogus": 1}, "'experiment.train.bogus' is unknown"),
        (
            {"experiment__train__global_batch_size": 24, "experiment__train__cpu_processes": 2},
            "'experiment.train.global_batch_size' (24) is not a multiple of micro_batch_size x "
            "processes (8 x 2 from train.cpu_processes)",
        ),
        (
            {"memory": {"n_gpus": 3}},
            "(8 x 3 from memory.n_gpus)",
        ),
        ({"sweep": {"ln_order": ["../../x"]}}, "'sweep.ln_order': value '../../x' becomes part"),
        ({"sweep": {"ln_order": [".."]}}, "value '..' becomes part of a results path"),
        ({"sweep": {"lr": [float("nan")]}}, "'sweep.lr': nan is not a finite number"),
        (
            {"cv__selection_metric": "val_loss"},
            "'cv.selection_metric': val_loss is a bin-space metric, not comparable across grid "
            "points that differ in n_bins",
        ),
        ({"cv__selection_metric": "val_accuracy"}, "'cv.selection_metric': 'val_accuracy'"),
        ({"split__fractions": {"train": 0.9, "val": 0.1, "test": 0.0}}, "split.fractions.test"),
        (
            {"cv__enabled": False, "split__fractions": {"train": 0.9, "val": 0.0, "test": 0.1}},
            "'split.fractions.val': must be > 0 without cross-validation",
        ),
        (
            {"split__fractions": {"train": 0.998, "val": 0.001, "test": 0.001}},
            "'split.fractions.test': leaves no test cells among the 700 cells",
        ),
        (
            {"experiment__train__global_batch_size": 512, "experiment__train__micro_batch_size": 8},
            "'experiment.train.global_batch_size' (512) exceeds the 315 training cells",
        ),
        ({"experiment__prior": {"path": "n.tsv", "min_gene_share": 2}}, "min_gene_share"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_bad_config_is_refused_naming_the_key(updates: dict, message: str) -> None:
    cfg = config(**{k: v for k, v in updates.items() if "__" in k})
    for key, value in updates.items():
        if "__" not in key:
            cfg[key] = value
    with pytest.raises(InputError) as err:
        check(cfg, CELLS)
    text = str(err.value)
    assert message in text, text
    assert "\n" not in text


def test_bin_space_selection_is_fine_when_the_grid_keeps_n_bins_and_loss() -> None:
    cfg = config(cv__selection_metric="val_loss")
    cfg["sweep"] = {"ln_order": ["pre", "post"]}
    check(cfg, CELLS)


def test_numeric_strings_are_read_as_numbers() -> None:
    """PyYAML reads 1e-3 as a string: accepted for float keys, as the number it means."""
    cfg = config(experiment__train__lr="1e-3")
    check(cfg, CELLS)
    spec = run_spec(cfg, grid(cfg).iloc[0].to_dict(), 0)
    assert spec.train.lr == 1e-3


def test_preset_sweep_and_final_epochs() -> None:
    cfg = config()
    rows = grid(cfg).to_dict("records")
    assert {r["preset"] for r in rows} == {"none", "bioformer"}
    s = run_spec(cfg, rows[0], "final", final_epochs=2.5)
    assert s.final and s.final_epochs == 2.5 and s.fold == -1
    assert run_spec(cfg, rows[0], 1, final_epochs=2.5).final_epochs is None


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_published_configs_are_valid(path: Path) -> None:
    import jsonschema

    from evoformer.perturb.evaluate import PerturbEvalParams
    from evoformer.perturb.splits import PerturbSplitParams

    cfg = yaml.safe_load(path.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(cfg)
    tasks = cfg.get("tasks", ["masked_expression"])
    if "masked_expression" in tasks:
        check(cfg)
    if "perturbation" in tasks:
        p = cfg["perturbation"]
        assert cfg["datasets"][p["dataset"]].get("perturbation")
        for name, split in p["splits"].items():
            PerturbSplitParams.from_dict(split, f"perturbation.splits.{name}")
        PerturbEvalParams.from_dict(p.get("evaluation"))


def test_the_journal_config_is_the_journal_constant_and_passes_the_preflight() -> None:
    from evoformer.memory.preflight import preflight
    from evoformer.memory.spec import JOURNAL, data_shape

    cfg = yaml.safe_load((ROOT / "configs" / "journal_a100.yaml").read_text())
    exp, mem = cfg["experiment"], cfg["memory"]
    # the yaml is a complete config; its model, data and step settings are the constant's
    assert exp["model"] == JOURNAL["model"]
    assert {k: exp["train"][k] for k in JOURNAL["train"]} == JOURNAL["train"]
    assert {k: exp[k] for k in JOURNAL["data"]} == JOURNAL["data"]
    assert not cfg["sweep"]
    s = run_spec(cfg, grid(cfg).iloc[0].to_dict(), "holdout")
    assert s.model == ModelConfig.from_dict(JOURNAL["model"])
    result = preflight(
        s.model.to_dict(),
        s.train.to_dict(),
        data_shape(exp["n_hvg"], exp["n_bins"]),
        mem["gpu_mem_gib"],
        n_gpus=mem["n_gpus"],
        safety_margin=mem["safety_margin"],
    )
    assert result.fits


def test_the_hvg2000_config_is_the_constant_and_fits_one_80_gib_gpu() -> None:
    """configs/hvg2000_a100.yaml (r = 2001) is :data:`HVG2000`; its verdict through the
    analytical model, which the pre-flight's trace confirms (tests/test_memory_offload.py, slow;
    BENCHMARKS.md): the GPU peak and the node's pinned host memory both fit."""
    from evoformer.memory.analytical import GIB, estimate
    from evoformer.memory.preflight import WORKSPACE_MIB
    from evoformer.memory.spec import HVG2000, data_shape, spec_from_config

    cfg = yaml.safe_load((ROOT / "configs" / "hvg2000_a100.yaml").read_text())
    exp, mem = cfg["experiment"], cfg["memory"]
    assert exp["model"] == HVG2000["model"]
    assert {k: exp["train"][k] for k in HVG2000["train"]} == HVG2000["train"]
    assert {k: exp[k] for k in HVG2000["data"]} == HVG2000["data"]
    s = run_spec(cfg, grid(cfg).iloc[0].to_dict(), "holdout")
    step = spec_from_config(
        s.model.to_dict(),
        s.train.to_dict(),
        data_shape(exp["n_hvg"], exp["n_bins"]),
        n_gpus=mem["n_gpus"],
    )
    a = estimate(step)
    margin = 1 - mem["safety_margin"]
    assert a.peak_bytes + WORKSPACE_MIB * 2**20 <= mem["gpu_mem_gib"] * GIB * margin
    assert a.host_bytes > 0
    assert mem["n_gpus"] * a.host_bytes <= mem["host_mem_gib"] * GIB * margin


def test_schema_lists_exactly_the_perturbation_benchmark_keys() -> None:
    from evoformer.perturb.evaluate import PerturbEvalParams
    from evoformer.perturb.splits import ControlFractions, PerturbSplitParams

    section = SCHEMA["properties"]["perturbation"]["properties"]
    split = section["splits"]["additionalProperties"]
    assert set(split["properties"]) == names(PerturbSplitParams)
    fractions = split["properties"]["control_fractions"]["properties"]
    assert set(fractions) == names(ControlFractions)
    assert set(section["evaluation"]["properties"]) == names(PerturbEvalParams)
    from evoformer.train_config import PerturbationSettings

    # the perturbation model: its task settings beside model/train/init/prior/pretrain/sweep
    model_keys = {"model", "train", "init", "prior", "pretrain", "sweep"}
    assert names(PerturbationSettings) <= set(section)
    assert set(section) == {"dataset", "n_hvg", "n_bins", "splits", "evaluation"} | model_keys | (
        names(PerturbationSettings)
    )
    for key in names(PerturbationSettings):
        default = dataclasses.asdict(PerturbationSettings())[key]
        assert section[key]["default"] == default, key


def test_peak_tflops_is_checked_and_left_out_of_the_spec_when_unset() -> None:
    """A reporting-only key: unset, the plain spec (and so every config hash, checkpoint and
    Snakemake parameter) is what it was before the key existed."""
    cfg = config()
    unset = run_spec(cfg, grid(cfg).iloc[0].to_dict(), "holdout").to_dict()
    assert "peak_tflops" not in unset["train"]
    cfg["experiment"]["train"]["peak_tflops"] = 312
    s = run_spec(cfg, grid(cfg).iloc[0].to_dict(), "holdout")
    assert s.train.peak_tflops == 312.0 and s.to_dict()["train"]["peak_tflops"] == 312.0
    with pytest.raises(InputError, match="train.peak_tflops"):
        TrainConfig.from_dict({"peak_tflops": 0})
