"""Datasets: config specs, loading an expression matrix from .h5ad with validation,
the bundled PBMC demo, and a seeded synthetic negative-binomial generator.

A dataset is an .h5ad file (or several, ``paths:``, read as one) plus three facts from
the config: where the expression lives (``X``, ``raw`` or ``layer:<name>``), whether it
holds raw counts or log1p-normalised values, and which ``obs`` column holds the cell
label (optional). A Perturb-seq dataset also has a ``perturbation:`` block
(:class:`evoformer.perturb.layouts.PerturbSpec`): its genes are then named by the block's
``gene_column`` (:func:`gene_names`), the names its conditions use.

Atlas-sized data is never loaded whole: :class:`ExpressionFiles` opens the file(s) with
h5py and yields row chunks of the expression (CSR, CSC or dense on disk; several files
restricted to their shared genes in one gene order), validating the values on the way.
:func:`load_expression` loads a whole (small) matrix into memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from evoformer.errors import InputError
from evoformer.io import atomic_path

if TYPE_CHECKING:
    from evoformer.perturb.layouts import PerturbSpec

log = logging.getLogger(__name__)

KINDS = ("h5ad", "pbmc68k", "synthetic")
VALUE_TYPES = ("counts", "log1p")

PBMC68K_PATH = "resources/pbmc68k.h5ad"
SYNTHETIC_DIR = "resources/synthetic"

# Parameters of the synthetic generator and their defaults (see make_synthetic).
SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "n_cells": 2000,
    "n_genes": 1000,
    "n_types": 5,
    "mean_counts": 1000.0,
    "dispersion": 0.5,
    "de_fraction": 0.1,
    "seed": 0,
}
SYNTHETIC_LABEL_KEY = "cell_type"


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of the config's ``datasets`` mapping.

    A kind-h5ad dataset has one file (``path``) or several read as one (``paths``).
    ``perturbation``: the dataset's ``perturbation:`` block (a Perturb-seq screen; any kind).
    """

    name: str
    kind: str = "h5ad"
    path: str | None = None
    expression: str = "X"
    value_type: str = "counts"
    label_key: str | None = None
    synthetic: dict[str, Any] = field(default_factory=dict)
    paths: tuple[str, ...] = ()
    perturbation: PerturbSpec | None = None

    def __post_init__(self) -> None:
        where = f"datasets.{self.name}"
        if self.kind not in KINDS:
            raise InputError(f"{where}.kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.value_type not in VALUE_TYPES:
            raise InputError(f"{where}.value_type={self.value_type!r}: expected counts or log1p")
        expr = self.expression
        if not (expr in ("X", "raw") or (expr.startswith("layer:") and len(expr) > 6)):
            raise InputError(f"{where}.expression={expr!r}: expected X, raw or layer:<name>")
        if self.path and self.paths:
            raise InputError(f"{where}: give path or paths, not both")

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> DatasetSpec:
        """Build from the config entry ``datasets.<name>`` (a plain dict)."""
        kind = cfg.get("kind", "h5ad")
        paths = cfg.get("paths")
        if paths is not None and (
            isinstance(paths, str)
            or not isinstance(paths, Sequence)
            or not paths
            or not all(isinstance(p, str) and p for p in paths)
        ):
            raise InputError(f"datasets.{name}.paths: expected a non-empty list of file paths")
        if kind == "h5ad" and not cfg.get("path") and not paths:
            raise InputError(f"datasets.{name}.path: required for kind h5ad (or paths: [...])")
        synthetic = {**SYNTHETIC_DEFAULTS, **(cfg.get("synthetic") or {})}
        return cls(
            name=name,
            kind=kind,
            path=cfg.get("path"),
            paths=tuple(paths or ()),
            expression=cfg.get("expression", "X"),
            value_type=cfg.get("value_type", "counts"),
            label_key=cfg.get("label_key"),
            synthetic=synthetic if kind == "synthetic" else {},
            perturbation=_perturbation(name, cfg),
        )

    @classmethod
    def expression_only(cls, name: str, cfg: Mapping[str, Any]) -> DatasetSpec:
        """A spec from the keys that say how to read the expression (a rule's params slice):
        ``expression``, ``value_type``, ``label_key`` and, for a Perturb-seq dataset,
        ``perturbation``; the file comes from the rule's input."""
        return cls(
            name=name,
            expression=cfg.get("expression", "X"),
            value_type=cfg.get("value_type", "counts"),
            label_key=cfg.get("label_key"),
            perturbation=_perturbation(name, cfg),
        )

    @property
    def files(self) -> list[str]:
        """The .h5ad file(s) of this dataset, relative to the workflow directory."""
        if self.kind == "pbmc68k":
            return [PBMC68K_PATH]
        if self.kind == "synthetic":
            return [f"{SYNTHETIC_DIR}/{self.name}.h5ad"]
        if self.paths:
            return list(self.paths)
        if not self.path:
            raise InputError(f"datasets.{self.name}.path: required for kind h5ad")
        return [self.path]

    @property
    def file(self) -> str:
        """The .h5ad path of a one-file dataset (see :attr:`files`)."""
        files = self.files
        if len(files) != 1:
            raise InputError(f"datasets.{self.name} has {len(files)} files (paths); use .files")
        return files[0]


def _perturbation(name: str, cfg: Mapping[str, Any]) -> PerturbSpec | None:
    """The entry's ``perturbation:`` block as a PerturbSpec (None when absent)."""
    if cfg.get("perturbation") is None:
        return None
    from evoformer.perturb.layouts import PerturbSpec

    return PerturbSpec.from_config(name, cfg["perturbation"])


def read_h5_elem(elem: Any) -> Any:
    """Read one AnnData element (obs, var, a matrix) from an open h5py group."""
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(elem)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def open_h5ad(path: str | os.PathLike) -> h5py.File:
    """Open an .h5ad file for reading with h5py (the caller closes it); a missing, unreadable
    or non-AnnData file is a one-line InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise InputError(f"{path}: not a readable .h5ad file ({_first_line(exc)})") from None
    if "obs" not in f or "var" not in f:
        f.close()
        raise InputError(f"{path}: not an AnnData .h5ad file (no obs/var groups)")
    return f


def _label_column(obs: pd.DataFrame, spec: DatasetSpec, path: Path) -> pd.Series | None:
    if not spec.label_key:
        return None
    if spec.label_key not in obs.columns:
        _no_label_column(spec, path, list(obs.columns))
    return _checked_labels(obs[spec.label_key], spec, path)


def _no_label_column(spec: DatasetSpec, path: Path, columns: list[str]) -> None:
    shown = ", ".join(map(str, columns[:10])) or "none"
    raise InputError(
        f"{path}: obs column {spec.label_key!r} (datasets.{spec.name}.label_key) not found; "
        f"obs columns: {shown}"
    )


def _checked_labels(labels: pd.Series, spec: DatasetSpec, path: Path) -> pd.Series:
    missing = int(labels.isna().sum())
    if missing:
        raise InputError(
            f"{path}: obs column {spec.label_key!r} (datasets.{spec.name}.label_key) has {missing} missing labels"
        )
    return labels.astype(str)


def _frame_index(f: h5py.File, key: str, path: Path) -> tuple[pd.Index, list[str]]:
    """Index (as str) and column names of the dataframe element ``key`` (obs, var, raw/var),
    reading no column."""
    group = f[key]
    try:
        if isinstance(group, h5py.Group) and "_index" in group.attrs:
            index = pd.Index(np.asarray(read_h5_elem(group[group.attrs["_index"]])).astype(str))
            columns = [str(c) for c in np.atleast_1d(group.attrs.get("column-order", []))]
            return index, columns
        frame = read_h5_elem(group)  # an older on-disk layout: read it whole
    except Exception as exc:
        raise InputError(f"{path}: cannot read {key} ({_first_line(exc)})") from None
    return pd.Index(frame.index.astype(str)), [str(c) for c in frame.columns]


def read_frame_column(f: h5py.File, key: str, column: str, path: Path) -> pd.Series:
    """[rows] One column of the dataframe element ``key`` (obs, var, raw/var) as stored
    (categorical, strings, numbers), reading no other column. The caller checks that the
    column exists (:func:`_frame_index` lists them)."""
    group = f[key]
    try:
        if isinstance(group, h5py.Group) and column in group:
            values = read_h5_elem(group[column])
        else:
            values = read_h5_elem(group)[column]
    except Exception as exc:
        raise InputError(f"{path}: cannot read {key} ({_first_line(exc)})") from None
    return pd.Series(values)


def _read_labels(f: h5py.File, spec: DatasetSpec, path: Path) -> pd.Series | None:
    """The label column of ``obs`` (``spec.label_key``) as str, reading only that column."""
    if not spec.label_key:
        return None
    _, columns = _frame_index(f, "obs", path)
    if spec.label_key not in columns:
        _no_label_column(spec, path, columns)
    return _checked_labels(read_frame_column(f, "obs", spec.label_key, path), spec, path)


def make_names_unique(names: pd.Index) -> pd.Index:
    """[G] ``names`` made unique as ``AnnData.var_names_make_unique`` does: the first
    occurrence keeps its name, later ones get ``-1``, ``-2``, ... (skipping suffixed names
    that already exist)."""
    import warnings

    if names.is_unique:
        return names
    with warnings.catch_warnings():  # anndata warns when a suffixed name already exists
        warnings.simplefilter("ignore", UserWarning)
        return pd.Index(ad.utils.make_index_unique(names.copy()).astype(str))


def gene_names(f: h5py.File, var_key: str, path: Path, spec: DatasetSpec) -> pd.Index:
    """[G] The names of the genes of the gene table ``var_key`` (var or raw/var): its index,
    or for a Perturb-seq dataset with a ``gene_column`` that column's values (the symbols
    its conditions name) made unique by :func:`make_names_unique`."""
    index, columns = _frame_index(f, var_key, path)
    column = spec.perturbation.gene_column if spec.perturbation is not None else None
    if column is None:
        return index
    key = f"datasets.{spec.name}.perturbation.gene_column"
    if column not in columns:
        shown = ", ".join(columns[:10]) or "none"
        raise InputError(
            f"{path}: {var_key} column {column!r} ({key}) not found; {var_key} columns: {shown} "
            "(gene_column: null names genes by the index)"
        )
    values = read_frame_column(f, var_key, column, path)
    missing = values.isna() | (values.astype(str).str.strip() == "")
    if missing.any():
        raise InputError(
            f"{path}: {var_key} column {column!r} ({key}) has {int(missing.sum())} missing "
            f"gene names (e.g. gene {index[np.argmax(missing.to_numpy())]!r})"
        )
    if len(values) != len(index):
        raise InputError(f"{path}: {var_key} column {column!r} has the wrong length")
    names = make_names_unique(pd.Index(values.astype(str).to_numpy()))
    n_renamed = int((names != values.astype(str).to_numpy()).sum())
    if n_renamed:
        log.info(
            "dataset %r: %s: %d duplicate gene names of %s column %r made unique (-1, -2, ...)",
            spec.name,
            path,
            n_renamed,
            var_key,
            column,
        )
    return names


def shared_gene_names(per_file: Sequence[pd.Index]) -> pd.Index:
    """The genes of every file ([G'] names) in the first file's order."""
    shared = per_file[0]
    for genes in per_file[1:]:
        shared = shared[shared.isin(genes)]
    return shared


def _as_paths(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(path, str | os.PathLike):
        return [Path(path)]
    paths = [Path(p) for p in path]
    if not paths:
        raise InputError("no dataset files given")
    return paths


def read_cells(
    path: str | os.PathLike | Sequence[str | os.PathLike], spec: DatasetSpec
) -> pd.DataFrame:
    """The dataset's cells without reading the expression: columns cell_id[, label]
    [, source_file] ([N] rows; reads only the obs index and the label column).

    ``path``: one .h5ad file or several (a multi-file dataset: cells in file order,
    ``source_file`` names each cell's file, cell ids must be unique across the files).
    """
    paths = _as_paths(path)
    parts = []
    for p in paths:
        with open_h5ad(p) as f:
            index, _ = _frame_index(f, "obs", p)
            _check_unique(index, p, "cell")
            cells = pd.DataFrame({"cell_id": index})
            labels = _read_labels(f, spec, p)
        if labels is not None:
            if len(labels) != len(cells):
                raise InputError(f"{p}: obs column {spec.label_key!r} has the wrong length")
            cells["label"] = labels.to_numpy()
        if len(paths) > 1:
            cells["source_file"] = str(p)
        parts.append(cells)
    cells = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    if len(paths) > 1:
        _check_unique_across(pd.Index(cells["cell_id"]), cells["source_file"], spec)
    return cells


def _check_unique(index: pd.Index, path: Path, what: str) -> None:
    if not index.is_unique:
        dup = index[index.duplicated()]
        raise InputError(
            f"{path}: {len(dup)} duplicate {what} ids (e.g. {dup[0]!r}); {what} ids must be unique"
        )


def _check_unique_across(ids: pd.Index, files: pd.Series, spec: DatasetSpec) -> None:
    """Cell ids of a multi-file dataset (each file already checked alone) must be unique."""
    if ids.is_unique:
        return
    dup = ids.duplicated(keep=False)
    first = ids[dup][0]
    where = files[np.asarray(ids == first)].unique()
    raise InputError(
        f"datasets.{spec.name}.paths: {int(ids.duplicated().sum())} cell ids occur in more than "
        f"one file (e.g. {first!r} in {where[0]} and {where[1]}); cell ids must be unique "
        "across the files"
    )


def load_expression(path: str | os.PathLike, spec: DatasetSpec) -> ad.AnnData:
    """Load and validate a dataset's expression matrix.

    Reads only the expression named by ``spec.expression``, its gene table and ``obs``.
    Returns AnnData [cells, genes] with X float32 CSR, obs = label column (``label``,
    when the dataset has one) indexed by cell id, var indexed by gene id.
    Raises InputError for a missing/corrupt file, a missing expression or label column,
    NaN/infinite or negative values, non-integer values where counts are expected,
    duplicate ids, or an empty matrix.
    """
    path = Path(path)
    where = f"datasets.{spec.name}"
    x_key, var_key = _expression_keys(spec)
    with open_h5ad(path) as f:
        if x_key not in f:
            raise InputError(f"{path}: has no {x_key} ({where}.expression: {spec.expression})")
        try:
            matrix = read_h5_elem(f[x_key])
            var = read_h5_elem(f[var_key])
            obs = read_h5_elem(f["obs"])
        except Exception as exc:
            raise InputError(f"{path}: cannot read {x_key} ({_first_line(exc)})") from None
    if isinstance(matrix, ad.AnnData) or not (
        sp.issparse(matrix) or isinstance(matrix, np.ndarray)
    ):
        raise InputError(f"{path}: {x_key} is not a matrix ({type(matrix).__name__})")
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    if matrix.indices.dtype != matrix.indptr.dtype:  # e.g. int32 indices, int64 indptr on disk
        matrix.indices = matrix.indices.astype(np.int64)
        matrix.indptr = matrix.indptr.astype(np.int64)
    if matrix.shape != (len(obs), len(var)):
        raise InputError(
            f"{path}: {x_key} has shape {matrix.shape}, obs/var say {(len(obs), len(var))}"
        )
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise InputError(f"{path}: {x_key} has no cells or no genes (shape {matrix.shape})")
    _check_unique(obs.index, path, "cell")
    _check_unique(var.index, path, "gene")
    labels = _label_column(obs, spec, path)
    data = matrix.data
    if not np.isfinite(data).all():
        raise InputError(f"{path}: {x_key} contains NaN or infinite values")
    if data.size and data.min() < 0:
        raise InputError(
            f"{path}: {x_key} has negative values (min {data.min():.4g}); expression must be "
            f"raw counts or log1p-normalised, not scaled ({where}.expression)"
        )
    if spec.value_type == "counts":
        frac = data != np.floor(data)
        if frac.any():
            raise InputError(
                f"{path}: {where}.value_type is counts but {x_key} holds non-integer values "
                f"(e.g. {data[frac][0]:.4g}); set value_type: log1p or point expression at the counts"
            )
    matrix.eliminate_zeros()
    matrix.sort_indices()
    obs_out = pd.DataFrame(index=pd.Index(obs.index.astype(str), name="cell_id"))
    if labels is not None:
        obs_out["label"] = pd.Categorical(labels.to_numpy())
    var_out = pd.DataFrame(index=pd.Index(var.index.astype(str), name="gene_id"))
    return ad.AnnData(X=matrix, obs=obs_out, var=var_out)


# Non-zeros per row chunk read by ExpressionFiles: the chunk and its temporaries downstream
# (normalised copies, gene subsets) stay at a few hundred MiB whatever the number of cells.
CHUNK_NONZEROS = 1 << 23

_CSC_RECORD = np.dtype([("row", "<i4"), ("col", "<i4"), ("value", "<f4")])


def _expression_keys(spec: DatasetSpec) -> tuple[str, str]:
    """(matrix key, gene table key) of ``spec.expression`` inside an .h5ad file."""
    if spec.expression == "X":
        return "X", "var"
    if spec.expression == "raw":
        return "raw/X", "raw/var"
    return f"layers/{spec.expression[6:]}", "var"


def _row_bounds(indptr: np.ndarray, max_nonzeros: int, max_rows: int | None = None) -> list:
    """Consecutive [start, stop) ranges of rows (or columns) with at most ``max_nonzeros``
    non-zeros each (a single larger row makes a range of its own). indptr: [n + 1]."""
    n = len(indptr) - 1
    bounds, start = [], 0
    while start < n:
        stop = int(np.searchsorted(indptr, indptr[start] + max_nonzeros, side="right")) - 1
        stop = min(n, max(stop, start + 1))
        if max_rows is not None:
            stop = min(stop, start + max_rows)
        bounds.append((start, stop))
        start = stop
    return bounds


class _CsrRows:
    """Row blocks of a CSR matrix group (``data``, ``indices``, ``indptr``)."""

    def __init__(self, group: h5py.Group, shape: tuple[int, int]) -> None:
        self.group, self.shape = group, shape
        self.indptr = group["indptr"][:].astype(np.int64)  # [N + 1]

    def bounds(self, max_nonzeros: int) -> list[tuple[int, int]]:
        return _row_bounds(self.indptr, max_nonzeros)

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return sp.csr_matrix(
            (
                self.group["data"][lo:hi],
                self.group["indices"][lo:hi],
                self.indptr[start : stop + 1] - lo,
            ),
            shape=(stop - start, self.shape[1]),
        )


class _DenseRows:
    """Row blocks of a dense [N, G] dataset."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset, self.shape = dataset, tuple(int(v) for v in dataset.shape)

    def bounds(self, max_nonzeros: int) -> list[tuple[int, int]]:
        step = max(1, max_nonzeros // max(1, self.shape[1]))
        return [(s, min(self.shape[0], s + step)) for s in range(0, self.shape[0], step)]

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(self.dataset[start:stop], dtype=np.float32)


class _CscRows:
    """Row blocks of a CSC matrix group, which stores columns (genes) contiguously.

    Reading a row block straight from CSC would scan the whole matrix per block, so the
    first :meth:`bounds` transposes it once, in column blocks of bounded size: one pass
    counts the non-zeros per row ([N]) to cut row blocks of at most ``max_nonzeros``, a
    second appends each column block's entries (row, column, float32 value) to the file
    of their row block in a scratch directory. :meth:`read` loads one such file and sorts
    it into CSR. Disk: 12 bytes per non-zero, removed by :meth:`close`.
    """

    def __init__(self, group: h5py.Group, shape: tuple[int, int], scratch: str | None) -> None:
        self.group, self.shape, self.scratch = group, shape, scratch
        self.dir: Path | None = None
        self._bounds: list[tuple[int, int]] = []

    def bounds(self, max_nonzeros: int) -> list[tuple[int, int]]:
        if self.dir is None:
            self._transpose(max_nonzeros)
        return self._bounds

    def _transpose(self, max_nonzeros: int) -> None:
        n_rows, _ = self.shape
        indptr = self.group["indptr"][:].astype(np.int64)  # [G + 1]
        indices, data = self.group["indices"], self.group["data"]
        col_blocks = _row_bounds(indptr, max_nonzeros)
        per_row = np.zeros(n_rows, dtype=np.int64)
        for c0, c1 in col_blocks:
            per_row += np.bincount(indices[indptr[c0] : indptr[c1]], minlength=n_rows)
        self._bounds = _row_bounds(np.concatenate([[0], np.cumsum(per_row)]), max_nonzeros)
        starts = np.array([b[0] for b in self._bounds], dtype=np.int64)
        self.dir = Path(tempfile.mkdtemp(prefix=".evoformer-csc-", dir=self.scratch))
        for c0, c1 in col_blocks:
            lo, hi = int(indptr[c0]), int(indptr[c1])
            rows = indices[lo:hi].astype(np.int64)
            cols = np.repeat(np.arange(c0, c1, dtype=np.int32), np.diff(indptr[c0 : c1 + 1]))
            block = np.searchsorted(starts, rows, side="right") - 1
            order = np.argsort(block, kind="stable")
            block = block[order]
            rec = np.empty(hi - lo, dtype=_CSC_RECORD)
            rec["row"] = rows[order] - starts[block]
            rec["col"] = cols[order]
            rec["value"] = data[lo:hi][order]
            cuts = np.searchsorted(block, np.arange(len(starts) + 1))
            for k in np.flatnonzero(np.diff(cuts)):
                with open(self.dir / f"{k}.bin", "ab") as fh:
                    rec[cuts[k] : cuts[k + 1]].tofile(fh)

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        assert self.dir is not None
        k = [b[0] for b in self._bounds].index(start)
        file = self.dir / f"{k}.bin"
        rec = np.fromfile(file, dtype=_CSC_RECORD) if file.exists() else np.empty(0, _CSC_RECORD)
        rec = rec[np.lexsort((rec["col"], rec["row"]))]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rec["row"], minlength=stop - start))])
        return sp.csr_matrix(
            (rec["value"], rec["col"], indptr), shape=(stop - start, self.shape[1])
        )

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _matrix_rows(
    f: h5py.File, key: str, path: Path, scratch: str | None
) -> _CsrRows | _CscRows | _DenseRows:
    elem = f[key]
    try:
        if isinstance(elem, h5py.Dataset):
            if elem.ndim != 2 or not (
                np.issubdtype(elem.dtype, np.number) or np.issubdtype(elem.dtype, np.bool_)
            ):
                raise InputError(
                    f"{path}: {key} is not a numeric matrix ({elem.dtype}, {elem.ndim}-d)"
                )
            return _DenseRows(elem)
        attrs = elem.attrs
        encoding = attrs.get("encoding-type", attrs.get("h5sparse_format", ""))
        encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
        shape = tuple(int(v) for v in attrs.get("shape", attrs.get("h5sparse_shape", ())))
        if encoding in ("csr_matrix", "csr", "csc_matrix", "csc"):
            if len(shape) != 2 or not {"data", "indices", "indptr"} <= set(elem):
                raise InputError(
                    f"{path}: {key} is a sparse matrix without shape/data/indices/indptr"
                )
            if encoding.startswith("csr"):
                return _CsrRows(elem, shape)
            return _CscRows(elem, shape, scratch)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot read {key} ({_first_line(exc)})") from None
    raise InputError(f"{path}: {key} is not a matrix (encoding {encoding or 'unknown'!r})")


