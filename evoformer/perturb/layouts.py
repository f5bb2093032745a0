"""Perturb-seq datasets: the ``perturbation:`` block of a dataset entry, and each cell's
canonical condition and perturbation type read from the public layouts.

A dataset entry of ``config.yaml`` becomes a Perturb-seq screen with a ``perturbation:``
block (:class:`PerturbSpec`). ``layout`` sets the defaults of the other keys:

==============  ==============  ==================  ====================================
key             gears           scperturb           meaning
==============  ==============  ==================  ====================================
``column``      ``condition``   ``perturbation``    obs column holding each cell's label
``control``     ``[ctrl]``      ``[control]``       labels (and tokens) meaning control
``separator``   ``+``           ``_``               joins the genes of a label
``gene_column`` ``gene_name``   null (var index)    var column of the gene names labels use
``type``        null            null                knockdown | knockout | activation
``type_column`` null            perturbation_type   obs column of per-cell types
``min_cells``   10              10                  smaller conditions are dropped
``strict``      false           false               unmeasured perturbed genes: error
==============  ==============  ==================  ====================================

GEARS's processed files label cells ``A+ctrl`` / ``ctrl+A`` / ``A+B`` / ``ctrl`` and name
genes in ``var.gene_name`` (the index may hold Ensembl ids); scPerturb's label them
``control`` / ``A`` / ``A_B`` and give ``obs.perturbation_type`` (``CRISPRi`` ...).

A label is parsed (:func:`canonical_condition`) into the one spelling of
:mod:`evoformer.perturb.conditions`: a control label is ``ctrl``; otherwise the label is
split at ``separator``, at most one part may be a control label (GEARS's padding of a
single), the others are the perturbed genes, sorted and joined by ``+``: ``ctrl+A`` and
``A+ctrl`` are ``A``, ``B+A`` and ``A_B`` are ``A+B``. Refused, naming the file, the column
and the label with its cell count: an empty part (``A++B``, ``+A``, an empty label), a
label made only of control parts (``ctrl+ctrl``), two control parts, a gene named twice,
a part with white space, a part that is the canonical ``ctrl`` or contains ``+`` (not a
gene name: a control label missing from ``control``, or the wrong separator).

The perturbation type is the declared ``type`` for every cell; without one, each cell's
value of ``type_column`` mapped by :data:`TYPE_ALIASES` (case-insensitive, e.g. scPerturb's
``CRISPRi`` -> knockdown, ``CRISPRa`` -> activation, ``CRISPR`` / ``CRISPR-cas9`` ->
knockout; anything else is refused, naming the value). Control cells carry their screen's
type too (what the control cells were given: dCas9-KRAB, dCas9-VP64, Cas9).

:func:`read_perturbation_obs` reads only the obs columns (and the gene names) of one or
several .h5ad files (one dataset, cells in file order) and decides which cells are kept:

1. cells with a missing label (NaN: scPerturb's undetermined guide calls) are dropped,
   counted in the log;
2. a perturbed gene that is not among the measured genes (the gene names shared by every
   file): ``strict`` refuses the dataset listing them; otherwise the cells of conditions
   naming one are dropped, counted, and the genes listed in the log;
3. conditions with fewer than ``min_cells`` cells (control included) are dropped and named
   in the log;
4. no control cells left, or no perturbed condition left, is an error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

from evoformer.data.datasets import (
    DatasetSpec,
    _check_unique,
    _check_unique_across,
    _expression_keys,
    _frame_index,
    gene_names,
    open_h5ad,
    read_frame_column,
    shared_gene_names,
)
from evoformer.errors import InputError
from evoformer.perturb.conditions import CONTROL, SEP, TYPES, condition_genes, make_condition

log = logging.getLogger(__name__)

LAYOUTS = ("gears", "scperturb")

#: Defaults of each layout (keys absent from the block); ``min_cells`` and ``strict`` apply
#: to both.
LAYOUT_DEFAULTS: dict[str, dict[str, Any]] = {
    "gears": {
        "column": "condition",
        "control": ("ctrl",),
        "separator": "+",
        "gene_column": "gene_name",
        "type": None,
        "type_column": None,
    },
    "scperturb": {
        "column": "perturbation",
        "control": ("control",),
        "separator": "_",
        "gene_column": None,
        "type": None,
        "type_column": "perturbation_type",
    },
}
MIN_CELLS = 10

#: Free-text perturbation types (lower case) -> the canonical type. scPerturb writes
#: CRISPRi (dCas9-KRAB interference), CRISPRa (activation), CRISPR / CRISPR-cas9 (Cas9
#: cutting, a knockout); RNA interference knocks down; overexpression (ORF) activates.
TYPE_ALIASES: dict[str, str] = {
    "knockdown": "knockdown",
    "crispri": "knockdown",
    "sirna": "knockdown",
    "shrna": "knockdown",
    "knockout": "knockout",
    "crispr": "knockout",
    "crispr-cas9": "knockout",
    "crispr-ko": "knockout",
    "crisprko": "knockout",
    "activation": "activation",
    "crispra": "activation",
    "overexpression": "activation",
}


@dataclass(frozen=True)
class PerturbSpec:
    """A dataset's ``perturbation:`` block, layout defaults filled (see the module docstring).

    type: the declared type of every cell, or None to read ``type_column`` per cell.
    """

    layout: str
    column: str
    control: tuple[str, ...]
    separator: str
    gene_column: str | None
    type: str | None
    type_column: str | None
    min_cells: int = MIN_CELLS
    strict: bool = False

    @classmethod
    def from_config(cls, dataset_name: str, block: Mapping[str, Any]) -> PerturbSpec:
        """Build from ``datasets.<dataset_name>.perturbation`` (a plain dict); raises
        InputError naming ``datasets.<name>.perturbation.<key>`` for a bad value."""
        where = f"datasets.{dataset_name}.perturbation"
        if not isinstance(block, Mapping):
            raise InputError(f"{where}: expected a mapping, got {type(block).__name__}")
        known = [f for f in cls.__dataclass_fields__]
        for key in block:
            if key not in known:
                raise InputError(f"{where}.{key}: unknown key (known: {', '.join(known)})")
        layout = block.get("layout")
        if layout not in LAYOUTS:
            got = "missing" if layout is None else f"got {layout!r}"
            raise InputError(f"{where}.layout: {got}, expected one of {', '.join(LAYOUTS)}")
        cfg = {**LAYOUT_DEFAULTS[layout], "min_cells": MIN_CELLS, "strict": False, **block}
        for key in ("column", "separator"):
            _check_name(cfg[key], f"{where}.{key}", nullable=False)
        for key in ("gene_column", "type_column"):
            _check_name(cfg[key], f"{where}.{key}", nullable=True)
        control = cfg["control"]
        if (
            isinstance(control, str)
            or not isinstance(control, Sequence)
            or not control
            or not all(isinstance(c, str) and c for c in control)
        ):
            raise InputError(
                f"{where}.control: expected a non-empty list of labels, got {control!r}"
            )
        if cfg["type"] is not None and cfg["type"] not in TYPES:
            raise InputError(
                f"{where}.type: got {cfg['type']!r}, expected one of {', '.join(TYPES)} or null"
            )
        if cfg["type"] is None and cfg["type_column"] is None:
            raise InputError(
                f"{where}.type: the perturbation type is neither declared nor read (type_column "
                f"is null); set type: {' | '.join(TYPES)}, or type_column: <obs column>"
            )
        min_cells = cfg["min_cells"]
        if isinstance(min_cells, bool) or not isinstance(min_cells, int) or min_cells < 1:
            raise InputError(f"{where}.min_cells: got {min_cells!r}, expected an integer >= 1")
        if not isinstance(cfg["strict"], bool):
            raise InputError(f"{where}.strict: got {cfg['strict']!r}, expected true or false")
        return cls(
            layout=layout,
            column=cfg["column"],
            control=tuple(control),
            separator=cfg["separator"],
            gene_column=cfg["gene_column"],
            type=cfg["type"],
            type_column=cfg["type_column"],
            min_cells=min_cells,
            strict=cfg["strict"],
        )


def _check_name(value: Any, key: str, nullable: bool) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, str) or not value:
        expected = "a non-empty string" + (" or null" if nullable else "")
        raise InputError(f"{key}: got {value!r}, expected {expected}")


# ---------------------------------------------------------------- one label
def canonical_condition(label: str, spec: PerturbSpec) -> str:
    """The canonical condition (``ctrl``, ``A``, ``A+B``) of one raw label.

    Raises InputError with the reason (the caller names the file, column and count).
    """
    if label in spec.control:
        return CONTROL
    parts = label.split(spec.separator)
    if any(not p for p in parts):
        raise InputError(f"an empty part between {spec.separator!r} separators")
    genes = [p for p in parts if p not in spec.control]
    if not genes:
        raise InputError("only control parts, no perturbed gene")
    if len(parts) - len(genes) > 1:
        raise InputError("more than one control part")
    if len(set(genes)) != len(genes):
        raise InputError("a gene named twice")
    for g in genes:
        if g != "".join(g.split()):
            raise InputError(f"part {g!r} contains white space")
        if g == CONTROL or SEP in g:
            raise InputError(
                f"part {g!r} is not a gene name (a control label missing from control: "
                f"{list(spec.control)}, or a separator other than {spec.separator!r}?)"
            )
    return make_condition(genes)


def canonical_type(value: str) -> str:
    """knockdown | knockout | activation of a free-text type (:data:`TYPE_ALIASES`)."""
    out = TYPE_ALIASES.get(str(value).strip().lower())
    if out is None:
        raise InputError(f"unknown perturbation type {value!r}")
    return out


# ---------------------------------------------------------------- the cells of a dataset
@dataclass(frozen=True)
class PerturbObs:
    """The perturbation facts of a dataset's cells (:func:`read_perturbation_obs`).

    Arrays are [N] over all cells of the file(s), in file order.
    """

    cell_ids: pd.Index  # [N] cell ids
    condition: pd.Categorical  # [N] canonical condition; NaN where the label is missing
    perturbation_type: pd.Categorical  # [N] knockdown | knockout | activation; NaN as above
    keep: np.ndarray  # [N] bool: cells kept (see the module docstring)
    genes: pd.Index  # [G] measured gene names (shared by every file), in the first file's order
    perturbed_genes: tuple[str, ...]  # measured genes perturbed in a kept cell, sorted
    unmeasured_genes: tuple[str, ...]  # perturbed genes not among ``genes``, sorted
    n_missing_label: int  # cells dropped for a missing label
    n_unmeasured_cells: int  # cells dropped for an unmeasured perturbed gene
    dropped_conditions: dict[str, int]  # condition -> cells, below min_cells (dropped)

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())

    @property
    def conditions(self) -> pd.Series:
        """Cells per kept condition (control included), by name."""
        kept = pd.Series(self.condition[self.keep]).value_counts()
        return kept[kept > 0].sort_index()


@dataclass
class _Part:
    """One file's cells, parsed."""

    path: Path
    cell_ids: pd.Index  # [n]
    condition: pd.Categorical  # [n]
    type: pd.Categorical  # [n]
    genes: pd.Index  # [G_file]


