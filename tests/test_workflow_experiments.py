"""The whole chain on the CI config (tiny model, 2 grid points x 2 CV folds + final retrain):
byte-identical result tables across clean runs, and reruns limited to what a change affects."""

from __future__ import annotations

import pytest

from tests.conftest import copy_workflow

pytestmark = pytest.mark.slow

TABLES = ("results/tables/metrics.tsv", "results/tables/cv_summary.tsv")


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


def test_nothing_reruns_after_a_full_run(two_runs):
    assert two_runs[0].planned_jobs() == {}


def test_a_training_key_reruns_training_and_downstream_only(two_runs):
    wf = two_runs[0]
    jobs = wf.planned_jobs(configfile=wf.config("lr", experiment={"train": {"lr": 0.005}}))
    assert set(jobs) <= {"train", "cv_select", "tables", "evaluate", "all"}
    assert jobs["train"] == 4  # 2 grid points x 2 folds (the final retrain follows selection)
    assert not {"hvg", "bin", "split", "pbmc68k"} & set(jobs)


def test_a_new_grid_point_runs_only_its_jobs(two_runs):
    wf = two_runs[0]
    cfg = wf.config("grid", sweep={"n_bins": [11, 21], "ln_order": ["pre", "post"]})
    jobs = wf.planned_jobs(configfile=cfg)
    # two new grid points (n_bins 21): their binning and 2 x 2 fold trainings, then selection
    assert jobs.get("train") == 4 and jobs.get("bin") == 1
    assert not {"hvg", "split", "pbmc68k"} & set(jobs)
