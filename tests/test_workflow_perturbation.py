"""The perturbation benchmark through Snakemake: a small synthetic screen goes screen -> hvg ->
bin -> perturbation split -> evaluation -> tables; reruns are byte-identical, only changed
stages rerun, and bad perturbation settings stop a dry run with one line naming the key."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from evoformer.perturb.baselines import COMPETITORS
from evoformer.perturb.conditions import CONTROL, condition_genes

pytestmark = pytest.mark.slow

SCREEN = {
    "n_genes": 40,
    "n_regulators": 16,
    "n_modules": 2,
    "n_doubles_within": 5,
    "n_doubles_across": 5,
    "n_control": 300,
    "cells_per_condition": 30,
    "truth_cells": 400,
    "seed": 3,
}
PERTURBATION = {
    "dataset": "screen",
    "n_hvg": 20,
    "n_bins": 11,
    "splits": {"simulation": {"kind": "simulation", "seed": 0}, "double": {"kind": "double"}},
    "evaluation": {"n_bootstrap": 50},
}
TABLES = ("perturbation.tsv", "perturbation_summary.md", "perturbation_de_changes.png")


def _config(wf, name="perturb", **updates):
    base = {
        "tasks": ["perturbation"],
        "datasets": {
            "screen": {
                "kind": "screen",
                "value_type": "log1p",
                "screen": SCREEN,
                "perturbation": {"layout": "gears", "type": "knockdown", "min_cells": 5},
            }
        },
        "perturbation": PERTURBATION,
    }
    for key, value in updates.items():
        base[key] = value
    return wf.config(name, **base)


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "invalid config" in line]


@pytest.fixture(scope="module")
def screen_run(tmp_path_factory):
    from tests.conftest import copy_workflow

    wf = copy_workflow(tmp_path_factory.mktemp("perturbation"))
    config = _config(wf)
    wf.run(configfile=config)
    return wf, config


def test_the_chain_writes_the_table_without_leakage(screen_run):
    wf, _ = screen_run
    tables = wf.root / "results/tables"
    assert all((tables / name).stat().st_size > 0 for name in TABLES)
    table = pd.read_csv(tables / "perturbation.tsv", sep="\t")
    assert set(table["split"]) == {"simulation", "double"}
    assert set(COMPETITORS) <= set(table["method"]) and "oracle" in set(table["method"])
    assert {"dataset", "n_hvg", "git_commit", "value", "lo", "hi", "best_baseline"} <= set(
        table.columns
    )
    assert set(table.loc[table["split"] == "double", "subgroup"]) == {"combo_seen2", "all"}
    # no test condition has a cell in training, and the deltas' controls are training cells
    hvg = wf.root / "results/screen/hvg20"
    for split in ("simulation", "double"):
        cells = pd.read_csv(hvg / f"perturbation/{split}/split.tsv", sep="\t")
        perturbed = cells[cells["condition"] != CONTROL]
        sets = perturbed.groupby("condition")["set"].nunique()
        assert (sets == 1).all()
        test = set(perturbed.loc[perturbed["set"] == "test", "condition"])
        train = set(perturbed.loc[perturbed["set"] == "train", "condition"])
        assert test and train and not test & train
        details = json.loads((hvg / f"perturbation/{split}/eval/details.json").read_text())
        assert set(details["test_conditions"]) == test
        n_train_ctrl = ((cells["condition"] == CONTROL) & (cells["set"] == "train")).sum()
        assert details["n_train_control_cells"] == n_train_ctrl
    # every measured perturbed gene is among the genes, beyond the top 20
    genes = pd.read_csv(hvg / "genes.tsv", sep="\t")
    hv = genes[genes["highly_variable"]]
    perturbed_genes = {g for c in perturbed["condition"].unique() for g in condition_genes(c)}
    assert perturbed_genes <= set(hv.iloc[:, 0]) and len(hv) >= 20
    summary = (tables / "perturbation_summary.md").read_text()
    assert "## Split `simulation`" in summary and "## Split `double`" in summary
    assert "strongest baseline" in summary
    # the binned variant for models is built too
    assert (hvg / "bins11/meta.json").is_file()


def test_reruns_are_byte_identical_and_only_changed_stages_rerun(screen_run):
    wf, config = screen_run
    tables = wf.root / "results/tables"
    before = {name: (tables / name).read_bytes() for name in TABLES}
    assert wf.planned_jobs(configfile=config) == {}
    wf.run("--forcerun", "perturb_evaluate", "perturb_split", configfile=config)
    assert {name: (tables / name).read_bytes() for name in TABLES} == before
    # an evaluation setting reruns the evaluations and the tables, nothing upstream
    changed = _config(
        wf, "changed", perturbation={**PERTURBATION, "evaluation": {"n_bootstrap": 60}}
    )
    assert wf.planned_jobs(configfile=changed) == {
        "all": 1,
        "perturb_evaluate": 2,
        "perturb_tables": 1,
    }
    # one split's setting reruns that split's chain only
    splits = {**PERTURBATION["splits"], "double": {"kind": "double", "seed": 4}}
    changed = _config(wf, "split", perturbation={**PERTURBATION, "splits": splits})
    assert wf.planned_jobs(configfile=changed) == {
        "all": 1,
        "perturb_split": 1,
        "perturb_evaluate": 1,
        "perturb_tables": 1,
    }


def test_the_screen_matches_its_truth(screen_run):
    """The observed deltas of the screen's single perturbations follow the noise-free truth."""
    wf, _ = screen_run
    per = pd.read_csv(
        wf.root / "results/screen/hvg20/perturbation/simulation/eval/per_condition.tsv", sep="\t"
    )
    oracle = per[per["method"] == "oracle"]
    # the oracle (noise-free truth) is closer to the observed means than no change
    no_change = per[per["method"] == "no_change"]
    assert oracle["mse"].mean() < no_change["mse"].mean()
    assert np.nanmean(oracle["pearson_delta"]) > 0.5


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        (
            {"perturbation": {**PERTURBATION, "dataset": "nope"}},
            "invalid config: perturbation.dataset: unknown dataset 'nope'",
        ),
        (  # a typed parameter, checked by PerturbSplitParams (its unit tests cover the rest)
            {"perturbation": {**PERTURBATION, "splits": {"s": {"val_fraction": 1.5}}}},
            "invalid config: config key 'perturbation.splits.s.val_fraction'",
        ),
    ],
)
def test_bad_perturbation_settings_stop_a_dry_run(make_workflow, updates, message):
    wf = make_workflow("bad")
    proc = wf.run("--dry-run", configfile=_config(wf, **updates), check=False)
    lines = _error_lines(proc.stdout)
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout[-2000:]
    assert lines[0].startswith(message), lines


