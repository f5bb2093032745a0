"""Datasets: config specs, validated loading, the bundled PBMC demo, the synthetic generator."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from evoformer.data.datasets import (
    DatasetSpec,
    load_expression,
    make_synthetic,
    materialise_pbmc68k,
    read_cells,
    write_synthetic,
)
from evoformer.errors import InputError

PBMC = DatasetSpec(
    name="pbmc68k", kind="pbmc68k", expression="raw", value_type="log1p", label_key="bulk_labels"
)


@pytest.fixture(scope="module")
def pbmc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pbmc") / "pbmc68k.h5ad"
    materialise_pbmc68k(path)
    return path


def _write(path, x, obs=None, layers=None, raw=None):
    n, g = x.shape
    obs = (
        obs
        if obs is not None
        else pd.DataFrame({"ct": ["a"] * n}, index=[f"c{i}" for i in range(n)])
    )
    adata = ad.AnnData(
        X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(g)]), layers=layers or {}
    )
    if raw is not None:
        adata.raw = raw
    adata.write_h5ad(path)
    return path


def test_pbmc68k_is_the_bundled_demo(pbmc_file):
    adata = load_expression(pbmc_file, PBMC)
    assert adata.shape == (700, 765)
    assert adata.X.dtype == np.float32 and sp.isspmatrix_csr(adata.X)
    assert adata.obs["label"].nunique() == 10 and adata.obs.index.name == "cell_id"
    assert 0 < adata.X.data.min() and adata.X.data.max() < 10  # log1p-normalised, not scaled
    cells = read_cells(pbmc_file, PBMC)
    assert list(cells.columns) == ["cell_id", "label"] and len(cells) == 700


def test_spec_from_config_and_paths():
    spec = DatasetSpec.from_config("s", {"kind": "synthetic", "synthetic": {"n_cells": 10}})
    assert spec.file == "resources/synthetic/s.h5ad" and spec.synthetic["n_cells"] == 10
    assert spec.synthetic["n_genes"] == 1000  # default filled
    assert DatasetSpec.from_config("p", {"kind": "pbmc68k"}).file == "resources/pbmc68k.h5ad"
    assert DatasetSpec.from_config("u", {"path": "/d/u.h5ad"}).file == "/d/u.h5ad"
    with pytest.raises(InputError, match=r"datasets\.u\.path: required"):
        DatasetSpec.from_config("u", {"kind": "h5ad"})
    with pytest.raises(InputError, match=r"datasets\.u\.expression='obsm'"):
        DatasetSpec.from_config("u", {"path": "x", "expression": "obsm"})
    with pytest.raises(InputError, match=r"datasets\.u\.value_type='tpm'"):
        DatasetSpec.from_config("u", {"path": "x", "value_type": "tpm"})


def test_expression_locations(tmp_path):
    counts = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 1]], dtype=np.float32))
    logged = counts.copy()
    logged.data = np.log1p(logged.data)
    path = _write(tmp_path / "a.h5ad", logged, layers={"counts": counts})
    from_layer = load_expression(
        path, DatasetSpec(name="a", path=str(path), expression="layer:counts")
    )
    assert np.array_equal(from_layer.X.toarray(), counts.toarray())
    from_x = load_expression(path, DatasetSpec(name="a", path=str(path), value_type="log1p"))
    assert np.allclose(from_x.X.toarray(), logged.toarray())
    with pytest.raises(
        InputError, match=r"has no layers/other \(datasets\.a\.expression: layer:other\)"
    ):
        load_expression(path, DatasetSpec(name="a", path=str(path), expression="layer:other"))
    with pytest.raises(InputError, match=r"has no raw/X"):
        load_expression(path, DatasetSpec(name="a", path=str(path), expression="raw"))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_and_corrupt_files(tmp_path):
    spec = DatasetSpec(name="a", path="x")
    with pytest.raises(InputError, match="file not found") as exc:
        load_expression(tmp_path / "missing.h5ad", spec)
    assert str(tmp_path / "missing.h5ad") in _one_line(exc)
    corrupt = tmp_path / "corrupt.h5ad"
    corrupt.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(InputError, match="not a readable .h5ad file") as exc:
        load_expression(corrupt, spec)
    _one_line(exc)
    with pytest.raises(InputError, match="not a readable .h5ad file"):
        read_cells(corrupt, spec)


def test_label_column_absent(tmp_path):
    path = _write(tmp_path / "a.h5ad", sp.csr_matrix(np.ones((3, 2), dtype=np.float32)))
    spec = DatasetSpec(name="a", path=str(path), label_key="cell_type")
    with pytest.raises(
        InputError,
        match=r"obs column 'cell_type' \(datasets\.a\.label_key\) not found; obs columns: ct",
    ) as exc:
        load_expression(path, spec)
    _one_line(exc)
    with pytest.raises(InputError, match="obs column 'cell_type'"):
        read_cells(path, spec)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, "NaN or infinite"),
        (np.inf, "NaN or infinite"),
        (-1.0, r"negative values \(min -1\)"),
    ],
)
def test_nan_and_negative_values(tmp_path, value, message):
    dense = np.ones((3, 2), dtype=np.float32)
    dense[1, 1] = value
    path = _write(tmp_path / "a.h5ad", dense)
    with pytest.raises(InputError, match=message) as exc:
        load_expression(path, DatasetSpec(name="a", path=str(path), value_type="log1p"))
    _one_line(exc)


def test_counts_must_be_integers(tmp_path):
    path = _write(tmp_path / "a.h5ad", sp.csr_matrix(np.array([[1.0, 0.5]], dtype=np.float32)))
    with pytest.raises(
        InputError, match=r"value_type is counts but X holds non-integer values \(e\.g\. 0\.5\)"
    ):
        load_expression(path, DatasetSpec(name="a", path=str(path), value_type="counts"))
    assert (
        load_expression(path, DatasetSpec(name="a", path=str(path), value_type="log1p")).n_obs == 1
    )


def test_duplicate_cell_ids(tmp_path):
    obs = pd.DataFrame(index=["c0", "c0"])
    path = tmp_path / "a.h5ad"
    with pytest.warns(UserWarning):
        ad.AnnData(X=np.ones((2, 2), dtype=np.float32), obs=obs).write_h5ad(path)
    with pytest.raises(InputError, match="duplicate cell ids"):
        load_expression(path, DatasetSpec(name="a", path=str(path)))


def test_synthetic_is_seeded_sparse_counts_with_distinct_programs():
    a = make_synthetic(n_cells=600, n_genes=300, n_types=3, seed=2)
    b = make_synthetic(n_cells=600, n_genes=300, n_types=3, seed=2)
    c = make_synthetic(n_cells=600, n_genes=300, n_types=3, seed=3)
    assert (a.X != b.X).nnz == 0 and (a.X != c.X).nnz > 0
    assert sp.isspmatrix_csr(a.X) and np.array_equal(a.X.data, np.round(a.X.data))
    density = a.X.nnz / np.prod(a.shape)
    assert 0.05 < density < 0.6
    # overdispersed (negative binomial): variance > mean for expressed genes within a type
    labels = a.obs["cell_type"].to_numpy()
    first = a.X[labels == "type_0"].toarray()
    expressed = first.mean(axis=0) > 1
    assert (first.var(axis=0)[expressed] > first.mean(axis=0)[expressed]).mean() > 0.9
    # each type has its own program: type means differ far beyond the noise
    profiles = np.stack([a.X[labels == t].toarray().mean(axis=0) for t in np.unique(labels)])
    profiles /= profiles.sum(axis=1, keepdims=True)
    fold = np.abs(np.log((profiles[0] + 1e-3) / (profiles[1] + 1e-3)))
    assert (fold > 1).sum() >= 10


def test_write_synthetic_rejects_unknown_parameters(tmp_path):
    with pytest.raises(InputError, match="unknown parameters"):
        write_synthetic(tmp_path / "s.h5ad", {"n_cell": 10})
    assert not any(tmp_path.iterdir())
