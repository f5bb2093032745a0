"""Datasets: config specs, validated loading, the bundled PBMC demo, the synthetic generator."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from evoformer.data.datasets import (
    DatasetSpec,
    ExpressionFiles,
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


# ---------------------------------------------------------------- several files, streaming
def test_spec_with_several_paths():
    spec = DatasetSpec.from_config("m", {"paths": ["a.h5ad", "b.h5ad"], "value_type": "counts"})
    assert spec.files == ["a.h5ad", "b.h5ad"] and spec.kind == "h5ad"
    assert DatasetSpec.from_config("u", {"path": "/d/u.h5ad"}).files == ["/d/u.h5ad"]
    with pytest.raises(InputError, match=r"datasets\.m has 2 files"):
        spec.file  # noqa: B018
    with pytest.raises(InputError, match=r"datasets\.m: give path or paths, not both"):
        DatasetSpec.from_config("m", {"path": "a.h5ad", "paths": ["b.h5ad"]})
    for bad in ([], "a.h5ad", [""], [1]):
        with pytest.raises(InputError, match=r"datasets\.m\.paths: expected a non-empty list"):
            DatasetSpec.from_config("m", {"paths": bad})


def test_read_cells_of_several_files(tmp_path):
    x = sp.csr_matrix(np.ones((3, 2), dtype=np.float32))
    a = _write(
        tmp_path / "a.h5ad", x, obs=pd.DataFrame({"ct": list("xyz")}, index=["a0", "a1", "a2"])
    )
    b = _write(
        tmp_path / "b.h5ad", x, obs=pd.DataFrame({"ct": list("xxy")}, index=["b0", "b1", "b2"])
    )
    spec = DatasetSpec(name="m", paths=(str(a), str(b)), label_key="ct")
    cells = read_cells([a, b], spec)
    assert list(cells.columns) == ["cell_id", "label", "source_file"]
    assert list(cells.cell_id) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert list(cells.label) == list("xyzxxy")
    assert list(cells.source_file) == [str(a)] * 3 + [str(b)] * 3
    assert list(read_cells(a, spec).columns) == ["cell_id", "label"]  # one file: as before
    dup = _write(
        tmp_path / "dup.h5ad", x, obs=pd.DataFrame({"ct": list("xyz")}, index=["b2", "c", "a1"])
    )
    with pytest.raises(InputError) as exc:
        read_cells([a, b, dup], spec)
    assert _one_line(exc) == (
        f"datasets.m.paths: 2 cell ids occur in more than one file (e.g. 'a1' in {a} and {dup}); "
        "cell ids must be unique across the files"
    )


def test_expression_files_match_genes_by_name(tmp_path):
    a = _write(tmp_path / "a.h5ad", sp.csr_matrix(np.array([[1, 2, 3]], dtype=np.float32)))
    b_x = sp.csr_matrix(np.array([[30, 0, 10, 40], [0, 20, 0, 0]], dtype=np.float32))
    b = tmp_path / "b.h5ad"
    ad.AnnData(
        X=b_x,
        obs=pd.DataFrame(index=["d0", "d1"]),
        var=pd.DataFrame(index=["g2", "g1", "g0", "other"]),
    ).write_h5ad(b)
    spec = DatasetSpec(name="m", paths=(str(a), str(b)))
    with ExpressionFiles([a, b], spec, max_nonzeros=1) as files:
        assert list(files.gene_ids) == ["g0", "g1", "g2"] and files.n_cells == 3
        chunks = list(files.chunks(validate=True))
        assert [c.part for c in chunks] == [0, 1, 1] and [c.start for c in chunks] == [0, 1, 2]
        x = sp.vstack([c.x for c in chunks]).toarray()
        assert np.array_equal(x, [[1, 2, 3], [10, 0, 30], [0, 20, 0]])
        obs = files.cells()
    assert list(obs.index) == ["c0", "d0", "d1"]
    assert list(obs["source_file"]) == [str(a), str(b), str(b)]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("shape", r"X has shape \(3, 2\), obs/var say \(3, 3\)"),
        ("no_genes", r"X has no cells or no genes"),
        ("not_a_matrix", r"X is not a matrix \(encoding 'dict'\)"),
    ],
)
def test_expression_files_reject_malformed_files(tmp_path, layout, message):
    import h5py

    path = _write(tmp_path / "a.h5ad", sp.csr_matrix(np.ones((3, 3), dtype=np.float32)))
    if layout == "no_genes":
        path = _write(tmp_path / "b.h5ad", sp.csr_matrix((3, 0), dtype=np.float32))
    with h5py.File(path, "a") as f:
        if layout == "shape":
            f["X"].attrs["shape"] = np.array([3, 2])
        elif layout == "not_a_matrix":
            del f["X"]
            f.create_group("X").attrs["encoding-type"] = "dict"
    with pytest.raises(InputError, match=message) as exc:
        ExpressionFiles(path, DatasetSpec(name="a", path=str(path)))
    assert _one_line(exc).startswith(str(path))


@pytest.mark.parametrize(
    ("values", "value_type", "message"),
    [
        ([[1.0, np.nan]], "log1p", "contains NaN or infinite values"),
        ([[1.0, -2.0]], "log1p", r"has negative values \(min -2\)"),
        (
            [[1.0, 0.5]],
            "counts",
            r"value_type is counts but X holds non-integer values \(e\.g\. 0\.5\)",
        ),
        (
            [[1.0, 2.0]],
            "log1p",
            r"datasets\.a\.value_type is log1p but X holds only integer values",
        ),
    ],
)
def test_expression_files_validate_values(tmp_path, values, value_type, message):
    path = _write(tmp_path / "a.h5ad", np.array(values, dtype=np.float32))
    spec = DatasetSpec(name="a", path=str(path), value_type=value_type)
    with ExpressionFiles(path, spec) as files:
        list(files.chunks())  # no validation asked: reads
        with pytest.raises(InputError, match=message) as exc:
            list(files.chunks(validate=True))
    assert _one_line(exc).startswith(str(path))