def test_a_screen_needs_its_perturbation_block_and_a_matching_type(make_workflow):
    wf = make_workflow("bad_screen")
    for block, message in (
        (None, "invalid config: datasets.screen.perturbation: a screen needs"),
        (
            {"layout": "gears", "type": "activation"},
            "invalid config: datasets.screen.perturbation.type: 'activation', but the screen",
        ),
    ):
        entry = {"kind": "screen", "value_type": "log1p", "screen": SCREEN}
        if block is not None:
            entry["perturbation"] = block
        proc = wf.run("--dry-run", configfile=_config(wf, datasets={"screen": entry}), check=False)
        lines = _error_lines(proc.stdout)
        assert proc.returncode != 0 and len(lines) == 1, proc.stdout[-2000:]
        assert lines[0].startswith(message), lines


def test_a_perturbation_only_config_needs_no_experiment_but_masked_expression_does(make_workflow):
    """tasks decides which sections are needed: a perturbation-only config plans without an
    experiment; asking for the masked-expression task without one is one line naming it."""
    import yaml

    wf = make_workflow("tasks")
    config = yaml.safe_load(_config(wf).read_text())
    for key in ("experiment", "sweep", "cv"):
        config.pop(key, None)
    path = wf.root / "no_experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    assert "perturb_tables" in wf.planned_jobs(configfile=path)
    config["tasks"] = ["masked_expression", "perturbation"]
    path.write_text(yaml.safe_dump(config))
    proc = wf.run("--dry-run", configfile=path, check=False)
    lines = _error_lines(proc.stdout)
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout[-2000:]
    assert lines[0].startswith("invalid config: experiment: required by the masked_expression")


