"""A prior network from a source through Snakemake: the prior rule builds it once (offline, from
the vendored extract), the training restricts it to the HVGs and uses it (init and bias), the
evaluation rebuilds the model, nothing reruns; an unknown source stops a dry run naming the key;
a sweep over named priors builds the noisy planted priors it uses from the true network."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow

PRIOR = {"source": "omnipath", "resources": ["CollecTRI"], "offline": True, "mode": "both"}
RUN = "results/pbmc68k/exp/n_hvg~32_n_bins~11_preset~bioformer/fold~holdout"
BUILT = "resources/priors/omnipath_collectri.tsv"


def _config(wf, name="prior", prior=PRIOR):
    """The CI configuration, one grid point (bioformer, holdout), with ``prior``."""
    return wf.config(
        name,
        experiment={"prior": prior},
        sweep={"preset": ["bioformer"]},
        cv={"enabled": False},
        split={"n_folds": 0},
    )


def test_an_unknown_source_stops_a_dry_run_naming_the_key(make_workflow):
    wf = make_workflow("bad_prior")
    proc = wf.run("--dry-run", configfile=_config(wf, prior={"source": "bogus"}), check=False)
    lines = [line for line in proc.stdout.splitlines() if "invalid config" in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout[-2000:]
    assert lines[0].startswith(
        "invalid config: config key 'experiment.prior.source': unknown source 'bogus'"
    ), lines


def test_a_source_prior_is_built_once_and_trains_a_model_that_uses_it(make_workflow):
    wf = make_workflow("prior")
    config = _config(wf)
    planned = wf.planned_jobs(configfile=config)
    assert planned.get("prior") == 1 and planned.get("train") == 1
    wf.run(f"{RUN}/eval/eval_metrics.json", configfile=config)
    built = (wf.root / BUILT).read_text()
    assert built.startswith("# prior gene-regulatory network")
    assert "# from: the vendored extract omnipath_pbmc.tsv" in built
    log = (wf.root / "logs/priors/omnipath_collectri.log").read_text()
    assert "edges among" in log and "regulators" in log
    # the training read it restricted to its 32 HVGs, and says how much of it is left
    train_log = next((wf.root / "logs/train").glob("*.log")).read_text()
    assert f"{BUILT}: " in train_log
    assert "edges among the 32 model genes" in train_log
    state = torch.load(wf.root / RUN / "train/model.pt", weights_only=True)["model"]
    assert {"prior", "prior_proj.weight", "prior_bias.weight"} <= set(state)
    assert state["prior"].shape == (32, 32) and torch.count_nonzero(state["prior"]) > 0
    assert torch.count_nonzero(state["prior_bias.weight"]) > 0  # trained away from 0
    metrics = json.loads((wf.root / RUN / "eval/eval_metrics.json").read_text())
    assert metrics
    # built once: nothing reruns
    assert wf.planned_jobs(f"{RUN}/eval/eval_metrics.json", configfile=config) == {}


TINY_PLANTED = {
    "kind": "planted",
    "value_type": "counts",
    "label_key": "cell_type",
    "planted": {"n_cells": 120, "n_genes": 16, "n_types": 2, "seed": 0, "r2_cells": 0},
}
NOISY = "resources/priors/planted_tiny_drop0.5_add0.25_seed1.tsv"


def _sweep_config(wf, name, dataset="tiny"):
    """One planted dataset, two named priors, a sweep over two of them (none, noisy)."""
    return wf.config(
        name,
        datasets={"tiny": TINY_PLANTED},
        experiment={"dataset": "tiny", "n_hvg": 16},
        priors={
            "exact": {"source": "planted", "dataset": dataset},
            "noisy": {
                "source": "planted",
                "dataset": dataset,
                "drop": 0.5,
                "add": 0.25,
                "seed": 1,
                "mode": "bias",
            },  # fmt: skip
        },
        sweep={"preset": ["bioformer"], "prior": ["none", "noisy"]},
    )


def test_a_prior_sweep_builds_the_noisy_planted_priors_it_uses(make_workflow):
    wf = make_workflow("prior_sweep")
    config = _sweep_config(wf, "sweep")
    planned = wf.planned_jobs(configfile=config)
    # one prior (exact is not swept), two grid points x 2 CV folds
    assert planned.get("prior") == 1 and planned.get("train") == 4 and planned.get("planted") == 1
    wf.run(NOISY, configfile=config)
    true = pd.read_csv(wf.root / "resources/planted/tiny_network.tsv", sep="\t")
    built = pd.read_csv(wf.root / NOISY, sep="\t", comment="#")
    n_true = len(true)
    assert (built["true"] == 1).sum() == n_true - round(0.5 * n_true)
    assert (built["true"] == 0).sum() == round(0.25 * n_true)
    true_edges = set(zip(true["source"], true["target"], strict=True))
    kept = built[built["true"] == 1]
    assert set(zip(kept["source"], kept["target"], strict=True)) <= true_edges
    log = (wf.root / "logs/priors/planted_tiny_drop0.5_add0.25_seed1.log").read_text()
    assert "planted edges kept" in log
    assert wf.planned_jobs(NOISY, configfile=config) == {}


def test_a_planted_prior_of_a_dataset_that_is_not_planted_stops_a_dry_run(make_workflow):
    wf = make_workflow("bad_planted_prior")
    config = _sweep_config(wf, "bad", dataset="pbmc68k")
    proc = wf.run("--dry-run", configfile=config, check=False)
    lines = [line for line in proc.stdout.splitlines() if "invalid config" in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout[-2000:]
    assert "config key 'priors.noisy.dataset': dataset 'pbmc68k' is of kind pbmc68k" in lines[0]