def _as_categorical(values: pd.Series) -> pd.Categorical:
    """A column as categorical with str categories (NaN stays missing)."""
    cat = pd.Categorical(values)
    if len(cat.categories) and not all(isinstance(c, str) for c in cat.categories):
        cat = cat.rename_categories([str(c) for c in cat.categories])
    return cat


def _read_part(f: h5py.File, path: Path, dataset: DatasetSpec) -> _Part:
    spec = dataset.perturbation
    assert spec is not None
    where = f"datasets.{dataset.name}.perturbation"
    cell_ids, columns = _frame_index(f, "obs", path)
    _check_unique(cell_ids, path, "cell")
    if spec.column not in columns:
        shown = ", ".join(columns[:10]) or "none"
        raise InputError(
            f"{path}: obs column {spec.column!r} ({where}.column) not found; obs columns: {shown}"
        )
    labels = _as_categorical(read_frame_column(f, "obs", spec.column, path))
    if len(labels) != len(cell_ids):
        raise InputError(f"{path}: obs column {spec.column!r} has the wrong length")
    condition = _parse_labels(labels, spec, path, f"{where}.column")
    if spec.type is not None:
        if spec.type_column is not None and spec.type_column in columns:
            log.info(
                "dataset %r: %s: type %s declared (%s.type); obs column %r not read",
                dataset.name,
                path,
                spec.type,
                where,
                spec.type_column,
            )
        types = pd.Categorical(
            np.where(pd.isna(condition), None, spec.type).astype(object), categories=TYPES
        )
    else:
        assert spec.type_column is not None
        if spec.type_column not in columns:
            raise InputError(
                f"{path}: obs column {spec.type_column!r} ({where}.type_column) not found and "
                f"{where}.type is not declared; set type: {' | '.join(TYPES)}"
            )
        raw = _as_categorical(read_frame_column(f, "obs", spec.type_column, path))
        types = _parse_types(raw, condition, spec, path, f"{where}.type_column")
    _, var_key = _expression_keys(dataset)
    genes = gene_names(f, var_key, path, dataset)
    return _Part(path, cell_ids, condition, types, genes)


