"""The preprocessing workflow end to end: outputs, rerun behaviour, bad input.

One module-scoped run of the CI configuration; rerun behaviour is asserted with dry runs
of changed configurations against it (they plan, never run, so they do not interfere).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from evoformer.data import resources as data_resources
from evoformer.data.arrays import BinnedData

pytestmark = pytest.mark.slow

BINNED = "results/pbmc68k/hvg32/bins11"


def test_full_run_outputs(preprocessed_workflow):
    root = preprocessed_workflow.root
    data = BinnedData.open(root / BINNED)
    split = pd.read_csv(root / "results/pbmc68k/split.tsv", sep="\t")
    assert data.meta["n_genes"] == 32 and data.meta["n_bins"] == 11
    assert data.values.shape == (len(data), 32) and data.values.max() == 10
    assert len(split) == 700 and set(split.split) == {"train", "val", "test"}
    assert set(data.cells.cell_id) <= set(split.cell_id)
    merged = data.cells.merge(split, on="cell_id", suffixes=("", "_split"))
    assert (merged.label == merged.label_split).all()
    for path in (
        "results/pbmc68k/hvg32/hvg.h5ad",
        "results/pbmc68k/hvg32/genes.tsv",
        "results/pbmc68k/hvg32/hvg.png",
        "logs/hvg/pbmc68k_hvg32.log",
        "logs/bin/pbmc68k_hvg32_bins11.log",
        "logs/split/pbmc68k.log",
        "results/benchmarks/bin/pbmc68k_hvg32_bins11.tsv",
        "results/benchmarks/hvg/pbmc68k_hvg32.tsv",
    ):
        assert (root / path).is_file(), path


def test_nothing_reruns_after_a_full_run(preprocessed_workflow):
    assert preprocessed_workflow.planned_jobs("preprocess") == {}


@pytest.mark.parametrize(
    ("updates", "expected"),
    [
        # a new n_bins: binning only; HVG selection and the split are reused
        ({"experiment": {"n_bins": 21}}, {"bin": 1, "preprocess": 1}),
        # a new n_hvg: HVG selection and what follows; not the split
        ({"experiment": {"n_hvg": 48}}, {"hvg": 1, "bin": 1, "preprocess": 1}),
        # binning settings: binning only
        ({"binning": {"tie_mode": "deterministic"}}, {"bin": 1, "preprocess": 1}),
        # HVG settings: HVG selection and binning, not the split
        ({"hvg": {"flavor": "cell_ranger"}}, {"hvg": 1, "bin": 1, "preprocess": 1}),
        # split settings: the split only
        ({"split": {"seed": 1}}, {"split": 1, "preprocess": 1}),
    ],
    ids=["n_bins", "n_hvg", "binning", "hvg", "split"],
)
def test_reruns_only_what_a_change_affects(preprocessed_workflow, updates, expected):
    config = preprocessed_workflow.config("changed", **updates)
    assert preprocessed_workflow.planned_jobs("preprocess", configfile=config) == expected


def _error_lines(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if "invalid config" in line or line.startswith("error: ")
    ]


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        (
            {"experiment": {"dataset": "pbmc"}},
            "invalid config: experiment.dataset: unknown dataset 'pbmc'",
        ),
        (
            {"experiment": {"n_bins": 2}},
            "invalid config: experiment.n_bins: 2 is less than the minimum of 3",
        ),
        (
            {"experiment": {"n_hvg": "many"}},
            "invalid config: experiment.n_hvg: 'many' is not of type 'integer'",
        ),
        (
            {"hvg": {"n_top": 5}},
            "invalid config: hvg: Additional properties are not allowed ('n_top' was unexpected)",
        ),
        (
            {"binning": {"tie_mode": "scgpt"}},
            "invalid config: binning.tie_mode: 'scgpt' is not one of",
        ),
        (
            {"cv": {"enabled": "false"}},
            "invalid config: cv.enabled: 'false' is not of type 'boolean'",
        ),
        (
            {"evaluation": {"knn": 3}},
            "invalid config: evaluation: Additional properties are not allowed ('knn' was",
        ),
        (
            {"experiment": {"train": {"epochs": "three"}}},
            "invalid config: experiment.train.epochs: 'three' is not of type 'integer'",
        ),
        (
            {"sweep": {"ln_order": ["../x"]}},
            "invalid config: sweep.ln_order.0: '../x' is not",
        ),
        (
            {
                "sweep": {"n_bins": [11, 21]},
                "cv": {"enabled": True, "selection_metric": "val_loss"},
            },
            "invalid config: config key 'cv.selection_metric': val_loss is a bin-space metric",
        ),
        (
            {"experiment": {"train": {"global_batch_size": 24}}},
            "invalid config: config key 'experiment.train.global_batch_size' (24) is not a multiple",
        ),
    ],
    ids=[
        "unknown_dataset",
        "n_bins",
        "type",
        "unknown_key",
        "enum",
        "cv_string_bool",
        "evaluation_key",
        "train_type",
        "unsafe_sweep_value",
        "bin_space_selection",
        "batch_arithmetic",
    ],
)
def test_bad_config_stops_with_one_line(make_workflow, updates, message):
    wf = make_workflow("badconfig")
    proc = wf.run("--dry-run", configfile=wf.config("bad", **updates), check=False)
    assert proc.returncode != 0
    lines = _error_lines(proc.stdout)
    assert len(lines) == 1 and lines[0].startswith(message), proc.stdout[-2000:]


def test_preprocess_target_checks_the_training_settings_too(make_workflow):
    """`snakemake preprocess` runs no training, but a bad training key still stops it."""
    wf = make_workflow("preprocess_checks")
    cfg = wf.config("bad", experiment={"train": {"lr_warmup": 3}})
    proc = wf.run("preprocess", "--dry-run", configfile=cfg, check=False)
    assert proc.returncode != 0
    lines = _error_lines(proc.stdout)
    assert len(lines) == 1 and "experiment.train" in lines[0] and "lr_warmup" in lines[0]
    # PyYAML reads 1e-3 as a string: accepted as the number it means
    ok = wf.config("ok", experiment={"train": {"lr": "1e-3"}})
    assert wf.run("--dry-run", configfile=ok, check=False).returncode == 0


def test_bad_input_fails_the_rule_with_one_line_and_no_output(preprocessed_workflow, make_workflow):
    wf = make_workflow("badinput")
    shutil.copytree(preprocessed_workflow.root / "resources", wf.root / "resources")
    datasets = {
        "no_label": {
            "path": "resources/pbmc68k.h5ad",
            "expression": "raw",
            "value_type": "log1p",
            "label_key": "celltype",
        },
        "too_few_genes": {
            "path": "resources/pbmc68k.h5ad",
            "expression": "raw",
            "value_type": "log1p",
        },
        "missing": {"path": "resources/absent.h5ad", "value_type": "log1p"},
    }
    config = wf.config("bad", datasets=datasets)
    targets = ["results/no_label/split.tsv", "results/too_few_genes/hvg5000/hvg.h5ad"]
    proc = wf.run("--keep-going", *targets, configfile=config, check=False)
    assert proc.returncode != 0
    expected = {
        "logs/hvg/too_few_genes_hvg5000.log": "error: n_hvg=5000 is larger than the 765 genes of "
        "dataset 'too_few_genes' left after hvg.min_cells_per_gene=3",
        "logs/split/no_label.log": "error: resources/pbmc68k.h5ad: obs column 'celltype' "
        "(datasets.no_label.label_key) not found; obs columns: bulk_labels, n_genes, "
        "percent_mito, n_counts, S_score, G2M_score, phase, louvain",
    }
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error: ")]
    assert sorted(errors) == sorted(expected.values()), proc.stdout[-3000:]
    for log, error in expected.items():
        assert (wf.root / log).read_text().splitlines()[-1] == error
    written = [p for p in (wf.root / "results").rglob("*") if p.is_file()]
    assert all("benchmarks" in p.parts for p in written), written
    missing = wf.run("results/missing/split.tsv", configfile=config, check=False)
    assert missing.returncode != 0 and "resources/absent.h5ad" in missing.stdout


def test_synthetic_dataset_without_cv_and_non_zero_tokens(make_workflow):
    wf = make_workflow("synthetic")
    config = wf.config(
        "synthetic",
        experiment={"dataset": "tiny_synthetic", "n_hvg": 50, "n_bins": 5},
        hvg={"flavor": "seurat_v3", "min_cells_per_gene": 0},
        binning={"include_zero_genes": False, "tie_mode": "deterministic"},
        split={"n_folds": 0},
        cv={"enabled": False},
    )
    wf.run("preprocess", configfile=config)
    root = wf.root
    data = BinnedData.open(root / "results/tiny_synthetic/hvg50/bins5")
    meta = json.loads((root / "results/tiny_synthetic/hvg50/bins5/meta.json").read_text())
    assert meta["include_zero_genes"] is False and meta["tie_mode"] == "deterministic"
    genes, values = data.tokens(slice(None))
    assert ((values > 0) == (genes >= 0)).all() and values.max() == 4
    split = pd.read_csv(root / "results/tiny_synthetic/split.tsv", sep="\t")
    assert (split.fold == -1).all() and len(split) == 300
    assert np.isin(data.cells.label.unique(), ["type_0", "type_1", "type_2"]).all()


def test_dataset_of_several_files(make_workflow):
    """A dataset given as two h5ad parts (paths:) runs through preprocess as one dataset."""
    import anndata as ad

    from evoformer.data.datasets import make_synthetic

    wf = make_workflow("parts")
    data = make_synthetic(n_cells=300, n_genes=200, n_types=3, seed=1)
    (wf.root / "data").mkdir()
    data[:120].copy().write_h5ad(wf.root / "data/part_a.h5ad")
    data[120:, ::-1].copy().write_h5ad(wf.root / "data/part_b.h5ad")  # genes in another order
    datasets = {
        "parts": {
            "paths": ["data/part_a.h5ad", "data/part_b.h5ad"],
            "value_type": "counts",
            "label_key": "cell_type",
        }
    }
    config = wf.config(
        "parts",
        datasets=datasets,
        experiment={"dataset": "parts", "n_hvg": 40, "n_bins": 5},
        hvg={"flavor": "seurat", "min_cells_per_gene": 3},
        split={"n_folds": 0},
        cv={"enabled": False},
    )
    proc = wf.run("preprocess", configfile=config)
    data_dir = wf.root / "results/parts/hvg40/bins5"
    binned = BinnedData.open(data_dir)
    hvg = ad.read_h5ad(wf.root / "results/parts/hvg40/hvg.h5ad")
    split = pd.read_csv(wf.root / "results/parts/split.tsv", sep="\t")
    assert len(binned) == 300 and list(binned.cells.cell_id) == list(data.obs_names)
    assert list(hvg.obs.columns) == ["label", "source_file"]
    assert hvg.obs["source_file"].value_counts().to_dict() == {
        "data/part_a.h5ad": 120,
        "data/part_b.h5ad": 180,
    }
    assert len(split) == 300 and set(split.cell_id) == set(data.obs_names)
    # resources from the input size: the floor for a small dataset
    assert "mem_mb=2000" in proc.stdout and "runtime=10" in proc.stdout
    # path and paths together, or neither: one line naming the dataset
    bad = {"parts": {"path": "data/part_a.h5ad", "paths": ["data/part_b.h5ad"]}}
    for entry in (bad, {"parts": {"value_type": "counts"}}):
        proc = wf.run("--dry-run", configfile=wf.config("bad", datasets=entry), check=False)
        lines = _error_lines(proc.stdout)
        assert proc.returncode != 0 and len(lines) == 1, proc.stdout[-2000:]
        assert lines[0].startswith("invalid config: datasets.parts: "), lines


def test_resources_scale_with_the_input_size(make_workflow):
    """hvg and split ask for memory and time from their input's size (here two sparse files
    of 10 GiB each: no disk used), above the 2000 MB / 10 min floor; a dry run plans them."""
    wf = make_workflow("resources")
    (wf.root / "data").mkdir()
    for name in ("a", "b"):
        with open(wf.root / f"data/{name}.h5ad", "wb") as f:
            f.truncate(10 * 2**30)
    datasets = {"big": {"paths": ["data/a.h5ad", "data/b.h5ad"], "value_type": "counts"}}
    config = wf.config("big", datasets=datasets, experiment={"dataset": "big"})
    targets = ["results/big/hvg50/hvg.h5ad", "results/big/split.tsv"]
    out = wf.run("--dry-run", *targets, configfile=config).stdout
    resources = {
        rule: re.search(rf"rule {rule}:.*?resources: ([^\n]+)", out, flags=re.S).group(1)
        for rule in ("hvg", "split")
    }
    # the formulas of evoformer.data.resources on 20 GiB of input (hvg above the floor)
    for rule in ("hvg", "split"):
        mem, minutes = data_resources.mem_mb(rule, 20480), data_resources.runtime_min(rule, 20480)
        assert f"mem_mb={mem}" in resources[rule] and f"runtime={minutes}" in resources[rule]
    assert (
        data_resources.mem_mb("hvg", 20480) > 2000 and data_resources.runtime_min("hvg", 20480) > 10
    )
