"""Synthetic Perturb-seq screens with a known answer, on the planted-network model.

The cells are those of :mod:`evoformer.data.planted` (cell types, a random DAG with ``f``
activations, log-normal library sizes, negative-binomial counts), with these additions.

**Modules.** Genes are split into ``n_modules`` modules of (nearly) equal size, assigned at
random. The DAG is drawn as planted's (a random topological order; a gene is regulated with
probability ``regulated_fraction``; only the first ``n_regulators`` genes of the order may
regulate), except for where each of a regulated gene's ``edges_per_gene`` parents comes from:
with probability ``cross_module_fraction`` from the earlier regulators of the *other*
modules, otherwise from the earlier regulators of the gene's *own* module (a gene gets fewer
parents when a pool is too small). With ``cross_module_fraction = 0`` the modules are
disconnected sub-networks.

**Interventions** (``perturbation``). A guide works in a cell unless the cell escapes
(probability ``escape_fraction``, independently per guide); an escaping cell is unperturbed
by that guide. In a cell where it works, the target's incoming edges are cut: its latent
log-rate is *set* to its own term with its parents at their population means (where
``f = 0``), shifted::

    l[c, target] = b[t, target] + eps[c, target] + shift

``knockdown``: ``shift = -strength * e``; ``activation``: ``shift = +strength * e``, with a
per-cell, per-guide efficiency ``e ~ Beta(efficiency_mean * k, (1 - efficiency_mean) * k)``,
``k = efficiency_concentration`` (``e = 1`` when ``efficiency_mean = 1``); ``knockout``:
``shift = -KNOCKOUT_SHIFT`` (``exp(-10)``: no counts left, ``e = 1``). The network is then
propagated in topological order from the set value, so the target's descendants move and
every other gene's latent value is exactly what it would have been.

**Conditions.** Control cells; a single perturbation of a share ``single_fraction`` of the
candidate genes (``perturb_genes``: ``with_children``, genes with at least one child, or
``regulators``, the first ``n_regulators`` of the order); ``n_doubles_within`` /
``n_doubles_across`` doubles of two single-perturbed genes of the same / different modules.
A share ``cooperative_fraction`` of the doubles gets ``n_cooperative_targets`` cooperative
targets (random genes other than the pair): in a cell where both guides work, each target's
latent gets the planted synergy ``s * e_A * e_B`` added to its own term (so it reaches the
target's descendants too), ``s = ±synergy_strength * U(0.5, 1.5)``. Such a double is not
additive: a genetic interaction. ``systematic_shift`` adds ``±systematic_shift * U(0.5, 1.5)``
to the own term of a program of ``systematic_fraction * n_genes`` genes in *every* perturbed
cell (escaping or not; 0 by default): a difference between perturbed and control cells that
no perturbation causes. Cells: ``n_control`` controls and ``cells_per_condition`` per
perturbed condition, in a seeded random order, each cell of a random type.

**Truth** (``<stem>_truth.npz``). All in ``x = log1p(1e4 * counts / total)``, the value the
pipeline sees. ``delta[c, g] = E[x_g | c] - E[x_g | control]``, estimated on ``truth_cells``
fresh cells with common random numbers: each cell's type, library size, ``eps``, gamma draws
of the count model and guide outcomes (escape, efficiency per perturbed gene) are shared by
every condition and control; its control counts are drawn once and each condition's counts
are coupled to them (where the rate rises, control counts plus Poisson(difference); where it
falls, a binomial thinning of the control counts; unchanged rates keep the same counts: the
exact marginals with little noise in the differences). ``delta_se`` is the Monte-Carlo
standard error (sd of the per-cell differences / sqrt(truth_cells)). For doubles,
``interaction = delta_AB - delta_A - delta_B`` with its own standard error from the per-cell
values ``x_AB - x_A - x_B + x_ctrl`` (same cells for all four). With the default 4000 cells
the error on affected genes is a median 0.014 (max 0.03) on the default screen, 0.008 (max
0.03) on a Norman-sized one (``benchmarks/bench_screen.py``); on the other genes below 1e-3.

*Genes that do not move.* A gene outside ``affected[c]`` (the targets, cooperative targets,
the systematic program when on, and their descendants) has exactly the same latent value in
every cell, hence the same count distribution, under ``c`` as in control: its ``delta`` is
only the normalisation's share, ``|delta| <= E|log total_c - log total_ctrl|``
(``abs_log_total_shift[c]``: the slope of ``log1p(1e4 * n / total)`` in ``log total`` is in
[-1, 0]). On the Norman-sized screen the median is 4e-4 (max 0.06); a perturbation that moves
a large share of the counts (on small screens, up to 20-30 %) moves every gene that much.

*Additivity.* Without cooperative targets and systematic shift, a double whose genes reach no
common gene (``additive`` in the facts; always so across modules when
``cross_module_fraction = 0``) changes the latent values by exactly the sum of the singles'
changes, cell by cell. Only normalisation breaks additivity in ``x``, because both genes move
the cell's total: on genes neither reaches, the interaction is of second order (about the
product of the two relative changes of the total); on genes one of them reaches, it is at
most the other's total shift. Bound: ``abs_log_total_shift[A] + abs_log_total_shift[B]``.
Measured: at most 0.04 on the default screen (seeds 0-2; totals move by a median 5 %), and
on the Norman-sized screen at most 0.04 and indistinguishable from the Monte-Carlo error
(mean squared z 1.2), against a median 0.7 (default) / 0.16 (Norman-sized) on cooperative
targets, correlated with the planted synergy at 0.97 / 0.84. Doubles whose genes reach a common gene interact through ``f``'s
saturation and the cut edges: natural genetic interactions (``n_shared_descendants``). A
systematic shift makes every double sub-additive by the shift's own effect (counted once in
``delta_AB``, twice in ``delta_A + delta_B``).

Cells and truth are made in blocks (planted's budget, about 2M cells x genes per dense
array), each from its own seeded stream, and the .h5ad is streamed to disk block by block:
memory is bounded by one block and the [C, G] truth, whatever the number of cells.
"""

from __future__ import annotations