# ----------------------------------------------------------------------------- the models
MODEL_SECTION = {
    "model": {"c_m": 16, "c_z": 8, "c_opm": 4, "n_heads_msa": 2, "c_hidden_msa": 8, "n_blocks": 1},
    "train": {
        "micro_batch_size": 8,
        "global_batch_size": 16,
        "epochs": 1,
        "warmup_steps": 2,
        "log_every": 2,
        "cpu_processes": 1,
    },  # fmt: skip
    "n_eval_controls": 4,
    "pretrain": {
        "train": {"micro_batch_size": 8, "global_batch_size": 16, "epochs": 1, "cpu_processes": 1}
    },  # fmt: skip
    "sweep": {"init": ["scratch", "pretrained"]},
}


def test_the_models_train_pretrain_and_join_the_table(make_workflow):
    """Each grid point of perturbation.sweep is pre-flighted, (pre)trained per split, predicts
    the split's held-out conditions and is a method of the table beside the baselines; a
    training setting reruns the trainings, predictions and tables, not the pretraining."""
    wf = make_workflow("models")
    section = {**PERTURBATION, "splits": {"simulation": {"kind": "simulation", "seed": 0}}}
    config = _config(wf, perturbation={**section, **MODEL_SECTION})
    jobs = wf.planned_jobs(configfile=config)
    assert jobs["perturb_preflight"] == 2 and jobs["perturb_train"] == 2
    assert jobs["perturb_pretrain"] == 1 and jobs["perturb_predict"] == 2
    assert jobs["perturb_pretrain_preflight"] == 1  # one per model settings and split
    wf.run(configfile=config)
    table = pd.read_csv(wf.root / "results/tables/perturbation.tsv", sep="\t")
    methods = set(table["method"])
    assert {"bioformer", "bioformer+pretrained"} <= methods
    assert set(COMPETITORS) <= methods  # the baselines, always
    summary = (wf.root / "results/tables/perturbation_summary.md").read_text()
    assert summary.splitlines()[2].startswith("**In short.**") and "`bioformer`" in summary
    models = wf.root / "results/screen/hvg20/perturbation/simulation/models"
    fine = json.loads((models / "init~pretrained/train/performance_summary.json").read_text())
    assert fine["task"] == "perturbation" and "gene_embedding.weight" in fine["init"]["copied"]
    n_val = fine["n_val_items"]  # the split's validation conditions, named in the summary
    assert n_val > 0 and f"Model selection on the {n_val} validation conditions" in summary
    preflight_file = wf.root / "results/screen/hvg20/perturbation/preflight/init~scratch.json"
    preflight = json.loads(preflight_file.read_text())
    assert preflight["fits"] and preflight["spec"]["task"] == "perturbation"
    lr = {**MODEL_SECTION, "train": {**MODEL_SECTION["train"], "lr": 0.002}}
    changed = _config(wf, "lr", perturbation={**section, **lr})
    assert wf.planned_jobs(configfile=changed) == {
        "all": 1,
        "perturb_train": 2,
        "perturb_predict": 2,
        "perturb_evaluate": 1,
        "perturb_tables": 1,
    }


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"init": ["warm"]}, "invalid config: config key 'perturbation.sweep.init': 'warm'"),
        ({"depth": [1]}, "invalid config: config key 'perturbation.sweep.depth' is not"),
        ({"prior": ["nope"]}, "invalid config: config key 'perturbation.sweep.prior': 'nope'"),
    ],
)
def test_bad_model_settings_stop_a_dry_run(make_workflow, sweep, message):
    wf = make_workflow("bad_model")
    section = {**PERTURBATION, **MODEL_SECTION, "sweep": sweep}
    proc = wf.run("--dry-run", configfile=_config(wf, perturbation=section), check=False)
    lines = _error_lines(proc.stdout)
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout[-2000:]
    assert lines[0].startswith(message), lines
