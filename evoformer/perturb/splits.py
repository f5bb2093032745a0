"""Perturbation-level train/val/test splits of a Perturb-seq screen, with each held-out
condition's subgroup.

A perturbed condition (``A``, ``A+B``) is never divided: all its cells share one set, so no
validation or test condition has a cell in training. Control cells (``ctrl``) are divided at the
cell level by ``control_fractions``: every delta downstream is taken against the mean of the
*training* control cells only, and the validation / test control cells score the no-change
baseline on cells no fit has seen.

Subgroups
---------
Every subgroup is relative to the training conditions (``set == "train"``, validation excluded),
the conditions every baseline and model is fitted on:

* a gene is **seen** when its single condition is in training (GEARS's meaning: in its
  simulation split every training gene's single is a training condition). A gene perturbed in
  training only as part of a double is *not* seen;
* ``combo_seen0`` / ``combo_seen1`` / ``combo_seen2``: a held-out double with 0 / 1 / 2 seen
  genes (GEARS's names);
* ``unseen_single``: a held-out single whose gene is in no training condition at all;
  ``seen_single``: a held-out single whose gene is perturbed in a training double (only custom
  lists produce it; a held-out single's own condition is never in training);
* ``train``: every perturbed training condition; ``control``: every control cell, in any set.

Kinds (``PerturbSplitParams.kind``)
-----------------------------------
``simulation``
    GEARS's simulation split, following ``DataSplitter.get_simulation_split`` and
    ``DataSplitter.split_data`` in snap-stanford/GEARS ``gears/data_utils.py``: of the genes
    perturbed in any condition (sorted), ``floor(n * train_gene_set_size)`` are drawn as training
    genes, the rest held out. Singles of training genes are trained on; singles of held-out genes
    are tested; a double with one held-out gene or two is tested; of the doubles with both genes
    training genes, ``floor(n * combo_seen2_train_frac)`` are trained on, the rest tested.
    Validation conditions are drawn from the training conditions by the same procedure with
    ``1 - val_fraction`` as both fractions (GEARS hard-codes 0.9 and 0.9, i.e.
    ``val_fraction = 0.1``). Deliberate differences from GEARS: (1) a numpy ``Generator`` from
    ``seed`` on sorted conditions, not the legacy global RNG on conditions in order of first
    appearance in the cells (GEARS's split changes when the cells are reordered; the same seed
    does not give GEARS's draws); (2) subgroups are relative to the training conditions *after*
    the validation draw (GEARS labels test conditions before it), so a test double whose gene's
    single went to validation counts that gene as unseen: the label says what the fitted models
    actually saw; (3) "seen" means the gene's single is a training condition (GEARS: the gene is
    a training gene even when the screen has no single of it); (4) controls are divided by
    ``control_fractions`` (GEARS puts all of them in training).
``double``
    The double split of Ahlmann-Eltze, Huber & Anders (Nature Methods 2025): every single is
    trained on; of the doubles (sorted), ``floor(n * double_train_frac)`` drawn are trained on and
    the others tested (``combo_seen2`` where both singles are in the screen). Validation
    conditions are ``n - floor(n * (1 - val_fraction))`` of the training doubles, never singles,
    so that every single stays in training and the test doubles keep both genes seen.
``custom``
    ``test`` (required) and ``val`` (optional) condition lists; every other perturbed condition
    is trained on. Without a ``val`` list, ``n - floor(n * (1 - val_fraction))`` of the training
    conditions, drawn uniformly, are validation conditions (``val: []`` for none).

The split depends only on the set of conditions, the control cell ids, the params and the seed:
never on the order of the cells. Conditions perturbing more than two genes are refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from evoformer.errors import InputError
from evoformer.io import atomic_path
from evoformer.perturb.conditions import (
    CONTROL,
    SEP,
    condition_genes,
    make_condition,
    n_perturbed,
)
from evoformer.typed import from_plain

SETS = ("train", "val", "test")
KINDS = ("simulation", "double", "custom")
TRAIN_SUBGROUP = "train"
CONTROL_SUBGROUP = "control"
HELD_OUT_SUBGROUPS = ("unseen_single", "seen_single", "combo_seen0", "combo_seen1", "combo_seen2")
COLUMNS = ("cell_id", "condition", "set", "subgroup")
SUMMARY_COLUMNS = ("condition", "set", "subgroup", "n_cells")
DEFAULT_WHERE = "split.perturbation"


# ----------------------------------------------------------------------------------- params
@dataclass(frozen=True)
class ControlFractions:
    """Shares of the control cells in each set (rounded per set as :mod:`evoformer.data.split`)."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def as_dict(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}