import io
import logging
import os
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from evoformer.data.planted import (
    PLANTED_DEFAULTS,
    TARGET_SUM,
    _log1p_norm,
    _Model,
    _nonlinearity,
    resolve_planted_params,
)
from evoformer.errors import InputError
from evoformer.io import atomic_path
from evoformer.perturb.conditions import CONTROL, SEP, make_condition
from evoformer.perturb.layouts import LAYOUT_DEFAULTS, LAYOUTS, TYPES

log = logging.getLogger(__name__)

PERTURBATIONS = TYPES  # knockdown, knockout, activation: the types a dataset declares
PERTURB_GENES = ("with_children", "regulators")
KNOCKOUT_SHIFT = 10.0  # a knocked-out gene's log-rate drop: exp(-10) of its rate is left
#: scPerturb's ``obs.perturbation_type`` of each perturbation.
SCPERTURB_TYPES = {"knockdown": "CRISPRi", "knockout": "CRISPR-cas9", "activation": "CRISPRa"}
# scPerturb's label of control cells and separator of a double's genes: what its loader reads
SCPERTURB_CONTROL = LAYOUT_DEFAULTS["scperturb"]["control"][0]
SCPERTURB_SEP = LAYOUT_DEFAULTS["scperturb"]["separator"]
CELL_TYPE_PREFIX = "type"  # cell-type labels type0, type1, ... (no "_": GEARS condition_name)

# The planted model's parameters a screen takes (its own cell count and no variance shares).
_MODEL_KEYS = tuple(k for k in PLANTED_DEFAULTS if k not in ("n_cells", "r2_cells", "r2_draws"))

# Screen parameters and defaults: a small screen (~200 genes, ~66 conditions, ~7.6k cells).
SCREEN_DEFAULTS: dict[str, Any] = {
    **{k: PLANTED_DEFAULTS[k] for k in _MODEL_KEYS},
    "n_genes": 200,
    "n_types": 1,
    "n_regulators": 40,
    "regulated_fraction": 0.6,
    "n_modules": 4,
    "cross_module_fraction": 0.05,
    "perturbation": "knockdown",
    "strength": 2.0,
    "efficiency_mean": 0.8,
    "efficiency_concentration": 10.0,
    "escape_fraction": 0.1,
    "perturb_genes": "with_children",
    "single_fraction": 0.9,
    "n_doubles_within": 15,
    "n_doubles_across": 15,
    "cooperative_fraction": 0.3,
    "n_cooperative_targets": 5,
    "synergy_strength": 1.5,
    "systematic_shift": 0.0,
    "systematic_fraction": 0.05,
    "n_control": 1000,
    "cells_per_condition": 100,
    "truth_cells": 4000,
}

# Independent random streams [seed, stream(, block(, 1 + condition))]; planted uses 0-3.
_STREAM_DESIGN, _STREAM_ORDER, _STREAM_CELLS, _STREAM_TRUTH = 10, 11, 12, 13

_SCREEN_INTS = {  # key: minimum
    "n_modules": 1,
    "n_doubles_within": 0,
    "n_doubles_across": 0,
    "n_cooperative_targets": 1,
    "n_control": 1,
    "cells_per_condition": 1,
    "truth_cells": 2,
}
_SCREEN_FLOATS = {  # key: (low, high, low inclusive, high inclusive)
    "cross_module_fraction": (0.0, 1.0, True, True),
    "strength": (0.0, np.inf, False, False),
    "efficiency_mean": (0.0, 1.0, False, True),
    "efficiency_concentration": (0.0, np.inf, False, False),
    "escape_fraction": (0.0, 1.0, True, False),
    "single_fraction": (0.0, 1.0, False, True),
    "cooperative_fraction": (0.0, 1.0, True, True),
    "synergy_strength": (0.0, np.inf, True, False),
    "systematic_shift": (0.0, np.inf, True, False),
    "systematic_fraction": (0.0, 1.0, True, True),
}
_CHOICES = {"perturbation": PERTURBATIONS, "perturb_genes": PERTURB_GENES}


def _interval(low: float, high: float, low_in: bool, high_in: bool) -> str:
    if high == np.inf:
        return f"a number {'>=' if low_in else '>'} {low:g}"
    return f"a number in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def resolve_screen_params(params: Mapping[str, Any], where: str = "screen") -> dict[str, Any]:
    """``SCREEN_DEFAULTS`` updated with ``params``, validated and coerced.

    The network and count-model keys are checked as :func:`resolve_planted_params` does.
    Raises InputError naming ``<where>.<key>`` for an unknown key or a bad value.
    """
    for key in params:
        if key not in SCREEN_DEFAULTS:
            raise InputError(
                f"{where}.{key}: unknown parameter; expected one of {', '.join(SCREEN_DEFAULTS)}"
            )
    out = {**SCREEN_DEFAULTS, **params}
    model = resolve_planted_params({k: out[k] for k in _MODEL_KEYS}, where=where)
    out.update({k: model[k] for k in _MODEL_KEYS})
    for key, minimum in _SCREEN_INTS.items():
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InputError(f"{where}.{key}={value!r}: expected an integer")
        if value < minimum:
            raise InputError(f"{where}.{key}={value!r}: expected an integer >= {minimum}")
        out[key] = int(value)
    for key, (low, high, low_in, high_in) in _SCREEN_FLOATS.items():
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise InputError(f"{where}.{key}={value!r}: expected a number")
        value = float(value)
        ok = (value >= low if low_in else value > low) and (
            value <= high if high_in else value < high
        )
        if not ok:
            raise InputError(f"{where}.{key}={value!r}: expected {_interval(*_SCREEN_FLOATS[key])}")
        out[key] = value
    for key, choices in _CHOICES.items():
        if out[key] not in choices:
            raise InputError(f"{where}.{key}={out[key]!r}: expected one of {', '.join(choices)}")
    n_genes = out["n_genes"]
    if out["n_modules"] > n_genes:
        raise InputError(
            f"{where}.n_modules={out['n_modules']}: expected at most n_genes ({n_genes})"
        )
    if out["n_cooperative_targets"] > n_genes - 2:
        raise InputError(
            f"{where}.n_cooperative_targets={out['n_cooperative_targets']}: expected at most "
            f"n_genes - 2 ({n_genes - 2})"
        )
    return out