def _parse_labels(
    labels: pd.Categorical, spec: PerturbSpec, path: Path, key: str
) -> pd.Categorical:
    """[n] canonical conditions of the labels (parsed once per distinct label)."""
    canon = []
    for label in labels.categories:
        try:
            canon.append(canonical_condition(label, spec))
        except InputError as exc:
            count = int((labels == label).sum())
            raise InputError(
                f"{path}: obs column {spec.column!r} ({key}): cannot parse label {label!r} "
                f"({count} cells): {exc}"
            ) from None
    names = sorted(set(canon))
    position = {c: i for i, c in enumerate(names)}
    lookup = np.array([position[c] for c in canon] + [-1], dtype=np.int64)  # code -1: missing
    return pd.Categorical.from_codes(lookup[labels.codes], categories=names)


def _parse_types(
    raw: pd.Categorical,
    condition: pd.Categorical,
    spec: PerturbSpec,
    path: Path,
    key: str,
) -> pd.Categorical:
    """[n] canonical types of the labelled cells (NaN where the label is missing)."""
    labelled = ~pd.isna(condition)
    missing = labelled & pd.isna(raw)
    if missing.any():
        raise InputError(
            f"{path}: obs column {spec.type_column!r} ({key}) has no value for "
            f"{int(missing.sum())} labelled cells; declare the type instead (type: "
            f"{' | '.join(TYPES)})"
        )
    used = pd.Categorical(raw[labelled]).remove_unused_categories()
    canon = []
    for value in used.categories:
        try:
            canon.append(canonical_type(value))
        except InputError as exc:
            count = int((raw == value).sum())
            known = ", ".join(sorted(TYPE_ALIASES))
            raise InputError(
                f"{path}: obs column {spec.type_column!r} ({key}): {exc} ({count} cells); "
                f"known: {known}; or declare type: {' | '.join(TYPES)}"
            ) from None
    mapping = dict(zip(used.categories, canon, strict=True))
    values = np.full(len(raw), None, dtype=object)
    values[labelled] = [mapping[v] for v in np.asarray(raw[labelled], dtype=object)]
    return pd.Categorical(values, categories=TYPES)