@dataclass(frozen=True)
class PerturbSplitParams:
    """Settings of a perturbation split (module docstring for the kinds).

    Attributes:
        kind: ``simulation``, ``double`` or ``custom``.
        seed: seed of every draw (conditions and control cells).
        train_gene_set_size: simulation: share of the perturbed genes drawn as training genes.
        combo_seen2_train_frac: simulation: share of the doubles of two training genes trained on.
        double_train_frac: double: share of the doubles trained on.
        val_fraction: share of the training conditions held out for validation (per kind).
        control_fractions: shares of the control cells in train / val / test.
        test: custom: the test conditions (canonical, ``A`` / ``A+B``).
        val: custom: the validation conditions; ``None`` draws ``val_fraction`` of training.
    """

    kind: Literal["simulation", "double", "custom"] = "simulation"
    seed: int = 0
    train_gene_set_size: float = 0.75
    combo_seen2_train_frac: float = 0.75
    double_train_frac: float = 0.5
    val_fraction: float = 0.1
    control_fractions: ControlFractions = field(default_factory=ControlFractions)
    test: tuple[str, ...] | None = None
    val: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = DEFAULT_WHERE) -> PerturbSplitParams:
        """Build from plain config; a bad key or value raises a one-line ``InputError`` naming
        ``<where>.<key>``. ``test`` / ``val`` take lists of conditions, canonicalised
        (``B+A`` -> ``A+B``); ``ctrl`` or a malformed condition is refused."""
        if d is not None and not isinstance(d, dict):
            raise InputError(f"config key '{where}': expected a mapping, got {type(d).__name__}")
        d = dict(d or {})
        for key in ("test", "val"):
            if d.get(key) is not None:
                d[key] = parse_condition_list(d[key], f"{where}.{key}")
        p = from_plain(cls, d, where)
        p.validate(where)
        return p

    def validate(self, where: str = DEFAULT_WHERE) -> None:
        """Check every value on its own (feasibility on a screen: :func:`assign_conditions`)."""

        def bad(key: str, value: Any, what: str) -> InputError:
            return InputError(f"config key '{where}.{key}': got {value!r}, {what}")

        if self.kind not in KINDS:
            raise bad("kind", self.kind, f"expected one of {', '.join(KINDS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", self.seed, "expected an integer >= 0")
        for key in ("train_gene_set_size", "double_train_frac"):
            if not 0 < getattr(self, key) < 1:
                raise bad(key, getattr(self, key), "expected a number in (0, 1)")
        if not 0 <= self.combo_seen2_train_frac <= 1:
            raise bad("combo_seen2_train_frac", self.combo_seen2_train_frac, "expected [0, 1]")
        if not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", self.val_fraction, "expected a number in [0, 1)")
        cf = self.control_fractions.as_dict()
        for name, v in cf.items():
            if not 0 <= v <= 1:
                raise bad(f"control_fractions.{name}", v, "expected a number in [0, 1]")
        if not cf["train"] > 0:
            raise bad("control_fractions.train", cf["train"], "expected a number > 0")
        if not math.isclose(sum(cf.values()), 1.0, abs_tol=1e-6):
            raise InputError(
                f"config key '{where}.control_fractions': {cf} must sum to 1 "
                f"(sum {sum(cf.values()):.6g})"
            )
        if self.kind == "custom":
            if not self.test:
                raise bad(
                    "test", self.test, "expected a non-empty list of conditions (kind custom)"
                )
            both = sorted(set(self.test) & set(self.val or ()))
            if both:
                raise bad("val", both[0], "is also in the test list")
        else:
            for key in ("test", "val"):
                if getattr(self, key) is not None:
                    raise bad(key, list(getattr(self, key)), "condition lists need kind: custom")


