"""Splitting: fractions, stratification, held-out test set, CV folds, seeding, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from evoformer.data.datasets import make_synthetic
from evoformer.data.split import run_split, split_cells
from evoformer.errors import InputError

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


@pytest.fixture(scope="module")
def labelled():
    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b", "c", "rare"], size=1000, p=[0.5, 0.3, 0.18, 0.02])
    return np.array([f"cell{i}" for i in range(1000)]), labels


def test_fractions_and_stratification(labelled):
    ids, labels = labelled
    table = split_cells(ids, labels, FRACTIONS, seed=1)
    assert list(table.columns) == ["cell_id", "label", "split", "fold"]
    assert list(table.cell_id) == list(ids) and (table.fold == -1).all()
    share = table.split.value_counts(normalize=True)
    for name, f in FRACTIONS.items():
        assert abs(share[name] - f) < 0.01
    per_label = pd.crosstab(table.label, table.split, normalize="index")
    for name, f in FRACTIONS.items():
        assert (abs(per_label.loc[["a", "b", "c"], name] - f) < 0.02).all()
    assert (per_label.loc["rare"] > 0).all()  # 20 cells: a few in each split


def test_seeded_and_seed_sensitive(labelled):
    ids, labels = labelled
    a = split_cells(ids, labels, FRACTIONS, n_folds=3, seed=4)
    assert a.equals(split_cells(ids, labels, FRACTIONS, n_folds=3, seed=4))
    assert not a.split.equals(split_cells(ids, labels, FRACTIONS, n_folds=3, seed=5).split)


def test_cv_folds_cover_train_and_val_only(labelled):
    ids, labels = labelled
    table = split_cells(ids, labels, FRACTIONS, n_folds=4, seed=0)
    test = table.split == "test"
    assert (table.fold[test] == -1).all()
    folds = table.fold[~test]
    assert set(folds) == {0, 1, 2, 3}
    sizes = folds.value_counts()
    assert sizes.max() - sizes.min() <= 1
    per_label = pd.crosstab(table.label[~test], folds)
    assert (per_label.max(axis=1) - per_label.min(axis=1) <= 1).all()
    # folds do not move cells between the held-out test set and the rest
    assert table.split.equals(split_cells(ids, labels, FRACTIONS, n_folds=0, seed=0).split)


def test_unstratified_without_labels():
    ids = np.array([f"c{i}" for i in range(101)])
    table = split_cells(ids, None, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert list(table.columns) == ["cell_id", "split", "fold"]
    assert table.split.value_counts().to_dict() == {"train": 81, "val": 10, "test": 10}


@pytest.mark.parametrize(
    ("fractions", "n_folds", "message"),
    [
        ({"train": 0.8, "val": 0.1, "test": 0.2}, 0, "must sum to 1"),
        ({"train": 0.8, "val": 0.2}, 0, "expected keys train, val, test"),
        ({"train": 0.0, "val": 0.5, "test": 0.5}, 0, "train > 0"),
        (FRACTIONS, 1, r"split\.n_folds=1"),
    ],
)
def test_bad_split_settings(fractions, n_folds, message):
    with pytest.raises(InputError, match=message):
        split_cells(np.array(["a", "b", "c"]), None, fractions, n_folds=n_folds)


def test_run_split_reads_cells_only(tmp_path):
    path = tmp_path / "d.h5ad"
    make_synthetic(n_cells=200, n_genes=50, n_types=2, seed=0).write_h5ad(path)
    out = tmp_path / "split.tsv"
    split = {"fractions": FRACTIONS, "stratify": True, "n_folds": 2, "seed": 0}
    table = run_split(path, "d", "cell_type", split, out)
    written = pd.read_csv(out, sep="\t")
    assert list(written.columns) == ["cell_id", "label", "split", "fold"]
    assert written.equals(table.astype({"fold": "int64"}))
    # stratify off: same columns, label still reported
    unstratified = run_split(path, "d", "cell_type", {**split, "stratify": False}, out)
    assert list(unstratified.columns) == ["cell_id", "label", "split", "fold"]
    with pytest.raises(
        InputError, match=r"obs column 'celltype' \(datasets\.d\.label_key\) not found"
    ):
        run_split(path, "d", "celltype", split, tmp_path / "other.tsv")
    assert not (tmp_path / "other.tsv").exists()


def test_run_split_over_several_files(tmp_path):
    """One split over the cells of all files, the same as over one file holding them all."""
    data = make_synthetic(n_cells=200, n_genes=20, n_types=3, seed=0)
    parts = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    data[:80].copy().write_h5ad(parts[0])
    data[80:].copy().write_h5ad(parts[1])
    data.write_h5ad(tmp_path / "all.h5ad")
    split = {"fractions": FRACTIONS, "stratify": True, "n_folds": 2, "seed": 3}
    table = run_split(parts, "m", "cell_type", split, tmp_path / "parts.tsv")
    whole = run_split(tmp_path / "all.h5ad", "m", "cell_type", split, tmp_path / "all.tsv")
    assert table.equals(whole) and len(table) == 200
    data[70:90].copy().write_h5ad(parts[1])  # cells 70-79 in both files
    with pytest.raises(InputError, match=r"10 cell ids occur in more than one file"):
        run_split(parts, "m", "cell_type", split, tmp_path / "bad.tsv")
    assert not (tmp_path / "bad.tsv").exists()