def read_perturbation_obs(
    paths: str | os.PathLike | Sequence[str | os.PathLike], dataset: DatasetSpec
) -> PerturbObs:
    """Each cell's canonical condition and type, and the cells kept, of a Perturb-seq dataset.

    paths: its .h5ad file, or several read as one (cells in file order; cell ids unique
    across the files). dataset: its spec; ``dataset.perturbation`` is the block,
    ``dataset.expression`` says which gene table (var or raw/var) names the genes.
    Reads only obs's index and the label/type columns, and the gene names (memory: [N]
    columns). Logs what it drops. Raises InputError (one line, naming the file or key) for
    a missing column, an unparseable label, an unknown type, duplicate cell ids, unmeasured
    perturbed genes under ``strict``, no control cells, no perturbed condition left.
    """
    spec = dataset.perturbation
    if spec is None:
        raise InputError(f"datasets.{dataset.name}: has no perturbation block")
    where = f"datasets.{dataset.name}.perturbation"
    files = [Path(paths)] if isinstance(paths, str | os.PathLike) else [Path(p) for p in paths]
    if not files:
        raise InputError(f"datasets.{dataset.name}: no dataset files given")
    parts = []
    for path in files:
        with open_h5ad(path) as f:
            parts.append(_read_part(f, path, dataset))
    cell_ids = pd.Index(np.concatenate([p.cell_ids.to_numpy() for p in parts]), name="cell_id")
    if len(parts) > 1:
        sources = pd.Series(np.concatenate([[str(p.path)] * len(p.cell_ids) for p in parts]))
        _check_unique_across(cell_ids, sources, dataset)
    condition = _concat([p.condition for p in parts])
    types = _concat([p.type for p in parts], categories=TYPES)
    genes = shared_gene_names([p.genes for p in parts])
    source = ", ".join(str(p) for p in files)

    keep = ~pd.isna(condition)
    n_missing = int((~keep).sum())
    if n_missing:
        log.warning(
            "dataset %r: %d cells without a label in obs column %r dropped",
            dataset.name,
            n_missing,
            spec.column,
        )
    # unmeasured perturbed genes
    names = list(condition.categories)
    perturbed = {c: condition_genes(c) for c in names}
    measured = set(genes)
    unmeasured = sorted({g for gs in perturbed.values() for g in gs if g not in measured})
    n_unmeasured_cells = 0
    if unmeasured:
        if spec.strict:
            raise InputError(
                f"{source}: {len(unmeasured)} perturbed genes are not among the "
                f"{len(genes)} measured genes ({where}.strict is true): {', '.join(unmeasured)}"
            )
        bad = [i for i, c in enumerate(names) if any(g not in measured for g in perturbed[c])]
        dropped = keep & np.isin(condition.codes, bad)
        n_unmeasured_cells = int(dropped.sum())
        keep &= ~dropped
        log.warning(
            "dataset %r: %d perturbed genes are not measured; %d cells of the %d conditions "
            "naming them dropped: %s",
            dataset.name,
            len(unmeasured),
            n_unmeasured_cells,
            len(bad),
            ", ".join(unmeasured),
        )
    # conditions below min_cells
    counts = np.bincount(condition.codes[keep], minlength=len(names))
    small = {
        names[i]: int(counts[i]) for i in np.flatnonzero((counts > 0) & (counts < spec.min_cells))
    }
    control_cells = int(counts[names.index(CONTROL)]) if CONTROL in names else 0
    if control_cells == 0:
        raise InputError(
            f"{source}: no control cells (labels {list(spec.control)} in obs column "
            f"{spec.column!r}; {where}.control)"
        )
    if CONTROL in small:
        raise InputError(
            f"{source}: {control_cells} control cells, fewer than {where}.min_cells="
            f"{spec.min_cells}"
        )
    if small:
        keep &= ~np.isin(condition.codes, [names.index(c) for c in small])
        log.warning(
            "dataset %r: %d conditions with fewer than %d cells dropped (%d cells): %s",
            dataset.name,
            len(small),
            spec.min_cells,
            sum(small.values()),
            ", ".join(f"{c} ({n})" for c, n in small.items()),
        )
    kept = [i for i in np.flatnonzero(counts >= spec.min_cells) if names[i] != CONTROL]
    if not kept:
        raise InputError(
            f"{source}: no perturbed condition left with at least {where}.min_cells="
            f"{spec.min_cells} cells and measured genes ({len(small)} below min_cells, "
            f"{len(unmeasured)} unmeasured perturbed genes)"
        )
    perturbed_genes = tuple(sorted({g for i in kept for g in perturbed[names[i]]}))
    log.info(
        "dataset %r: %d of %d cells kept: %d control, %d perturbed conditions (%d singles, "
        "%d combinations) of %d measured perturbed genes",
        dataset.name,
        int(keep.sum()),
        len(keep),
        control_cells,
        len(kept),
        sum(1 for i in kept if len(perturbed[names[i]]) == 1),
        sum(1 for i in kept if len(perturbed[names[i]]) > 1),
        len(perturbed_genes),
    )
    return PerturbObs(
        cell_ids=cell_ids,
        condition=condition,
        perturbation_type=types,
        keep=np.asarray(keep, dtype=bool),
        genes=genes,
        perturbed_genes=perturbed_genes,
        unmeasured_genes=tuple(unmeasured),
        n_missing_label=n_missing,
        n_unmeasured_cells=n_unmeasured_cells,
        dropped_conditions=small,
    )


def _concat(parts: list[pd.Categorical], categories: Sequence[str] | None = None) -> pd.Categorical:
    """[sum n] the parts' values as one categorical: ``categories``, or the sorted union."""
    joined = union_categoricals(parts, sort_categories=True, ignore_order=True)
    return joined if categories is None else joined.set_categories(list(categories))