def parse_condition_list(value: Any, key: str) -> tuple[str, ...]:
    """A config list of conditions as sorted canonical conditions (genes sorted, deduplicated).

    value: a list of strings such as ``["A", "B+A"]`` -> ``("A", "A+B")``.
    """
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise InputError(f"config key '{key}': got {value!r}, expected a list of conditions")
    out = set()
    for c in value:
        if not isinstance(c, str):
            raise InputError(f"config key '{key}': got {c!r}, expected a condition string")
        try:
            out.add(make_condition(c.split(SEP)))
        except InputError as e:
            raise InputError(
                f"config key '{key}': {c!r} is not a perturbed condition ({e}); control cells "
                "are divided by control_fractions"
            ) from None
    return tuple(sorted(out))


# ------------------------------------------------------------------------------- subgroups
def seen_genes(train_conditions: Iterable[str]) -> frozenset[str]:
    """The genes whose single condition is among ``train_conditions`` (the "seen" genes)."""
    return frozenset(g for c in train_conditions if n_perturbed(c) == 1 for g in condition_genes(c))


def subgroup_of(condition: str, train_conditions: Iterable[str]) -> str:
    """The subgroup of one condition against ``train_conditions`` (:func:`subgroups_of`)."""
    return subgroups_of([condition], train_conditions)[0]


def subgroups_of(conditions: Sequence[str], train_conditions: Iterable[str]) -> list[str]:
    """The subgroup of each of ``conditions`` [K] against ``train_conditions`` (module docstring):
    ``ctrl`` -> ``control``, a training condition -> ``train``, a held-out one -> one of
    :data:`HELD_OUT_SUBGROUPS`. Returns [K] names; linear in the number of conditions."""
    train = set(train_conditions)
    in_training = {g for c in train for g in condition_genes(c)}
    seen = seen_genes(train)
    out = []
    for condition in conditions:
        genes = condition_genes(condition)
        if not genes:
            out.append(CONTROL_SUBGROUP)
        elif condition in train:
            out.append(TRAIN_SUBGROUP)
        elif len(genes) == 1:
            out.append("seen_single" if genes[0] in in_training else "unseen_single")
        else:
            out.append(f"combo_seen{sum(g in seen for g in genes)}")
    return out


# ------------------------------------------------------------------------ condition draws
def _kept(n: int, frac: float) -> int:
    """``floor(n * frac)`` as GEARS rounds its shares (``int(...)``), safe from 0.29 * 100."""
    return math.floor(n * frac + 1e-9)


def _draw(items: Sequence[str], k: int, rng: np.random.Generator) -> set[str]:
    """``k`` of ``items`` (sorted), drawn without replacement."""
    items = sorted(items)
    return {items[i] for i in rng.choice(len(items), size=k, replace=False)} if k else set()


