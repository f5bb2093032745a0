"""The whole chain on the CI config (tiny model, 2 grid points x 2 CV folds + final retrain):
byte-identical result tables across clean runs, and reruns limited to what a change affects."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from tests.conftest import CI_CONFIG, copy_workflow

pytestmark = pytest.mark.slow

TABLES = (
    "results/tables/metrics.tsv",
    "results/tables/cv_summary.tsv",
    "results/tables/summary.md",
)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two clean copies of the workflow, each run once from scratch."""
    runs = [copy_workflow(tmp_path_factory.mktemp(f"clean{i}")) for i in range(2)]
    for wf in runs:
        wf.run()
    return runs


def test_clean_runs_give_byte_identical_tables(two_runs):
    a, b = two_runs
    for table in TABLES:
        assert (a.root / table).read_bytes() == (b.root / table).read_bytes(), table
    assert (a.root / "results/pbmc68k/cv_selection.json").is_file()
    finals = list((a.root / "results").rglob("fold~final/eval/eval_metrics.json"))
    assert len(finals) == 1  # the test split is evaluated once, for the selected grid point


def test_memory_reports_compare_three_estimates(two_runs):
    wf = two_runs[0]
    table = pd.read_csv(wf.root / "results/tables/memory.tsv", sep="\t")
    assert len(table) == 2 and table["fits"].all()  # one row per grid point
    # the CPU run's step measured by the profiler agrees with the trace of the same step
    assert (table["measured_source"] == "profiler").all()
    assert table["measured_over_traced"].between(0.9, 1.1).all(), table.to_string()
    assert table["traced_over_analytical"].between(0.8, 1.2).all(), table.to_string()
    for exp in wf.root.glob("results/pbmc68k/exp/*/"):
        for name in ("memory_report.md", "memory_report.html", "memory_breakdown.png"):
            assert (exp / "memory" / name).stat().st_size > 0
        assert "Verdict" in (exp / "memory" / "memory_report.md").read_text()


def test_nothing_reruns_after_a_full_run(two_runs):
    assert two_runs[0].planned_jobs() == {}


def test_a_training_key_reruns_training_and_downstream_only(two_runs):
    wf = two_runs[0]
    jobs = wf.planned_jobs(configfile=wf.config("lr", experiment={"train": {"lr": 0.005}}))
    assert set(jobs) <= {
        "train",
        "cv_select",
        "tables",
        "evaluate",
        "memory_report",
        "memory_table",
        "all",
    }
    assert jobs["train"] == 4  # 2 grid points x 2 folds (the final retrain follows selection)
    assert not {"hvg", "bin", "split", "pbmc68k"} & set(jobs)


def test_a_memory_setting_reruns_the_preflight_and_the_training_that_waits_on_it(two_runs):
    wf = two_runs[0]
    jobs = wf.planned_jobs(configfile=wf.config("gpu", memory={"gpu_mem_gib": 40}))
    assert jobs["preflight"] == 2 and jobs["train"] == 4, jobs
    assert not {"hvg", "bin", "split", "pbmc68k"} & set(jobs)


def test_reordered_config_keys_rerun_nothing(two_runs):
    wf = two_runs[0]
    cfg = yaml.safe_load(CI_CONFIG.read_text())
    flipped = {k: cfg[k] for k in reversed(list(cfg))}
    flipped["experiment"]["model"] = dict(reversed(list(cfg["experiment"]["model"].items())))
    path = wf.root / "reordered.yaml"
    path.write_text(yaml.safe_dump(flipped, sort_keys=False))
    assert wf.planned_jobs(configfile=path) == {}


def test_a_new_grid_point_runs_only_its_jobs(two_runs):
    wf = two_runs[0]
    cfg = wf.config("grid", sweep={"n_bins": [11, 21]})
    jobs = wf.planned_jobs(configfile=cfg)
    # two new grid points (n_bins 21): their binning and 2 x 2 fold trainings, then selection
    assert jobs.get("train") == 4 and jobs.get("bin") == 1
    assert not {"hvg", "split", "pbmc68k"} & set(jobs)