class _ScreenModel(_Model):
    """Planted's model with a modular DAG (module docstring); ``module`` [G] int."""

    def _draw_dag(self, rng: np.random.Generator) -> tuple[np.ndarray, list[int], list[int]]:
        p = self.p
        g_n, edges = p["n_genes"], p["edges_per_gene"]
        order = rng.permutation(g_n)
        self.module = rng.permutation(np.arange(g_n) % p["n_modules"])
        module_at = self.module[order]  # [G] module of each position of the order
        n_reg = p["n_regulators"] if p["n_regulators"] is not None else g_n
        sources, targets = [], []
        for k in range(1, g_n):
            regulated = rng.random() < p["regulated_fraction"]
            if not regulated or edges == 0:
                continue
            earlier = module_at[: min(k, n_reg)]
            same = np.flatnonzero(earlier == module_at[k])
            other = np.flatnonzero(earlier != module_at[k])
            n_cross = int(rng.binomial(edges, p["cross_module_fraction"]))
            chosen = np.concatenate(
                [
                    rng.choice(same, size=min(edges - n_cross, len(same)), replace=False),
                    rng.choice(other, size=min(n_cross, len(other)), replace=False),
                ]
            ).astype(np.int64)
            sources.extend(order[np.sort(chosen)])
            targets.extend([order[k]] * len(chosen))
        return order, sources, targets

    def subset_plan(self, genes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, sp.csr_matrix]]:
        """For sorted ``genes`` [k] closed under descendants: per DAG level, (positions in
        ``genes`` of its genes there, their parents [q], the [q, level genes] weights)."""
        plan = []
        depth = self.depth[genes]
        for d in range(1, int(depth.max(initial=0)) + 1):
            at = np.flatnonzero(depth == d)
            if at.size:
                block = self.w[:, genes[at]]
                parents = np.unique(block.indices)
                plan.append((at, parents, block[parents].tocsr()))
        return plan

    def latent_subset(
        self,
        latent0: np.ndarray,
        types: np.ndarray,
        eps: np.ndarray,
        genes: np.ndarray,
        plan: list[tuple[np.ndarray, np.ndarray, sp.csr_matrix]],
        offset: np.ndarray | None = None,
        clamp: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """``latent(types, eps, offset=..., clamp=...)[:, genes]`` [n, k] when the intervention
        acts only on ``genes`` (sorted, closed under descendants; ``plan`` its
        :meth:`subset_plan`): the other genes keep ``latent0`` [n, G], the control latent.
        ``offset`` [n, k] and the clamp's columns are in ``genes`` coordinates."""
        where = np.full(latent0.shape[1], -1, dtype=np.int64)
        where[genes] = np.arange(len(genes))
        sub = self.baseline[np.ix_(types, genes)] + eps[:, genes]
        if offset is not None:
            sub += offset
        if clamp is not None:
            sub[clamp[0], clamp[1]] = clamp[2]
        for at, parents, block in plan:
            values = latent0[:, parents]
            inside = where[parents] >= 0
            values[:, inside] = sub[:, where[parents[inside]]]
            z = (values - self.mean[parents]) / self.sd[parents]
            sub[:, at] += (block.T @ _nonlinearity(self.p["nonlinearity"], z).T).T
            if clamp is not None:
                sub[clamp[0], clamp[1]] = clamp[2]
        return sub


@dataclass(frozen=True)
class _Condition:
    name: str  # canonical (evoformer.perturb.conditions)
    targets: tuple[int, ...]  # the perturbed genes (1 or 2)
    relation: str  # single | within | across
    coop_genes: np.ndarray  # [k] cooperative targets (k = 0: none)
    coop_weights: np.ndarray  # [k] planted synergy on their latent


def _closure(children: sp.csr_matrix, start: np.ndarray) -> np.ndarray:
    """[G] bool: ``start`` and every gene downstream of it."""
    seen = np.zeros(children.shape[0], dtype=bool)
    seen[start] = True
    frontier = np.unique(np.asarray(start, dtype=np.int64))
    while frontier.size:
        nxt = np.unique(children[frontier].indices)
        frontier = nxt[~seen[nxt]]
        seen[frontier] = True
    return seen


_ENUMERATE_PAIRS = 2_000_000  # more pairs of singles than this: drawn by rejection


def _draw_pairs(
    rng: np.random.Generator,
    singles: np.ndarray,
    module: np.ndarray,
    p: Mapping[str, Any],
    where: str,
) -> list[tuple[int, int, str]]:
    """``n_doubles_within`` / ``n_doubles_across`` distinct pairs (a < b) of ``singles`` [S]
    in the same / different modules (``module`` [G]), as (a, b, relation)."""
    n_s = len(singles)
    sizes = np.bincount(module[singles])
    available = {"within": int((sizes * (sizes - 1) // 2).sum())}
    available["across"] = n_s * (n_s - 1) // 2 - available["within"]
    wanted = {"within": p["n_doubles_within"], "across": p["n_doubles_across"]}
    for relation, n in wanted.items():
        if n > available[relation]:
            raise InputError(
                f"{where}.n_doubles_{relation}={n}: only {available[relation]} "
                f"{relation}-module pairs of the {n_s} single-perturbed genes"
            )
    pairs: list[tuple[int, int, str]] = []
    if sum(wanted.values()) == 0:
        return pairs
    if n_s * (n_s - 1) // 2 <= _ENUMERATE_PAIRS:
        a, b = np.triu_indices(n_s, k=1)
        a, b = singles[a], singles[b]
        same = module[a] == module[b]
        for relation, mask in (("within", same), ("across", ~same)):
            pool = np.flatnonzero(mask)
            chosen = np.sort(rng.choice(pool, size=wanted[relation], replace=False))
            pairs.extend((int(a[i]), int(b[i]), relation) for i in chosen)
        return pairs
    for relation, n in wanted.items():  # rejection: n is far below the pairs available
        found: set[tuple[int, int]] = set()
        while len(found) < n:
            i, j = rng.integers(0, n_s, (2, 4 * n))
            for x, y in zip(np.minimum(i, j), np.maximum(i, j), strict=True):
                a, b = int(singles[x]), int(singles[y])
                if x != y and (module[a] == module[b]) == (relation == "within"):
                    found.add((a, b))
                    if len(found) == n:
                        break
        pairs.extend((a, b, relation) for a, b in sorted(found))
    return pairs


def _gene_symbols(n: int) -> list[str]:
    """``G000``, ``G001``, ...: valid in every layout (no ``+``, ``_`` or white space)."""
    return [f"G{g:0{max(3, len(str(n - 1)))}d}" for g in range(n)]


class Screen:
    """A drawn screen: the network, modules, conditions and planted effects (no cells yet).

    Attributes: ``params`` (resolved), ``genes`` [G] symbols, ``gene_ids`` [G] Ensembl-like
    ids, ``conditions`` [C] canonical perturbed conditions (singles, then doubles, each sorted),
    ``module`` [G], ``systematic`` [G] (the latent offset of every perturbed cell).
    """

    def __init__(self, params: Mapping[str, Any], where: str = "screen") -> None:
        p = resolve_screen_params(params, where)
        self.params = p
        self.model = _ScreenModel(p)
        g_n = p["n_genes"]
        self.genes = _gene_symbols(g_n)
        self.gene_ids = [f"ENSG{g:011d}" for g in range(g_n)]
        self.module = self.model.module
        self._children = self.model.w.tocsr()
        self._design(where)
        self.conditions = [c.name for c in self._conds]
        self._index = {c: i for i, c in enumerate(self.conditions)}
        targets = np.full((len(self._conds) + 1, 2), -1, dtype=np.int64)  # row 0: control
        for i, c in enumerate(self._conds):
            targets[i + 1, : len(c.targets)] = c.targets
        self._targets = targets
        self._coop = [i + 1 for i, c in enumerate(self._conds) if len(c.coop_genes)]
        if p["perturbation"] == "knockout":
            self._shift = -KNOCKOUT_SHIFT
        else:
            sign = 1.0 if p["perturbation"] == "activation" else -1.0
            self._shift = sign * p["strength"]

    # ------------------------------------------------------------------ design
    def _design(self, where: str) -> None:
        p, g_n = self.params, self.params["n_genes"]
        rng = np.random.default_rng([p["seed"], _STREAM_DESIGN])
        if p["perturb_genes"] == "with_children":
            candidates = np.flatnonzero(np.diff(self._children.indptr) > 0)
        else:
            n_reg = p["n_regulators"] if p["n_regulators"] is not None else g_n
            candidates = np.sort(self.model.order[:n_reg])
        if len(candidates) == 0:
            raise InputError(
                f"{where}.perturb_genes={p['perturb_genes']!r}: no gene has children (the "
                "network has no edges)"
            )
        n_single = max(1, int(round(p["single_fraction"] * len(candidates))))
        singles = np.sort(rng.choice(candidates, size=n_single, replace=False))
        pairs = _draw_pairs(rng, singles, self.module, p, where)
        # the systematic program (drawn whatever its size, so the shift changes nothing else)
        n_prog = int(round(p["systematic_fraction"] * g_n))
        program = rng.choice(g_n, size=n_prog, replace=False)
        unit = rng.choice([-1.0, 1.0], size=n_prog) * rng.uniform(0.5, 1.5, n_prog)
        self.systematic = np.zeros(g_n)
        self.systematic[program] = p["systematic_shift"] * unit
        self.program = np.sort(program)
        # cooperative doubles, their targets and synergies
        n_coop = int(round(p["cooperative_fraction"] * len(pairs)))
        coop = set(rng.choice(len(pairs), size=n_coop, replace=False).tolist())
        empty_i, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0)
        names = self.genes
        conds = [
            _Condition(make_condition([names[g]]), (int(g),), "single", empty_i, empty_f)
            for g in singles
        ]
        doubles = []
        for i, (ga, gb, relation) in enumerate(pairs):
            genes, weights = empty_i, empty_f
            if i in coop:
                pool = np.setdiff1d(np.arange(g_n), [ga, gb])
                genes = np.sort(rng.choice(pool, size=p["n_cooperative_targets"], replace=False))
                k = len(genes)
                weights = (
                    rng.choice([-1.0, 1.0], size=k)
                    * p["synergy_strength"]
                    * rng.uniform(0.5, 1.5, k)
                )
            name = make_condition([names[ga], names[gb]])
            doubles.append(_Condition(name, (ga, gb), relation, genes, weights))
        self._conds = sorted(conds, key=lambda c: c.name) + sorted(doubles, key=lambda c: c.name)

    # ------------------------------------------------------------------ interventions
    def _guides(
        self, rng: np.random.Generator, shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per guide and cell: works (bool, not escaped) and efficiency e, both ``shape``."""
        p = self.params
        works = rng.random(shape) >= p["escape_fraction"]
        m, k = p["efficiency_mean"], p["efficiency_concentration"]
        if p["perturbation"] == "knockout" or m == 1.0:
            eff = np.ones(shape)
        else:
            eff = rng.beta(m * k, (1 - m) * k, shape)
        return works, eff

    def _intervention(
        self,
        cond: np.ndarray,
        types: np.ndarray,
        eps: np.ndarray,
        works: np.ndarray,
        eff: np.ndarray,
        genes: np.ndarray | None = None,
    ) -> tuple[np.ndarray | None, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
        """The latent ``offset`` and ``clamp`` (model.latent's) of cells in conditions
        ``cond`` [n] (0: control, i: ``conditions[i - 1]``) with guide outcomes
        ``works``/``eff`` [n, 2] and noise ``eps`` [n, G].

        ``genes`` [k] (sorted, holding every gene the conditions touch): the offset is
        [n, k] and the clamp's columns are positions in ``genes``; None: all G genes.
        """
        where = None if genes is None else np.full(eps.shape[1], -1, dtype=np.int64)
        if where is not None:
            where[genes] = np.arange(len(genes))
        width = eps.shape[1] if genes is None else len(genes)
        perturbed = cond > 0
        offset = None
        if self.params["systematic_shift"] > 0 and perturbed.any():
            offset = np.zeros((len(cond), width))
            offset[perturbed] = self.systematic if genes is None else self.systematic[genes]
        both = works[:, 0] & works[:, 1]
        for ci in np.intersect1d(self._coop, cond):
            rows = np.flatnonzero((cond == ci) & both)
            if rows.size:
                if offset is None:
                    offset = np.zeros((len(cond), width))
                c = self._conds[ci - 1]
                cols = c.coop_genes if where is None else where[c.coop_genes]
                offset[np.ix_(rows, cols)] += (eff[rows, 0] * eff[rows, 1])[
                    :, None
                ] * c.coop_weights
        rows_l, cols_l, shift_l = [], [], []
        for j in range(2):
            target = self._targets[cond, j]
            sel = (target >= 0) & works[:, j]
            rows_l.append(np.flatnonzero(sel))
            cols_l.append(target[sel])
            shift_l.append(self._shift * eff[sel, j])
        rows, cols = np.concatenate(rows_l), np.concatenate(cols_l)
        if rows.size == 0:
            return offset, None
        values = self.model.baseline[types[rows], cols] + eps[rows, cols] + np.concatenate(shift_l)
        return offset, (rows, cols if where is None else where[cols], values)

    # ------------------------------------------------------------------ cells
    def cell_conditions(self) -> np.ndarray:
        """[N] each cell's condition: 0 control, i ``conditions[i - 1]`` (seeded order)."""
        p = self.params
        sizes = [p["n_control"]] + [p["cells_per_condition"]] * len(self._conds)
        labels = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        return np.random.default_rng([p["seed"], _STREAM_ORDER]).permutation(labels)

    def cell_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Blocks of cells in order: (condition [n] as cell_conditions, type [n], counts [n, G]
        float64), each block from its own stream."""
        p, model = self.params, self.model
        cond_all = self.cell_conditions()
        step = model.block_cells
        for b, start in enumerate(range(0, len(cond_all), step)):
            cond = cond_all[start : start + step]
            n = len(cond)
            rng = np.random.default_rng([p["seed"], _STREAM_CELLS, b])
            types = rng.integers(0, p["n_types"], n)
            library = rng.lognormal(np.log(p["mean_counts"]), p["library_sd"], n)
            eps = rng.normal(0.0, p["noise_sd"], (n, p["n_genes"]))
            works, eff = self._guides(rng, (n, 2))
            offset, clamp = self._intervention(cond, types, eps, works, eff)
            latent = model.latent(types, eps, offset=offset, clamp=clamp)
            counts = model.draw_counts(rng, library[:, None] * np.exp(latent) / model.z)
            yield cond, types, counts

    def counts(self) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
        """All cells in memory (small screens): condition [N] canonical str, type [N] int,
        counts [N, G] float32 CSR. :func:`write_screen` streams the same cells instead."""
        conds, types, blocks = [], [], []
        for cond, t, c in self.cell_blocks():
            conds.append(cond)
            types.append(t)
            blocks.append(sp.csr_matrix(c.astype(np.float32)))
        labels = np.array([CONTROL, *self.conditions], dtype=object)[np.concatenate(conds)]
        return labels, np.concatenate(types), sp.vstack(blocks, format="csr")

    # ------------------------------------------------------------------ truth
    def truth(self) -> dict[str, np.ndarray]:
        """The noise-free effects (module docstring), estimated on ``truth_cells`` cells.

        Returns float32 arrays ``delta``, ``delta_se``, ``interaction``, ``interaction_se``
        [C, G] (NaN rows for singles), ``control_mean`` [G] (E[x | control]),
        ``abs_log_total_shift`` [C] (E|log total_c - log total_ctrl|).
        """
        c_n, g_n, m = len(self._conds), self.params["n_genes"], self.params["truth_cells"]
        plans = []
        for affected in self.affected():
            genes = np.flatnonzero(affected)
            plans.append((genes, self.model.subset_plan(genes)))
        d_sum, d_sq = np.zeros((c_n, g_n)), np.zeros((c_n, g_n))
        doubles = [i for i, c in enumerate(self._conds) if len(c.targets) == 2]
        row = {i: r for r, i in enumerate(doubles)}  # condition -> row of the double sums
        i_sum, i_sq = np.zeros((len(doubles), g_n)), np.zeros((len(doubles), g_n))
        ctrl_sum, total_shift = np.zeros(g_n), np.zeros(c_n)
        step = self.model.block_cells
        for b, start in enumerate(range(0, m, step)):
            block = _TruthBlock(self, b, min(step, m - start), plans)
            ctrl_sum += block.x0.sum(axis=0)
            for i, c in enumerate(self._conds):
                genes = plans[i][0]
                x, total = block.dense(i + 1)
                d_nz = block.sparse_x(total) - block.x0_nz
                d = x - block.x0[:, genes]
                _add_sums(d_sum[i], d_sq[i], block.nz_cols, d_nz, genes, d)
                total_shift[i] += np.abs(np.log(total) - np.log(block.total0)).sum()
                if len(c.targets) == 2:
                    for g in c.targets:  # minus each single's x - x0, on the same cells
                        k = self._index[self.genes[g]]
                        x_k, total_k = block.dense(k + 1)
                        d_nz -= block.sparse_x(total_k) - block.x0_nz
                        # the single's x on the double's genes: its own where it acts
                        full = _log1p_norm(block.counts0[:, genes], total_k[:, None])
                        full[:, np.searchsorted(genes, plans[k][0])] = x_k
                        d -= full - block.x0[:, genes]
                    _add_sums(i_sum[row[i]], i_sq[row[i]], block.nz_cols, d_nz, genes, d)
        delta, delta_se = _mean_se(d_sum, d_sq, m)
        interaction = np.full((c_n, g_n), np.nan)
        interaction_se = np.full((c_n, g_n), np.nan)
        interaction[doubles], interaction_se[doubles] = _mean_se(i_sum, i_sq, m)
        return {
            "delta": delta.astype(np.float32),
            "delta_se": delta_se.astype(np.float32),
            "interaction": interaction.astype(np.float32),
            "interaction_se": interaction_se.astype(np.float32),
            "control_mean": (ctrl_sum / m).astype(np.float32),
            "abs_log_total_shift": (total_shift / m).astype(np.float32),
        }

    # ------------------------------------------------------------------ tables
    def affected(self) -> np.ndarray:
        """[C, G] bool: genes whose latent value a condition changes in some cell (targets,
        cooperative targets, the systematic program when on, and all their descendants)."""
        out = np.zeros((len(self._conds), self.params["n_genes"]), dtype=bool)
        program = self.program if self.params["systematic_shift"] > 0 else np.zeros(0, int)
        for i, c in enumerate(self._conds):
            start = np.concatenate([np.asarray(c.targets), c.coop_genes, program])
            out[i] = _closure(self._children, start.astype(np.int64))
        return out

    def synergy(self) -> np.ndarray:
        """[C, G] the planted synergy on each double's cooperative targets (0 elsewhere)."""
        out = np.zeros((len(self._conds), self.params["n_genes"]))
        for i, c in enumerate(self._conds):
            out[i, c.coop_genes] = c.coop_weights
        return out

    def facts(self, truth: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
        """One row per perturbed condition [C]:

        * condition, n_genes (1/2), perturbation (knockdown | knockout | activation),
          module_relation (single | within | across), modules (the genes' modules, ``+``-joined);
        * cooperative, cooperative_targets (``,``-joined symbols), n_cells;
        * n_descendants: genes downstream of the perturbed genes (targets excluded);
        * n_shared_descendants (doubles; 0 for singles): genes both perturbations reach, each
          target counted as reached by its own perturbation (so a target downstream of the
          other gene counts);
        * additive: a double whose latent effects add exactly, cell by cell (no shared
          descendants, no cooperative targets, no systematic shift): its interaction in ``x``
          is only the normalisation's share (module docstring); False for singles;
        * n_affected: the row sums of :meth:`affected`;
        * with ``truth``: abs_log_total_shift (E|log total_c - log total_ctrl|).
        """
        rows = []
        affected = self.affected()
        systematic = self.params["systematic_shift"] > 0
        for i, c in enumerate(self._conds):
            reach = [_closure(self._children, np.array([g])) for g in c.targets]
            union = np.logical_or.reduce(reach)
            union[list(c.targets)] = False
            shared = int((reach[0] & reach[1]).sum()) if len(reach) == 2 else 0
            cooperative = bool(len(c.coop_genes))
            rows.append(
                {
                    "condition": c.name,
                    "n_genes": len(c.targets),
                    "perturbation": self.params["perturbation"],
                    "module_relation": c.relation,
                    "modules": SEP.join(str(self.module[g]) for g in c.targets),
                    "cooperative": cooperative,
                    "cooperative_targets": ",".join(self.genes[g] for g in c.coop_genes),
                    "n_cells": self.params["cells_per_condition"],
                    "n_descendants": int(union.sum()),
                    "n_shared_descendants": shared,
                    "additive": len(reach) == 2 and not (shared or cooperative or systematic),
                    "n_affected": int(affected[i].sum()),
                }
            )
        out = pd.DataFrame(rows)
        if truth is not None:
            out["abs_log_total_shift"] = truth["abs_log_total_shift"]
        return out

    def network(self) -> pd.DataFrame:
        """One row per edge: source, target (symbols), weight; sorted by target then source
        (planted's ``<name>_network.tsv``)."""
        net = pd.DataFrame(
            {
                "source": [self.genes[i] for i in self.model.sources],
                "target": [self.genes[i] for i in self.model.targets],
                "weight": self.model.weights,
            }
        )
        return net.sort_values(["target", "source"], kind="stable").reset_index(drop=True)


class _TruthBlock:
    """One block of the truth's cells: the randomness every condition shares (type, library,
    eps, gamma draws, guide outcomes per perturbed gene) and the control's counts and x.

    A condition's latent values, rates and counts are recomputed only on its affected genes
    (:meth:`dense`); every other gene keeps the control's counts, so its x changes only through
    the cell's total and is computed on the control's non-zero counts (:meth:`sparse_x`; x = 0
    where the count is 0).
    """

    def __init__(self, screen: Screen, b: int, n: int, plans: list) -> None:
        p, model = screen.params, screen.model
        self.screen, self.b, self.plans = screen, b, plans
        shape = 1.0 / p["dispersion"]
        pert = np.unique(screen._targets[screen._targets >= 0])
        self.column = np.zeros(p["n_genes"], dtype=np.int64)  # perturbed gene -> guide column
        self.column[pert] = np.arange(len(pert))
        rng = np.random.default_rng([p["seed"], _STREAM_TRUTH, b])
        self.types = rng.integers(0, p["n_types"], n)
        library = rng.lognormal(np.log(p["mean_counts"]), p["library_sd"], n)
        self.eps = rng.normal(0.0, p["noise_sd"], (n, p["n_genes"]))
        gamma = rng.standard_gamma(shape, (n, p["n_genes"]))
        self.scale = gamma * (library[:, None] / (model.z * shape))  # rate = scale * exp(latent)
        self.works, self.eff = screen._guides(rng, (n, len(pert)))
        self.latent0 = model.latent(self.types, self.eps)
        self.rate0 = self.scale * np.exp(self.latent0)
        self.counts0 = rng.poisson(self.rate0)  # [n, G]
        self.sum0 = self.counts0.sum(axis=1)  # [n] the control's totals
        self.total0 = np.maximum(self.sum0, 1).astype(np.float64)  # floored at 1 (x = 0 if 0)
        self.x0 = _log1p_norm(self.counts0, self.total0[:, None])  # [n, G]
        self.nz_rows, self.nz_cols = np.nonzero(self.counts0)
        self.nz_scaled = TARGET_SUM * self.counts0[self.nz_rows, self.nz_cols]
        self.x0_nz = self.sparse_x(self.total0)

    def sparse_x(self, total: np.ndarray) -> np.ndarray:
        """[nnz] x of the control's non-zero counts over the cells' ``total`` [n] (>= 1)."""
        return np.log1p(self.nz_scaled * (1.0 / total)[self.nz_rows])

    def dense(self, ci: int) -> tuple[np.ndarray, np.ndarray]:
        """Condition ``ci`` (1-based): x [n, k] on its affected genes, its totals [n] (>= 1)."""
        screen, n = self.screen, len(self.types)
        genes, plan = self.plans[ci - 1]
        cols = self.column[np.maximum(screen._targets[ci], 0)]
        offset, clamp = screen._intervention(
            np.full(n, ci), self.types, self.eps, self.works[:, cols], self.eff[:, cols], genes
        )
        latent = screen.model.latent_subset(
            self.latent0, self.types, self.eps, genes, plan, offset, clamp
        )
        rng = np.random.default_rng([screen.params["seed"], _STREAM_TRUTH, self.b, ci])
        c0 = self.counts0[:, genes]
        counts = _coupled_poisson(
            rng, c0, self.rate0[:, genes], self.scale[:, genes] * np.exp(latent)
        )
        total = np.maximum(self.sum0 + (counts - c0).sum(axis=1), 1).astype(np.float64)
        return _log1p_norm(counts, total[:, None]), total


def _coupled_poisson(
    rng: np.random.Generator, counts0: np.ndarray, rate0: np.ndarray, rate: np.ndarray
) -> np.ndarray:
    """Poisson(rate) counts [n, G] coupled to ``counts0`` ~ Poisson(rate0): the same where the
    rate is unchanged, plus Poisson(rate - rate0) where it rose, a binomial thinning where it
    fell (exact Poisson(rate) marginals)."""
    out = counts0.copy()
    up = rate > rate0
    out[up] += rng.poisson(rate[up] - rate0[up])
    down = rate < rate0
    out[down] = rng.binomial(counts0[down], rate[down] / rate0[down])
    return out


def _add_sums(
    total: np.ndarray,
    squares: np.ndarray,
    nz_cols: np.ndarray,
    sparse: np.ndarray,
    genes: np.ndarray,
    dense: np.ndarray,
) -> None:
    """Add the per-gene sums and sums of squares [G] of per-cell values given as ``sparse``
    [nnz] values in columns ``nz_cols`` (zero elsewhere), replaced on ``genes`` [k] by
    ``dense`` [n, k]."""
    g_n = len(total)
    s = np.bincount(nz_cols, sparse, minlength=g_n)
    s2 = np.bincount(nz_cols, sparse * sparse, minlength=g_n)
    s[genes] = dense.sum(axis=0)
    s2[genes] = (dense * dense).sum(axis=0)
    total += s
    squares += s2


def _mean_se(total: np.ndarray, squares: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    mean = total / m
    var = np.maximum(squares / m - mean**2, 0.0) * (m / (m - 1))
    return mean, np.sqrt(var / m)


# ---------------------------------------------------------------------- files
def screen_paths(out_h5ad: str | os.PathLike) -> tuple[Path, Path, Path, Path]:
    """The four files of a screen: ``<stem>.h5ad``, ``<stem>_truth.npz``,
    ``<stem>_conditions.tsv``, ``<stem>_network.tsv`` (same directory)."""
    out = Path(out_h5ad)
    stem = out.name[: -len(".h5ad")] if out.name.endswith(".h5ad") else out.stem
    return (
        out,
        out.with_name(f"{stem}_truth.npz"),
        out.with_name(f"{stem}_conditions.tsv"),
        out.with_name(f"{stem}_network.tsv"),
    )


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez_compressed with fixed zip timestamps (same arrays -> same bytes), atomic."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


class _CsrWriter:
    """An anndata CSR matrix [N, G] appended block by block to an h5py group."""

    def __init__(self, parent: h5py.Group, key: str, n_cols: int) -> None:
        self.group = parent.create_group(key)
        self.n_cols = n_cols
        chunk = (1 << 16,)
        self.data = self.group.create_dataset(
            "data", (0,), maxshape=(None,), dtype="f4", chunks=chunk
        )
        self.indices = self.group.create_dataset(
            "indices", (0,), maxshape=(None,), dtype="i4", chunks=chunk
        )
        self.indptr = [np.zeros(1, dtype=np.int64)]
        self.nnz = 0

    def append(self, block: sp.csr_matrix) -> None:
        end = self.nnz + block.nnz
        self.data.resize((end,))
        self.indices.resize((end,))
        self.data[self.nnz :] = block.data.astype(np.float32)
        self.indices[self.nnz :] = block.indices.astype(np.int32)
        self.indptr.append(self.nnz + block.indptr[1:].astype(np.int64))
        self.nnz = end

    def close(self) -> None:
        indptr = np.concatenate(self.indptr)
        self.group.create_dataset(
            "indptr", data=indptr.astype(np.int32 if self.nnz < 2**31 else np.int64)
        )
        self.group.attrs["encoding-type"] = "csr_matrix"
        self.group.attrs["encoding-version"] = "0.1.0"
        self.group.attrs["shape"] = np.array([len(indptr) - 1, self.n_cols])


def _cell_tables(
    screen: Screen, cond: np.ndarray, types: np.ndarray, layout: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """obs [N] and var [G] of cells with conditions ``cond`` [N] and ``types`` [N] in ``layout``
    (:func:`write_screen`)."""
    n = len(cond)
    index = pd.Index([f"cell_{i:0{len(str(n - 1))}d}" for i in range(n)])
    type_names = [f"{CELL_TYPE_PREFIX}{t}" for t in range(screen.params["n_types"])]
    cell_type = pd.Categorical.from_codes(types, type_names)
    genes = [() if c == 0 else screen._conds[c - 1].targets for c in range(len(screen._conds) + 1)]
    symbols = [[screen.genes[g] for g in gs] for gs in genes]

    def labels(per_condition: list[str]) -> pd.Categorical:
        return pd.Categorical.from_codes(cond, per_condition).remove_unused_categories()

    if layout == "gears":
        conds = [CONTROL] + [
            f"{s[0]}{SEP}{CONTROL}" if len(s) == 1 else SEP.join(s) for s in symbols[1:]
        ]
        condition = labels(conds)
        dose = pd.Categorical(np.where(cond == 0, "1", "1+1"))
        name = pd.Categorical(
            [f"{t}_{c}_{d}" for t, c, d in zip(cell_type, condition, dose, strict=True)]
        )
        obs = pd.DataFrame(
            {
                "condition": condition,
                "cell_type": cell_type,
                "dose_val": dose,
                "control": (cond == 0).astype(np.int64),
                "condition_name": name,
            },
            index=index,
        )
        var = pd.DataFrame({"gene_name": screen.genes}, index=pd.Index(screen.gene_ids))
    else:
        perts = [SCPERTURB_CONTROL] + [SCPERTURB_SEP.join(s) for s in symbols[1:]]
        kind = SCPERTURB_TYPES[screen.params["perturbation"]]
        obs = pd.DataFrame(
            {
                "perturbation": labels(perts),
                "perturbation_type": pd.Categorical([kind] * n),
                "nperts": np.array([len(s) for s in symbols], dtype=np.int64)[cond],
                "celltype": cell_type,
            },
            index=index,
        )
        var = pd.DataFrame(index=pd.Index(screen.genes))
    return obs, var


def _write_h5ad(path: Path, screen: Screen, layout: str) -> int:
    """Stream the screen's cells into ``path`` (atomic). Returns the number of cells."""
    from anndata.io import write_elem

    g_n = screen.params["n_genes"]
    conds, types = [], []
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        x = _CsrWriter(f, "X", g_n)
        layers = f.create_group("layers")
        layers.attrs["encoding-type"] = "dict"
        layers.attrs["encoding-version"] = "0.1.0"
        raw = _CsrWriter(layers, "counts", g_n) if layout == "gears" else None
        for cond, t, counts in screen.cell_blocks():
            conds.append(cond)
            types.append(t.astype(np.int8 if screen.params["n_types"] < 128 else np.int64))
            block = sp.csr_matrix(counts.astype(np.float32))
            if raw is None:
                x.append(block)
            else:
                raw.append(block)
                total = counts.sum(axis=1, keepdims=True)
                x.append(sp.csr_matrix(_log1p_norm(counts, total).astype(np.float32)))
        x.close()
        if raw is not None:
            raw.close()
        obs, var = _cell_tables(screen, np.concatenate(conds), np.concatenate(types), layout)
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        params = {k: v for k, v in screen.params.items() if v is not None}
        write_elem(f, "uns", {"screen": {"params": params, "layout": layout}})
        for key in ("obsm", "varm", "obsp", "varp"):
            write_elem(f, key, {})
    return len(obs)


def write_screen(
    out_h5ad: str | os.PathLike, params: Mapping[str, Any], layout: str = "gears"
) -> None:
    """Generate a screen from config parameters ``datasets.<name>.screen`` and write its four
    files atomically (:func:`screen_paths`; the .h5ad last).

    ``<stem>.h5ad`` in ``layout`` (same cells, same order and ids in both):

    * ``gears``: obs ``condition`` (``A+ctrl`` / ``A+B`` / ``ctrl``), ``cell_type``
      (``type0`` ...), ``dose_val`` (``1+1`` / ``1``), ``control`` (1/0), ``condition_name``
      (``<cell_type>_<condition>_<dose_val>``); var index Ensembl-like ids (``ENSG...``),
      ``var.gene_name`` symbols; X log1p(1e4 * counts / total) float32 CSR,
      ``layers['counts']`` the raw counts (float32 CSR);
    * ``scperturb``: obs ``perturbation`` (``control`` / ``A`` / ``A_B``),
      ``perturbation_type`` (:data:`SCPERTURB_TYPES`), ``nperts`` (0/1/2), ``celltype``; var
      index the symbols; X the raw counts (float32 CSR).

    Both carry ``uns['screen']`` (parameters, layout). ``<stem>_truth.npz``: ``conditions``
    [C] canonical, ``genes`` [G] symbols, ``delta``, ``delta_se``, ``interaction``,
    ``interaction_se`` (NaN for singles), ``affected`` (bool), ``synergy`` (planted, 0 but on
    cooperative targets) [C, G]; ``control_mean``, ``systematic`` (the planted program offset),
    ``gene_module`` [G]; ``abs_log_total_shift`` [C]; ``truth_cells`` (module docstring).
    ``<stem>_conditions.tsv``: :meth:`Screen.facts`. ``<stem>_network.tsv``: source, target,
    weight (as planted).

    Raises InputError naming ``datasets.<name>.screen.<key>`` for a bad parameter, or a bad
    ``layout``.
    """
    out, truth_path, facts_path, network_path = screen_paths(out_h5ad)
    name = network_path.name[: -len("_network.tsv")]
    if layout not in LAYOUTS:
        raise InputError(f"{out}: layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    screen = Screen(params, where=f"datasets.{name}.screen")
    start = time.perf_counter()
    truth = screen.truth()
    truth_s = time.perf_counter() - start
    facts = screen.facts(truth)
    affected = screen.affected()
    _save_npz(
        truth_path,
        {
            "conditions": np.array(screen.conditions, dtype=str),
            "genes": np.array(screen.genes, dtype=str),
            **{k: truth[k] for k in ("delta", "delta_se", "interaction", "interaction_se")},
            "affected": affected,
            "synergy": screen.synergy().astype(np.float32),
            "control_mean": truth["control_mean"],
            "systematic": screen.systematic.astype(np.float32),
            "gene_module": screen.module.astype(np.int64),
            "abs_log_total_shift": truth["abs_log_total_shift"],
            "truth_cells": np.array(screen.params["truth_cells"], dtype=np.int64),
        },
    )
    with atomic_path(facts_path) as tmp:
        facts.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    with atomic_path(network_path) as tmp:
        screen.network().to_csv(tmp, sep="\t", index=False, float_format="%.10g")
    start = time.perf_counter()
    n_cells = _write_h5ad(out, screen, layout)
    cells_s = time.perf_counter() - start
    doubles = facts["n_genes"] == 2
    log.info(
        "wrote %s (%s layout): %d cells x %d genes, %d singles, %d doubles (%d cooperative), "
        "%s; truth on %d cells (%.1f s), median delta_se %.4f on affected genes; cells %.1f s",
        out,
        layout,
        n_cells,
        len(screen.genes),
        int((~doubles).sum()),
        int(doubles.sum()),
        int(facts["cooperative"].sum()),
        screen.params["perturbation"],
        screen.params["truth_cells"],
        truth_s,
        float(np.median(truth["delta_se"][affected])),
        cells_s,
    )
