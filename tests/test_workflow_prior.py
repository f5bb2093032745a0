"""A prior network from a source through Snakemake: the prior rule builds it once (offline, from
the vendored extract), the training restricts it to the HVGs and uses it (init and bias), the
evaluation rebuilds the model, nothing reruns; an unknown source stops a dry run naming the key."""

from __future__ import annotations

import json

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