def _simulation(
    conditions: Sequence[str], gene_frac: float, combo_frac: float, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """GEARS's ``get_simulation_split`` on perturbed ``conditions``: (trained on, held out)."""
    genes = sorted({g for c in conditions for g in condition_genes(c)})
    train_genes = _draw(genes, _kept(len(genes), gene_frac), rng)
    train, held, pool = [], [], []
    for c in sorted(conditions):
        k = sum(g in train_genes for g in condition_genes(c))
        if n_perturbed(c) == 1:
            (train if k else held).append(c)
        elif k == 2:
            pool.append(c)
        else:
            held.append(c)
    pool_train = _draw(pool, _kept(len(pool), combo_frac), rng)
    train += [c for c in pool if c in pool_train]
    held += [c for c in pool if c not in pool_train]
    return sorted(train), sorted(held)


def _n_val(n_train: int, val_fraction: float) -> int:
    """Validation conditions taken from ``n_train``: what a ``1 - val_fraction`` keep leaves."""
    return n_train - _kept(n_train, 1 - val_fraction)


def assign_conditions(
    conditions: Iterable[str], params: PerturbSplitParams, where: str = DEFAULT_WHERE
) -> pd.DataFrame:
    """The set and subgroup of every perturbed condition of a screen (cheap: no cells).

    conditions: the screen's canonical conditions (``ctrl`` and repeats allowed, ignored).
    Returns [K] columns condition, set, subgroup, one row per perturbed condition, sorted.
    Raises ``InputError`` naming ``<where>.<key>`` when the kind cannot split this screen
    (no doubles for ``double``, no test condition left, no training condition left, a listed
    condition not in the screen) or a condition is not canonical / perturbs > 2 genes.
    """
    params.validate(where)
    perturbed = sorted({c for c in conditions if c != CONTROL})
    for c in perturbed:
        try:
            canonical = make_condition(c.split(SEP)) == c
        except InputError:
            canonical = False
        if not canonical:
            raise InputError(f"perturbation split: condition {c!r} is not canonical (A or A+B)")
        if n_perturbed(c) > 2:
            raise InputError(
                f"perturbation split: condition {c!r} perturbs {n_perturbed(c)} genes; "
                "splits handle singles and doubles only"
            )
    if not perturbed:
        raise InputError("perturbation split: the screen has no perturbed condition")
    rng = np.random.default_rng(params.seed)
    doubles = [c for c in perturbed if n_perturbed(c) == 2]
    val: list[str] = []
    if params.kind == "simulation":
        train, test = _simulation(
            perturbed, params.train_gene_set_size, params.combo_seen2_train_frac, rng
        )
        if params.val_fraction > 0:
            keep = 1 - params.val_fraction
            train, val = _simulation(train, keep, keep, rng)
    elif params.kind == "double":
        if not doubles:
            raise InputError(
                f"config key '{where}.kind': got 'double', but the screen has no double "
                f"perturbation ({len(perturbed)} singles)"
            )
        train_doubles = _draw(doubles, _kept(len(doubles), params.double_train_frac), rng)
        test = [c for c in doubles if c not in train_doubles]
        val_set = _draw(train_doubles, _n_val(len(train_doubles), params.val_fraction), rng)
        val = sorted(val_set)
        train = [c for c in perturbed if c not in test and c not in val_set]
    else:  # custom
        listed = {"test": params.test or (), "val": params.val or ()}
        for key, conds in listed.items():
            for c in conds:
                if c not in perturbed:
                    raise InputError(
                        f"config key '{where}.{key}': condition {c!r} is not in the screen "
                        f"({len(perturbed)} perturbed conditions)"
                    )
        test = sorted(listed["test"])
        rest = [c for c in perturbed if c not in set(test)]
        if params.val is not None:
            val = sorted(params.val)
        else:
            val = sorted(_draw(rest, _n_val(len(rest), params.val_fraction), rng))
        train = [c for c in rest if c not in set(val)]
    if not test:
        raise InputError(
            f"config key '{where}.kind': {params.kind!r} leaves no test condition on this screen "
            f"({len(perturbed)} perturbed conditions, {len(doubles)} doubles)"
        )
    if not train:
        raise InputError(
            f"config key '{where}.kind': {params.kind!r} leaves no perturbed condition in "
            f"training on this screen ({len(perturbed)} perturbed conditions)"
        )
    set_of = {c: "train" for c in train} | {c: "val" for c in val} | {c: "test" for c in test}
    if len(set_of) != len(perturbed) or len(train) + len(val) + len(test) != len(perturbed):
        raise RuntimeError("perturbation split: a condition is in no set or in two")  # a bug
    return pd.DataFrame(
        {
            "condition": perturbed,
            "set": [set_of[c] for c in perturbed],
            "subgroup": subgroups_of(perturbed, train),
        }
    )


# ---------------------------------------------------------------------------------- cells
def split_perturbation_cells(
    cells: pd.DataFrame, params: PerturbSplitParams, where: str = DEFAULT_WHERE
) -> pd.DataFrame:
    """Assign every cell of a screen to a set, with its condition's subgroup.

    cells: [N] a table with columns ``cell_id`` (unique) and ``condition`` (canonical); other
        columns are ignored.
    Returns [N] columns cell_id, condition, set, subgroup, in the input order. A perturbed
    condition's cells share its set (:func:`assign_conditions`); control cells are divided by
    ``params.control_fractions`` (seeded, on the sorted control ids, so the order of the rows
    does not matter). The guarantees of :func:`check_split` are checked before returning.
    """
    from evoformer.data.split import split_cells  # the cell-level split, shared

    for col in ("cell_id", "condition"):
        if col not in cells:
            raise InputError(f"perturbation split: the cell table has no {col!r} column")
    ids = cells["cell_id"].astype(str).to_numpy()
    cond = cells["condition"].astype(str).to_numpy()
    dup = pd.Index(ids).duplicated()
    if dup.any():
        raise InputError(
            f"perturbation split: duplicate cell ids ({int(dup.sum())}), e.g. {ids[dup][0]!r}"
        )
    is_ctrl = cond == CONTROL
    if not is_ctrl.any():
        raise InputError("perturbation split: the screen has no control cells ('ctrl')")
    by_condition = assign_conditions(pd.unique(cond), params, where).set_index("condition")
    sets = pd.Series(cond).map(by_condition["set"]).to_numpy(dtype=object)
    subgroups = pd.Series(cond).map(by_condition["subgroup"]).to_numpy(dtype=object)
    ctrl_ids = np.sort(ids[is_ctrl])
    ctrl = split_cells(ctrl_ids, None, params.control_fractions.as_dict(), seed=params.seed)
    ctrl_set = pd.Series(ctrl["split"].to_numpy(), index=ctrl_ids)
    sets[is_ctrl] = ctrl_set.loc[ids[is_ctrl]].to_numpy()
    subgroups[is_ctrl] = CONTROL_SUBGROUP
    if not (sets[is_ctrl] == "train").any():
        raise InputError(
            f"config key '{where}.control_fractions': {int(is_ctrl.sum())} control cells leave "
            f"none for training at {params.control_fractions.as_dict()}"
        )
    table = pd.DataFrame(
        {"cell_id": ids, "condition": cond, "set": sets.astype(str), "subgroup": subgroups}
    )
    table["subgroup"] = table["subgroup"].astype(str)
    check_split(table, "perturbation split")
    return table


def check_split(table: pd.DataFrame, what: str) -> None:
    """Raise ``InputError`` naming ``what`` unless ``table`` [N] (columns :data:`COLUMNS`) is a
    valid split: every cell once, sets in train/val/test, each perturbed condition in exactly one
    set (so no validation or test condition has a cell in training), control cells in subgroup
    ``control`` with some in training, training conditions in subgroup ``train``, every held-out
    condition's subgroup the one :func:`subgroup_of` gives against the training conditions."""
    missing = [c for c in COLUMNS if c not in table]
    if missing:
        raise InputError(f"{what}: missing columns {missing} (expected {list(COLUMNS)})")
    if table["cell_id"].duplicated().any():
        dup = table["cell_id"][table["cell_id"].duplicated()].iloc[0]
        raise InputError(f"{what}: cell {dup!r} appears more than once")
    bad_set = ~table["set"].isin(SETS)
    if bad_set.any():
        raise InputError(f"{what}: set {table['set'][bad_set].iloc[0]!r} is not train/val/test")
    ctrl = table["condition"] == CONTROL
    if not ((table["set"] == "train") & ctrl).any():
        raise InputError(f"{what}: no control cell in training")
    if (table["subgroup"][ctrl] != CONTROL_SUBGROUP).any():
        raise InputError(f"{what}: a control cell is not in subgroup {CONTROL_SUBGROUP!r}")
    pert = table[~ctrl]
    per_condition = pert.groupby("condition", sort=True)[["set", "subgroup"]].nunique()
    split_up = per_condition.index[(per_condition > 1).any(axis=1)]
    if len(split_up):
        raise InputError(f"{what}: condition {split_up[0]!r} has cells in several sets/subgroups")
    first = pert.drop_duplicates("condition")
    train = first["condition"][first["set"] == "train"]
    expected = subgroups_of(first["condition"].tolist(), train)
    rows = zip(first["condition"], first["set"], first["subgroup"], expected, strict=True)
    for c, s, got, want in rows:
        if got != want:
            raise InputError(
                f"{what}: condition {c!r} ({s}) has subgroup {got!r}, "
                f"expected {want!r} against the training conditions"
            )


def split_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Cells per condition and set: [K] columns condition, set, subgroup, n_cells, ordered by
    set (train, val, test) then condition (``ctrl`` appears once per set it has cells in)."""
    summary = (
        table.groupby(["condition", "set", "subgroup"], sort=False)
        .size()
        .rename("n_cells")
        .reset_index()
    )
    order = summary["set"].map({s: i for i, s in enumerate(SETS)})
    summary = summary.assign(_o=order).sort_values(["_o", "condition"], kind="stable")
    return summary.drop(columns="_o").reset_index(drop=True)[list(SUMMARY_COLUMNS)]


# ------------------------------------------------------------------------------------ files
def write_split(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write [N] ``cell_id condition set subgroup`` as a TSV with a header, atomically; the same
    table gives the same bytes."""
    with atomic_path(path) as tmp:
        table[list(COLUMNS)].to_csv(tmp, sep="\t", index=False, lineterminator="\n")


def write_split_summary(summary: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write :func:`split_summary`'s table as a TSV ``condition set subgroup n_cells``."""
    with atomic_path(path) as tmp:
        summary[list(SUMMARY_COLUMNS)].to_csv(tmp, sep="\t", index=False, lineterminator="\n")


def read_split(path: str | os.PathLike) -> pd.DataFrame:
    """Read a split TSV written by :func:`write_split` ([N] columns :data:`COLUMNS`, strings)
    and check it (:func:`check_split`, errors name the file)."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(f"{path}: cannot read the perturbation split ({e})") from None
    check_split(table, str(path))
    return table[list(COLUMNS)]


def run_perturbation_split(
    cells: pd.DataFrame,
    params: PerturbSplitParams,
    out_tsv: str | os.PathLike,
    summary_tsv: str | os.PathLike | None = None,
    where: str = DEFAULT_WHERE,
) -> pd.DataFrame:
    """Split ``cells`` [N] (cell_id, condition), write the split TSV (and the per-condition
    summary TSV when asked); returns the split table [N]."""
    table = split_perturbation_cells(cells, params, where)
    write_split(table, out_tsv)
    if summary_tsv is not None:
        write_split_summary(split_summary(table), summary_tsv)
    return table


def split_hvg_cells(
    hvg_h5ad: str | os.PathLike,
    params: dict[str, Any],
    out_tsv: str | os.PathLike,
    summary_tsv: str | os.PathLike | None = None,
    where: str = DEFAULT_WHERE,
) -> pd.DataFrame:
    """The ``perturb_split`` step: split the cells of an hvg.h5ad (``obs.condition``) with the
    config slice ``params`` (:meth:`PerturbSplitParams.from_dict`)."""
    from evoformer.perturb.stats import read_hvg_obs

    cells, conditions, _ = read_hvg_obs(hvg_h5ad)
    frame = pd.DataFrame({"cell_id": cells, "condition": conditions})
    return run_perturbation_split(
        frame, PerturbSplitParams.from_dict(params, where), out_tsv, summary_tsv, where
    )
