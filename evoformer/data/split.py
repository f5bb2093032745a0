"""Stage 3: train/val/test split and k-fold CV assignment of a dataset's cells.

The split depends on the cells (and their labels) and the split settings only, never on
HVG selection or binning, so changing ``n_hvg`` or ``n_bins`` does not re-split.
The test set is held out: it takes no part in training, model selection or the CV folds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from evoformer.data.datasets import DatasetSpec, read_cells
from evoformer.errors import InputError
from evoformer.io import atomic_path

SPLITS = ("train", "val", "test")


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    if set(fractions) != set(SPLITS):
        raise InputError(
            f"split.fractions: expected keys train, val, test, got {sorted(fractions)}"
        )
    out = {k: float(fractions[k]) for k in SPLITS}
    if any(not 0 <= v <= 1 for v in out.values()) or out["train"] <= 0:
        raise InputError(f"split.fractions={out}: each must be in [0, 1] and train > 0")
    if not math.isclose(sum(out.values()), 1.0, abs_tol=1e-6):
        raise InputError(f"split.fractions={out}: must sum to 1 (sum {sum(out.values()):.6g})")
    return out


def _group_sizes(size: int, frac: Mapping[str, float]) -> tuple[int, int]:
    """(test, val) cells of one label group of ``size`` cells; the rest is train."""
    n_test = math.floor(size * frac["test"] + 0.5)
    n_val = min(size - n_test, math.floor(size * frac["val"] + 0.5))
    return n_test, n_val


def split_sizes(
    n_by_label: Mapping[str, int], fractions: Mapping[str, float], n_folds: int = 0
) -> dict[str, int]:
    """The sizes :func:`split_cells` produces, from the cell count per label (one entry when
    unlabelled or not stratified): ``train``, ``val``, ``test`` and ``smallest_fold_train`` (the
    training cells of the CV fold with the most held-out cells; train+val without CV)."""
    frac = _check_fractions(fractions)
    sizes = {"train": 0, "val": 0, "test": 0}
    for size in n_by_label.values():
        n_test, n_val = _group_sizes(int(size), frac)
        sizes["test"] += n_test
        sizes["val"] += n_val
        sizes["train"] += int(size) - n_test - n_val
    trainval = sizes["train"] + sizes["val"]
    sizes["smallest_fold_train"] = trainval - (-(-trainval // n_folds) if n_folds else 0)
    return sizes


def split_cells(
    cell_ids: Sequence[str],
    labels: Sequence[str] | None,
    fractions: Mapping[str, float],
    n_folds: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """Assign each cell to train/val/test and (optionally) a CV fold.

    cell_ids: [N] unique ids. labels: [N] or None; when given, each label's cells are
    split in the given fractions (rounded per label, so tiny classes go to train first).
    n_folds: 0 (no CV) or k >= 2: train+val cells get folds 0..k-1, balanced per label;
    test cells get fold -1. Seeded: the same inputs give the same table.
    Returns a DataFrame [N] with columns cell_id[, label], split, fold in input order.
    """
    frac = _check_fractions(fractions)
    n = len(cell_ids)
    if n == 0:
        raise InputError("split: the dataset has no cells")
    if isinstance(n_folds, bool) or n_folds < 0 or n_folds == 1:
        raise InputError(f"split.n_folds={n_folds!r}: expected 0 (no CV) or an integer >= 2")
    rng = np.random.default_rng(seed)
    group_of = (
        np.zeros(n, dtype=np.int64)
        if labels is None
        else pd.factorize(np.asarray(labels), sort=True)[0]
    )
    split = np.empty(n, dtype=object)
    fold = np.full(n, -1, dtype=np.int64)
    fold_order: list[np.ndarray] = []
    for g in range(group_of.max() + 1):
        members = rng.permutation(np.flatnonzero(group_of == g))
        n_test, n_val = _group_sizes(len(members), frac)
        split[members[:n_test]] = "test"
        split[members[n_test : n_test + n_val]] = "val"
        split[members[n_test + n_val :]] = "train"
        fold_order.append(members[n_test:])
    if n_folds:
        trainval = np.concatenate(fold_order)
        if len(trainval) < n_folds:
            raise InputError(f"split.n_folds={n_folds}: only {len(trainval)} train+val cells")
        # consecutive cells of each label take consecutive folds: balanced per label and overall
        fold[trainval] = np.arange(len(trainval)) % n_folds
    table = pd.DataFrame({"cell_id": np.asarray(cell_ids, dtype=str)})
    if labels is not None:
        table["label"] = np.asarray(labels, dtype=str)
    table["split"] = split.astype(str)
    table["fold"] = fold
    return table


def run_split(
    dataset_path: str | os.PathLike | Sequence[str | os.PathLike],
    dataset_name: str,
    label_key: str | None,
    split: Mapping[str, Any],
    out_tsv: str | os.PathLike,
) -> pd.DataFrame:
    """The ``split`` rule: read the dataset's cells, split them, write split.tsv.

    dataset_path: the .h5ad file, or the files of a multi-file dataset (one split over
    all their cells; cell ids must be unique across the files).
    split: the config's ``split`` section (fractions, stratify, n_folds, seed).
    """
    spec = DatasetSpec(name=dataset_name, label_key=label_key)
    cells = read_cells(dataset_path, spec)
    stratify = bool(split.get("stratify", True)) and "label" in cells
    table = split_cells(
        cells["cell_id"].to_numpy(),
        cells["label"].to_numpy() if stratify else None,
        split["fractions"],
        n_folds=int(split.get("n_folds", 0)),
        seed=int(split.get("seed", 0)),
    )
    if "label" in cells and "label" not in table:
        table.insert(1, "label", cells["label"].to_numpy())
    with atomic_path(out_tsv) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    return table


def cells_by_label(path: str | os.PathLike, label_key: str | None) -> dict[str, int]:
    """Cells per label of an .h5ad read from its obs index and label column only (cheap, for
    checks before any job runs); one ``"all"`` entry without a label key."""
    import h5py

    with h5py.File(path, "r") as f:
        obs = f["obs"]
        index = obs.attrs.get("_index", "_index")
        n = len(obs[index])
        if not label_key or label_key not in obs:
            return {"all": n}
        col = obs[label_key]
        if isinstance(col, h5py.Group):  # categorical: codes + categories
            codes = col["codes"][:]
            cats = [c.decode() if isinstance(c, bytes) else str(c) for c in col["categories"][:]]
            counts = np.bincount(codes[codes >= 0], minlength=len(cats))
            return {cats[i]: int(c) for i, c in enumerate(counts) if c}
        values, counts = np.unique(col[:].astype(str), return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts, strict=True)}