@dataclass
class ExpressionChunk:
    """A block of consecutive cells of an :class:`ExpressionFiles` dataset."""

    part: int  # which file (index into ExpressionFiles.paths)
    start: int  # dataset-wide index of the block's first cell
    x: sp.csr_matrix  # [cells, genes] float32, shared genes, sorted indices, no stored zeros

    @property
    def stop(self) -> int:
        return self.start + self.x.shape[0]


class ExpressionFiles:
    """One or several .h5ad files read as one [N, G] expression matrix, in row chunks.

    Opens the files with h5py and reads only their ``obs``/gene indexes up front
    ([N] cell ids, [G] gene ids: the gene table's index, or the ``gene_column`` of a
    Perturb-seq dataset, :func:`gene_names`); the expression (``spec.expression``: X, raw/X or
    layers/<name>; CSR, CSC or dense) is read by :meth:`chunks`, at most ``max_nonzeros``
    non-zeros (or dense elements) at a time. Several files: cells in file order, genes =
    the genes of all files (matched by name) in the first file's order; genes missing
    from any file are dropped (logged per file); cell ids must be unique across files.
    Raises InputError (one line, naming the file) for a missing/corrupt file, a missing
    expression or label column, a shape mismatch, an empty matrix, duplicate ids,
    files without shared genes; :meth:`chunks` with ``validate`` for bad values.
    Use as a context manager (closes the files, removes CSC scratch files).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        spec: DatasetSpec,
        max_nonzeros: int = CHUNK_NONZEROS,
        scratch_dir: str | os.PathLike | None = None,
    ) -> None:
        self.paths = _as_paths(paths)
        self.spec = spec
        self.max_nonzeros = int(max_nonzeros)
        self.x_key, self.var_key = _expression_keys(spec)
        self._files: list[h5py.File] = []
        self._rows: list[_CsrRows | _CscRows | _DenseRows] = []
        self._genes: list[pd.Index] = []
        self._cells: list[pd.Index] = []
        scratch = None if scratch_dir is None else str(scratch_dir)
        try:
            for path in self.paths:
                self._open_part(path, scratch)
            self._match_genes()
        except BaseException:
            self.close()
            raise
        sizes = [len(c) for c in self._cells]
        self.part_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [P + 1]
        self.n_cells = int(self.part_starts[-1])
        self.n_genes = len(self.gene_ids)

    def _open_part(self, path: Path, scratch: str | None) -> None:
        where = f"datasets.{self.spec.name}"
        f = open_h5ad(path)
        self._files.append(f)
        if self.x_key not in f:
            raise InputError(
                f"{path}: has no {self.x_key} ({where}.expression: {self.spec.expression})"
            )
        if self.var_key not in f:
            raise InputError(f"{path}: has no {self.var_key} (the genes of {self.x_key})")
        rows = _matrix_rows(f, self.x_key, path, scratch)
        genes = gene_names(f, self.var_key, path, self.spec)
        cells, _ = _frame_index(f, "obs", path)
        if tuple(rows.shape) != (len(cells), len(genes)):
            raise InputError(
                f"{path}: {self.x_key} has shape {tuple(rows.shape)}, obs/var say {(len(cells), len(genes))}"
            )
        if 0 in rows.shape:
            raise InputError(
                f"{path}: {self.x_key} has no cells or no genes (shape {tuple(rows.shape)})"
            )
        _check_unique(cells, path, "cell")
        _check_unique(genes, path, "gene")
        self._rows.append(rows)
        self._genes.append(genes)
        self._cells.append(cells)

    def _match_genes(self) -> None:
        shared = shared_gene_names(self._genes)
        if len(shared) == 0:
            sizes = ", ".join(
                f"{p}: {len(g)} genes" for p, g in zip(self.paths, self._genes, strict=True)
            )
            raise InputError(
                f"datasets.{self.spec.name}.paths: the files share no gene names ({sizes})"
            )
        self.gene_ids = pd.Index(shared, name="gene_id")
        # per file: the position of each shared gene in the file, None when it is 0..G-1
        self._columns: list[np.ndarray | None] = []
        for path, genes in zip(self.paths, self._genes, strict=True):
            if len(genes) == len(shared) and genes.equals(shared):
                self._columns.append(None)
                continue
            self._columns.append(genes.get_indexer(shared))
            log.info(
                "dataset %r: %s: %d of its %d genes are not in every file; dropped",
                self.spec.name,
                path,
                len(genes) - len(shared),
                len(genes),
            )
        if len(self.paths) > 1:
            log.info(
                "dataset %r: %d files, %d shared genes",
                self.spec.name,
                len(self.paths),
                len(shared),
            )

    @property
    def cell_ids(self) -> pd.Index:
        """[N] cell ids in dataset order."""
        return pd.Index(np.concatenate([c.to_numpy() for c in self._cells]), name="cell_id")

    def cells(self) -> pd.DataFrame:
        """[N] cells: index cell_id; ``label`` (categorical, when the dataset has a
        label_key) and, for several files, ``source_file`` (categorical, the file's path).
        Raises InputError for a missing label column or duplicate cell ids across files."""
        obs = pd.DataFrame(index=self.cell_ids)
        if self.spec.label_key:
            labels = []
            for path, f, cells in zip(self.paths, self._files, self._cells, strict=True):
                part = _read_labels(f, self.spec, path)
                if len(part) != len(cells):
                    raise InputError(
                        f"{path}: obs column {self.spec.label_key!r} has the wrong length"
                    )
                labels.append(part.to_numpy())
            obs["label"] = pd.Categorical(np.concatenate(labels))
        if len(self.paths) > 1:
            sources = np.repeat(np.arange(len(self.paths)), np.diff(self.part_starts))
            obs["source_file"] = pd.Categorical.from_codes(sources, [str(p) for p in self.paths])
            _check_unique_across(obs.index, obs["source_file"].astype(str), self.spec)
        return obs

    def chunks(self, validate: bool = False) -> Iterator[ExpressionChunk]:
        """Row chunks of the whole dataset in order, each [cells, n_genes] float32 CSR.

        validate: check every value of every file (before the gene restriction) and raise
        InputError naming the file for NaN/infinite or negative values, non-integer values
        where ``value_type`` is counts, and only integer values where it is log1p (raised
        at the end of that file, before the next is read).
        """
        where = f"datasets.{self.spec.name}"
        for part, (path, rows) in enumerate(zip(self.paths, self._rows, strict=True)):
            has_fraction, has_values = False, False
            for start, stop in rows.bounds(self.max_nonzeros):
                try:
                    x = rows.read(start, stop)
                except (OSError, KeyError, ValueError, TypeError) as exc:
                    raise InputError(
                        f"{path}: cannot read {self.x_key} ({_first_line(exc)})"
                    ) from None
                if x.dtype != np.float32:
                    x = x.astype(np.float32)
                if validate and x.nnz:
                    data = x.data
                    if not np.isfinite(data).all():
                        raise InputError(f"{path}: {self.x_key} contains NaN or infinite values")
                    if data.min() < 0:
                        raise InputError(
                            f"{path}: {self.x_key} has negative values (min {data.min():.4g}); "
                            "expression must be raw counts or log1p-normalised, not scaled "
                            f"({where}.expression)"
                        )
                    frac = data != np.floor(data)
                    if self.spec.value_type == "counts" and frac.any():
                        raise InputError(
                            f"{path}: {where}.value_type is counts but {self.x_key} holds non-integer "
                            f"values (e.g. {data[frac][0]:.4g}); set value_type: log1p or point "
                            "expression at the counts"
                        )
                    has_fraction = has_fraction or bool(frac.any())
                    has_values = has_values or bool((data != 0).any())
                x = self._shared_genes(x, part)
                x.eliminate_zeros()
                x.sort_indices()
                yield ExpressionChunk(part, int(self.part_starts[part]) + start, x)
            if validate and self.spec.value_type == "log1p" and has_values and not has_fraction:
                raise InputError(
                    f"{path}: {where}.value_type is log1p but {self.x_key} holds only integer "
                    f"values (raw counts); set {where}.value_type: counts"
                )

    def _shared_genes(self, x: sp.csr_matrix, part: int) -> sp.csr_matrix:
        columns = self._columns[part]
        if columns is None:
            return x
        remap = np.full(x.shape[1], -1, dtype=np.int64)
        remap[columns] = np.arange(len(columns))
        new = remap[x.indices]
        keep = new >= 0
        rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=x.shape[0]))])
        out = sp.csr_matrix(
            (x.data[keep], new[keep].astype(np.int32), indptr), shape=(x.shape[0], len(columns))
        )
        out.has_sorted_indices = False
        return out

    def close(self) -> None:
        for rows in self._rows:
            if isinstance(rows, _CscRows):
                rows.close()
        for f in self._files:
            f.close()
        self._files, self._rows = [], []

    def __enter__(self) -> ExpressionFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def materialise_pbmc68k(out: str | os.PathLike) -> None:
    """Write scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs, no download) to ``out``.

    Expression for the pipeline: ``.raw`` (log1p-normalised, 765 genes), label ``bulk_labels``.
    """
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    log.info("wrote %s: %d cells x %d genes (raw)", out, adata.n_obs, adata.raw.n_vars)


def pbmc68k_genes() -> list[str]:
    """The 765 gene symbols of the bundled PBMC data (``pbmc68k_reduced``'s ``.raw``, the
    expression the pipeline reads), in file order."""
    import scanpy as sc

    return [str(g) for g in sc.datasets.pbmc68k_reduced().raw.var_names]


def make_synthetic(
    n_cells: int = 2000,
    n_genes: int = 1000,
    n_types: int = 5,
    mean_counts: float = 1000.0,
    dispersion: float = 0.5,
    de_fraction: float = 0.1,
    seed: int = 0,
) -> ad.AnnData:
    """Seeded negative-binomial counts with ``n_types`` cell types.

    Gene base proportions are log-normal (a few highly, most lowly expressed genes);
    each type up- or down-regulates its own random ``de_fraction`` of genes by
    log-normal fold changes (its program). Cell library sizes are log-normal around
    ``mean_counts``; counts ~ NB(mean = library * proportion, ``dispersion``) drawn as a
    gamma-Poisson mixture, in blocks of cells so memory stays bounded.
    Returns AnnData [n_cells, n_genes], X float32 CSR counts, obs ``cell_type``.
    """
    if n_cells < 1 or n_genes < 1 or n_types < 1:
        raise InputError("synthetic: n_cells, n_genes and n_types must be >= 1")
    if mean_counts <= 0 or dispersion <= 0 or not 0 <= de_fraction <= 1:
        raise InputError("synthetic: need mean_counts > 0, dispersion > 0, 0 <= de_fraction <= 1")
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.5, n_genes)
    programs = np.tile(base, (n_types, 1))
    n_de = int(round(de_fraction * n_genes))
    for t in range(n_types):
        genes = rng.choice(n_genes, size=n_de, replace=False)
        sign = rng.choice([-1.0, 1.0], size=n_de)
        programs[t, genes] *= np.exp(sign * rng.lognormal(0.5, 0.5, n_de))
    programs /= programs.sum(axis=1, keepdims=True)
    types = rng.integers(0, n_types, n_cells)
    library = rng.lognormal(np.log(mean_counts), 0.4, n_cells)
    shape = 1.0 / dispersion
    blocks = []
    step = max(1, 4_000_000 // n_genes)
    for start in range(0, n_cells, step):
        stop = min(n_cells, start + step)
        mu = library[start:stop, None] * programs[types[start:stop]]
        counts = rng.poisson(rng.gamma(shape, mu / shape)).astype(np.float32)
        blocks.append(sp.csr_matrix(counts))
    x = sp.vstack(blocks, format="csr")
    width = len(str(n_cells - 1))
    obs = pd.DataFrame(
        {SYNTHETIC_LABEL_KEY: pd.Categorical([f"type_{t}" for t in types])},
        index=[f"cell_{i:0{width}d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{g:0{len(str(n_genes - 1))}d}" for g in range(n_genes)])
    return ad.AnnData(X=x, obs=obs, var=var)


def write_synthetic(out: str | os.PathLike, params: Mapping[str, Any]) -> None:
    """Generate a synthetic dataset from config parameters and write it atomically."""
    unknown = set(params) - set(SYNTHETIC_DEFAULTS)
    if unknown:
        raise InputError(f"synthetic: unknown parameters {sorted(unknown)}")
    adata = make_synthetic(**{**SYNTHETIC_DEFAULTS, **params})
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    log.info(
        "wrote %s: %d cells x %d genes, %.1f%% non-zero",
        out,
        adata.n_obs,
        adata.n_vars,
        100 * adata.X.nnz / (adata.n_obs * adata.n_vars),
    )
