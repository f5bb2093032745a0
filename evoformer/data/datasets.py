"""Datasets: config specs, loading an expression matrix from .h5ad with validation,
the bundled PBMC demo, and a seeded synthetic negative-binomial generator.

A dataset is an .h5ad file plus three facts from the config: where the expression
lives (``X``, ``raw`` or ``layer:<name>``), whether it holds raw counts or
log1p-normalised values, and which ``obs`` column holds the cell label (optional).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from evoformer.errors import InputError
from evoformer.io import atomic_path

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
    """One entry of the config's ``datasets`` mapping."""

    name: str
    kind: str = "h5ad"
    path: str | None = None
    expression: str = "X"
    value_type: str = "counts"
    label_key: str | None = None
    synthetic: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"datasets.{self.name}"
        if self.kind not in KINDS:
            raise InputError(f"{where}.kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.value_type not in VALUE_TYPES:
            raise InputError(f"{where}.value_type={self.value_type!r}: expected counts or log1p")
        expr = self.expression
        if not (expr in ("X", "raw") or (expr.startswith("layer:") and len(expr) > 6)):
            raise InputError(f"{where}.expression={expr!r}: expected X, raw or layer:<name>")

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> DatasetSpec:
        """Build from the config entry ``datasets.<name>`` (a plain dict)."""
        kind = cfg.get("kind", "h5ad")
        if kind == "h5ad" and not cfg.get("path"):
            raise InputError(f"datasets.{name}.path: required for kind h5ad")
        synthetic = {**SYNTHETIC_DEFAULTS, **(cfg.get("synthetic") or {})}
        return cls(
            name=name,
            kind=kind,
            path=cfg.get("path"),
            expression=cfg.get("expression", "X"),
            value_type=cfg.get("value_type", "counts"),
            label_key=cfg.get("label_key"),
            synthetic=synthetic if kind == "synthetic" else {},
        )

    @classmethod
    def expression_only(cls, name: str, cfg: Mapping[str, Any]) -> DatasetSpec:
        """A spec from the keys that say how to read the expression (a rule's params slice):
        ``expression``, ``value_type``, ``label_key``; the file comes from the rule's input."""
        return cls(
            name=name,
            expression=cfg.get("expression", "X"),
            value_type=cfg.get("value_type", "counts"),
            label_key=cfg.get("label_key"),
        )

    @property
    def file(self) -> str:
        """The .h5ad path of this dataset, relative to the workflow directory."""
        if self.kind == "pbmc68k":
            return PBMC68K_PATH
        if self.kind == "synthetic":
            return f"{SYNTHETIC_DIR}/{self.name}.h5ad"
        if not self.path:
            raise InputError(f"datasets.{self.name}.path: required for kind h5ad")
        return self.path


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


def _open_h5ad(path: Path) -> h5py.File:
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
        shown = ", ".join(map(str, list(obs.columns)[:10])) or "none"
        raise InputError(
            f"{path}: obs column {spec.label_key!r} (datasets.{spec.name}.label_key) not found; "
            f"obs columns: {shown}"
        )
    labels = obs[spec.label_key]
    missing = int(labels.isna().sum())
    if missing:
        raise InputError(
            f"{path}: obs column {spec.label_key!r} (datasets.{spec.name}.label_key) has {missing} missing labels"
        )
    return labels.astype(str)


def read_cells(path: str | os.PathLike, spec: DatasetSpec) -> pd.DataFrame:
    """The dataset's cells without reading the expression: columns cell_id[, label]."""
    path = Path(path)
    with _open_h5ad(path) as f:
        try:
            obs = read_h5_elem(f["obs"])
        except Exception as exc:
            raise InputError(f"{path}: cannot read obs ({_first_line(exc)})") from None
    _check_unique(obs.index, path, "cell")
    cells = pd.DataFrame({"cell_id": obs.index.astype(str)})
    labels = _label_column(obs, spec, path)
    if labels is not None:
        cells["label"] = labels.to_numpy()
    return cells


def _check_unique(index: pd.Index, path: Path, what: str) -> None:
    if not index.is_unique:
        dup = index[index.duplicated()]
        raise InputError(
            f"{path}: {len(dup)} duplicate {what} ids (e.g. {dup[0]!r}); {what} ids must be unique"
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
    if spec.expression == "X":
        x_key, var_key = "X", "var"
    elif spec.expression == "raw":
        x_key, var_key = "raw/X", "raw/var"
    else:
        x_key, var_key = f"layers/{spec.expression[6:]}", "var"
    with _open_h5ad(path) as f:
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


def materialise_pbmc68k(out: str | os.PathLike) -> None:
    """Write scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs, no download) to ``out``.

    Expression for the pipeline: ``.raw`` (log1p-normalised, 765 genes), label ``bulk_labels``.
    """
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    log.info("wrote %s: %d cells x %d genes (raw)", out, adata.n_obs, adata.raw.n_vars)


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
