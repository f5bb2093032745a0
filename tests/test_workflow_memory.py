"""The memory pre-flight inside the pipeline: a step that cannot fit stops the run before any
training job starts (one line naming the key, the predicted peak and what would fit), and with
memory.auto_micro_batch the training runs with the micro-batch the pre-flight chose."""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

EXP = "results/pbmc68k/exp/n_hvg~32_n_bins~11_preset~bioformer"
# the CI model's step needs ~760 KiB at micro-batch 8 on the (emulated) GPU; 0.0005 GiB x 0.9
# = 472 KiB holds micro-batch 2 or 3 (without the workspace allowance, which alone is larger)
TINY_GPU = {"gpu_mem_gib": 0.0005, "workspace_mib": 0}


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    from tests.conftest import copy_workflow

    return copy_workflow(tmp_path_factory.mktemp("memory"))


def test_a_step_that_does_not_fit_stops_before_any_training(wf):
    cfg = wf.config("tiny", memory=TINY_GPU, sweep={"n_bins": [11], "preset": ["bioformer"]})
    proc = wf.run(configfile=cfg, check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("error: ")]
    assert errors, proc.stdout[-3000:]
    msg = errors[0]
    assert msg.startswith("error: config 'experiment.train.micro_batch_size': does not fit")
    assert "predicted peak" in msg and "dominant term" in msg and "micro_batch_size <= " in msg
    assert "rule train" not in proc.stdout and not (wf.root / "logs" / "train").exists()
    assert not (wf.root / EXP / "preflight.json").exists()


def test_auto_micro_batch_trains_with_the_micro_batch_the_preflight_chose(wf):
    cfg = wf.config(
        "auto",
        memory={**TINY_GPU, "auto_micro_batch": True},
        sweep={"n_bins": [11], "preset": ["bioformer"]},
        split={"n_folds": 0},
        cv={"enabled": False},
    )
    wf.run(f"{EXP}/fold~holdout/train/performance_summary.json", configfile=cfg)
    pf = json.loads((wf.root / EXP / "preflight.json").read_text())
    assert pf["adjusted"] and pf["fits"]
    assert pf["micro_batch_size"] < pf["requested_micro_batch_size"] == 8
    summary = json.loads(
        (wf.root / EXP / "fold~holdout/train/performance_summary.json").read_text()
    )
    train = summary["config"]["train"]
    assert train["micro_batch_size"] == pf["micro_batch_size"]
    # the global batch is kept: processes x micro-batch x accumulation
    info = json.loads((wf.root / EXP / "fold~holdout/train/run_info.json").read_text())
    world = info["world_size"]
    assert world * train["micro_batch_size"] * summary["grad_accumulation"] == 16
    metrics = pd.read_csv(wf.root / EXP / "fold~holdout/train/metrics.tsv", sep="\t")
    assert metrics["loss"].dropna().size > 0
