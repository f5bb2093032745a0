"""Single-cell counts with a planted gene regulatory network (the right answer is known).

The generative model, for a cell ``c`` of type ``t`` and a gene ``g``:

* **Cell types** as in :func:`evoformer.data.datasets.make_synthetic`: log-normal gene base
  proportions (spread ``base_sd``); each type up/down-regulates its own random ``de_fraction``
  of the genes by log-normal fold changes. ``b[t, g]`` = log of type ``t``'s proportion.
* **Network**: a random DAG on the genes. Genes get a random topological order; each gene
  (but the first) gets parents with probability ``regulated_fraction``: ``edges_per_gene``
  distinct genes drawn uniformly from the genes before it that may regulate (all of them, or
  only the first ``n_regulators`` genes of the order). Each edge has a signed weight
  ``w = ±weight_scale * U(0.5, 1.5)`` (sign ±1 with probability 1/2).
* **Latent log-expression**, in topological order (genes of one DAG depth at a time)::

      l[c, g] = b[t, g] + sum_{p in parents(g)} w[p, g] * f((l[c, p] - m[p]) / s[p]) + eps[c, g]

  with ``eps ~ N(0, noise_sd^2)``, ``m``/``s`` the population mean/sd of ``l[:, p]`` over all
  cell types (fixed by a seeded calibration sample), and ``f`` the ``nonlinearity``:
  ``tanh(z)``, ``softplus(z) - log 2`` or ``z`` (``linear``); all are 0 at ``z = 0``.
* **Counts**: ``mu[c, g] = L[c] * exp(l[c, g]) / Z`` with log-normal library sizes ``L``
  (median ``mean_counts``, log-sd ``library_sd``) and ``Z`` = the population mean of
  ``sum_g exp(l[c, g])`` (so the mean total is about ``mean_counts``); counts ~ negative
  binomial(mean ``mu``, ``dispersion``) drawn as a gamma-Poisson mixture.

Cells are made in blocks (about 2M cells x genes each), each block from its own seeded
stream, so memory is bounded (the dense work arrays are one block; the result is the sparse
counts) and the same parameters give the same bytes.

**What the per-gene numbers mean** (the ``<name>_genes.tsv`` columns, ``info["genes"]``,
``uns["planted"]["genes"]``). All refer to ``x[c, g]`` = the log1p-normalised value the
pipeline sees, ``log1p(1e4 * counts[c, g] / total counts of cell c)``, and are estimated on a
fresh seeded sample of ``r2_cells`` cells of the same model; for each cell, ``r2_draws`` fresh
draws of part of gene g's randomness are made with everything else in the cell held fixed
(its type, library size, the other genes' latent values and counts), and the expected variance
of ``x_g`` over those draws is averaged over cells (unbiased per-cell variances):

* ``var_x``: the variance of ``x[:, g]`` over cells.
* ``r2_type = 1 - E[Var(x_g | type)] / var_x``: the R^2 of the per-type mean.
* ``mse_base`` / ``r2_base = 1 - mse_base / var_x``: redrawn is gene g's whole latent value
  from its type's distribution (its parents' values, its own ``eps``) and its counts. The share
  explained without the network: type, library depth and the other genes' counts (through the
  normalisation). Slightly above ``r2_type``.
* ``mse_inputs`` / ``r2_total = 1 - mse_inputs / var_x``: redrawn are only g's own ``eps`` and
  its counts; its parents' latent values are held. The R^2 of ``E[x_g | type, library,
  parents]``: the best predictor that knows the parents' latent values exactly.
* ``r2_network = r2_total - r2_base``: the share of the variance explained by the parents
  beyond what is explained without them. Exactly 0 in expectation for a gene without parents
  (Monte-Carlo error about +-0.02 with the defaults).
* ``mse_floor`` / ``r2_ceiling = 1 - mse_floor / var_x``: redrawn is only the gamma-Poisson
  draw of g's counts (latent held). That noise is independent of everything else, so no
  predictor of a masked ``x_g`` from the cell's other values can have a mean squared error
  below ``mse_floor``: ``r2_ceiling`` bounds any model's masked-value R^2 for the gene.

A predictor from the *observed* other genes sees the parents only through their noisy counts,
so it usually stays below ``r2_total``; for a gene with children it can exceed ``r2_total``
(the children's counts carry information about g's own ``eps``), never ``r2_ceiling``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from evoformer.errors import InputError
from evoformer.io import atomic_path

log = logging.getLogger(__name__)

LABEL_KEY = "cell_type"
TARGET_SUM = 1e4  # as evoformer.data.hvg.TARGET_SUM: the pipeline's normalize_total target
NONLINEARITIES = ("tanh", "softplus", "linear")

# Generator parameters and their defaults (see make_planted). The defaults are a small instance
# a model with ~128 genes and a few thousand cells can learn the network from.
PLANTED_DEFAULTS: dict[str, Any] = {
    "n_cells": 3000,
    "n_genes": 128,
    "n_types": 4,
    "n_regulators": None,
    "regulated_fraction": 0.5,
    "edges_per_gene": 2,
    "weight_scale": 1.5,
    "nonlinearity": "tanh",
    "noise_sd": 0.5,
    "mean_counts": 3000.0,
    "library_sd": 0.3,
    "dispersion": 0.1,
    "base_sd": 1.0,
    "de_fraction": 0.05,
    "seed": 0,
    "r2_cells": 4000,
    "r2_draws": 16,
}

# Independent random streams derived from the seed: [seed, stream(, block)].
_STREAM_STRUCTURE, _STREAM_CALIBRATION, _STREAM_CELLS, _STREAM_R2 = 0, 1, 2, 3
_CELL_BUDGET = 1 << 21  # cells x genes per block (float64 arrays of ~16 MiB)

_INT_KEYS = ("n_cells", "n_genes", "n_types", "edges_per_gene", "seed", "r2_cells", "r2_draws")
_FLOAT_KEYS = (
    "regulated_fraction",
    "weight_scale",
    "noise_sd",
    "mean_counts",
    "library_sd",
    "dispersion",
    "base_sd",
    "de_fraction",
)
_MINIMUM = {
    "n_cells": 1,
    "n_genes": 2,
    "n_types": 1,
    "edges_per_gene": 0,
    "seed": 0,
    "r2_cells": 0,
    "r2_draws": 2,
}


def resolve_planted_params(params: Mapping[str, Any], where: str = "planted") -> dict[str, Any]:
    """``PLANTED_DEFAULTS`` updated with ``params``, validated and coerced.

    Raises InputError naming ``<where>.<key>`` for an unknown key or a bad value.
    """
    for key in params:
        if key not in PLANTED_DEFAULTS:
            raise InputError(
                f"{where}.{key}: unknown parameter; expected one of {', '.join(PLANTED_DEFAULTS)}"
            )
    out = {**PLANTED_DEFAULTS, **params}
    for key in _INT_KEYS:
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InputError(f"{where}.{key}={value!r}: expected an integer")
        if value < _MINIMUM[key]:
            raise InputError(f"{where}.{key}={value!r}: expected an integer >= {_MINIMUM[key]}")
        out[key] = int(value)
    for key in _FLOAT_KEYS:
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise InputError(f"{where}.{key}={value!r}: expected a number")
        value = float(value)
        if not np.isfinite(value):
            raise InputError(f"{where}.{key}={value!r}: expected a finite number")
        out[key] = value
    positive = ("noise_sd", "mean_counts", "dispersion")
    for key in positive:
        if out[key] <= 0:
            raise InputError(f"{where}.{key}={out[key]!r}: expected a number > 0")
    for key in ("weight_scale", "library_sd", "base_sd"):
        if out[key] < 0:
            raise InputError(f"{where}.{key}={out[key]!r}: expected a number >= 0")
    for key in ("regulated_fraction", "de_fraction"):
        if not 0 <= out[key] <= 1:
            raise InputError(f"{where}.{key}={out[key]!r}: expected a number in [0, 1]")
    if out["nonlinearity"] not in NONLINEARITIES:
        raise InputError(
            f"{where}.nonlinearity={out['nonlinearity']!r}: expected one of "
            f"{', '.join(NONLINEARITIES)}"
        )
    reg = out["n_regulators"]
    if reg is not None:
        if isinstance(reg, bool) or not isinstance(reg, int | np.integer):
            raise InputError(f"{where}.n_regulators={reg!r}: expected an integer or null")
        if not 1 <= reg <= out["n_genes"]:
            raise InputError(
                f"{where}.n_regulators={reg!r}: expected 1 <= n_regulators <= n_genes "
                f"({out['n_genes']})"
            )
        out["n_regulators"] = int(reg)
    return out


def _nonlinearity(name: str, z: np.ndarray) -> np.ndarray:
    if name == "tanh":
        return np.tanh(z)
    if name == "softplus":
        return np.logaddexp(0.0, z) - np.log(2.0)
    return z


class _Model:
    """The drawn structure: type baselines [T, G], DAG weights, depth levels, calibration."""

    def __init__(self, p: dict[str, Any]) -> None:
        self.p = p
        g_n, t_n = p["n_genes"], p["n_types"]
        rng = np.random.default_rng([p["seed"], _STREAM_STRUCTURE])
        # type programs, as make_synthetic (base spread base_sd instead of 1.5)
        base = rng.lognormal(0.0, p["base_sd"], g_n)
        programs = np.tile(base, (t_n, 1))
        n_de = int(round(p["de_fraction"] * g_n))
        for t in range(t_n):
            genes = rng.choice(g_n, size=n_de, replace=False)
            sign = rng.choice([-1.0, 1.0], size=n_de)
            programs[t, genes] *= np.exp(sign * rng.lognormal(0.5, 0.5, n_de))
        programs /= programs.sum(axis=1, keepdims=True)
        self.baseline = np.log(programs)  # [T, G]
        self.order, sources, targets = self._draw_dag(rng)
        n_e = len(sources)
        sign = rng.choice([-1.0, 1.0], size=n_e)
        weight = sign * p["weight_scale"] * rng.uniform(0.5, 1.5, n_e)
        self.sources = np.asarray(sources, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.weights = weight
        self.w = sp.csc_matrix((weight, (self.sources, self.targets)), shape=(g_n, g_n))
        depth = np.zeros(g_n, dtype=np.int64)
        for g in self.order:  # parents come earlier in the order
            pa = self.w.indices[self.w.indptr[g] : self.w.indptr[g + 1]]
            if len(pa):
                depth[g] = depth[pa].max() + 1
        self.depth = depth
        self.levels = [np.flatnonzero(depth == d) for d in range(1, int(depth.max()) + 1)]
        # per level: the parents it reads and the [parents, level] weight block (CSR)
        self.level_inputs = []
        for genes in self.levels:
            block = self.w[:, genes]
            parents = np.unique(block.indices)
            self.level_inputs.append((parents, block[parents].tocsr()))
        # calibration: population mean/sd of each latent, and the normaliser Z
        n_cal = int(np.clip(4_000_000 // g_n, 1000, 20_000))
        crng = np.random.default_rng([p["seed"], _STREAM_CALIBRATION])
        types = crng.integers(0, t_n, n_cal)
        eps = crng.normal(0.0, p["noise_sd"], (n_cal, g_n))
        self.mean = np.zeros(g_n)
        self.sd = np.ones(g_n)
        latent = self.latent(types, eps, calibrate=True)
        self.z = float(np.exp(latent).sum(axis=1).mean())

    def _draw_dag(self, rng: np.random.Generator) -> tuple[np.ndarray, list[int], list[int]]:
        """The DAG: a random topological order [G]; parents drawn among earlier (regulator)
        genes. Returns (order, edge sources, edge targets), each edge's source before its
        target in the order. Subclasses draw other DAGs (evoformer.perturb.screen: modules)."""
        p = self.p
        g_n = p["n_genes"]
        order = rng.permutation(g_n)
        n_reg = p["n_regulators"] if p["n_regulators"] is not None else g_n
        sources, targets = [], []
        for k in range(1, g_n):
            eligible = min(k, n_reg)
            regulated = rng.random() < p["regulated_fraction"]
            if not regulated or p["edges_per_gene"] == 0:
                continue
            chosen = rng.choice(eligible, size=min(p["edges_per_gene"], eligible), replace=False)
            sources.extend(order[np.sort(chosen)])
            targets.extend([order[k]] * len(chosen))
        return order, sources, targets

    @property
    def block_cells(self) -> int:
        return max(16, _CELL_BUDGET // self.p["n_genes"])

    def latent(
        self,
        types: np.ndarray,
        eps: np.ndarray,
        calibrate: bool = False,
        offset: np.ndarray | None = None,
        clamp: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Latent log-expression [n, G] of cells with ``types`` [n] and noise ``eps`` [n, G].

        Interventions (evoformer.perturb.screen): ``offset`` [n, G] is added to each gene's own
        term (``b + eps``) before its parents' input, so it reaches the gene's descendants;
        ``clamp`` = (cells [k], genes [k], values [k]) sets those entries (the genes' incoming
        edges cut) and their descendants are propagated from the set values.
        """
        latent = self.baseline[types] + eps
        if offset is not None:
            latent += offset
        if clamp is not None:
            latent[clamp[0], clamp[1]] = clamp[2]
        roots = self.depth == 0
        if calibrate:
            self._calibrate(latent, roots)
        for genes, (parents, block) in zip(self.levels, self.level_inputs, strict=True):
            z = (latent[:, parents] - self.mean[parents]) / self.sd[parents]
            act = _nonlinearity(self.p["nonlinearity"], z)
            latent[:, genes] += (block.T @ act.T).T
            if clamp is not None:
                latent[clamp[0], clamp[1]] = clamp[2]
            if calibrate:
                self._calibrate(latent, genes)
        return latent

    def _calibrate(self, latent: np.ndarray, genes: np.ndarray) -> None:
        self.mean[genes] = latent[:, genes].mean(axis=0)
        self.sd[genes] = np.maximum(latent[:, genes].std(axis=0), 1e-8)

    def draw_counts(self, rng: np.random.Generator, mu: np.ndarray) -> np.ndarray:
        shape = 1.0 / self.p["dispersion"]
        return rng.poisson(rng.gamma(shape, mu / shape)).astype(np.float64)

    def cells(
        self, rng: np.random.Generator, n: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One block of ``n`` cells: types [n], library [n], eps [n, G], latent [n, G], counts."""
        p = self.p
        types = rng.integers(0, p["n_types"], n)
        library = rng.lognormal(np.log(p["mean_counts"]), p["library_sd"], n)
        eps = rng.normal(0.0, p["noise_sd"], (n, p["n_genes"]))
        latent = self.latent(types, eps)
        counts = self.draw_counts(rng, library[:, None] * np.exp(latent) / self.z)
        return types, library, eps, latent, counts


def _log1p_norm(counts: np.ndarray, total: np.ndarray) -> np.ndarray:
    """log1p(TARGET_SUM * counts / total), 0 where the total is 0 (scanpy's normalize_total)."""
    safe = np.where(total > 0, total, 1.0)
    return np.log1p(TARGET_SUM * counts / safe)


def _variance_shares(model: _Model) -> pd.DataFrame:
    """Per-gene variance decomposition of the log1p-normalised values (module docstring)."""
    p = model.p
    g_n, n_cells, draws = p["n_genes"], p["r2_cells"], p["r2_draws"]
    sum_x = np.zeros(g_n)
    sum_x2 = np.zeros(g_n)
    type_sum = np.zeros((p["n_types"], g_n))
    type_sum2 = np.zeros((p["n_types"], g_n))
    type_n = np.zeros(p["n_types"])
    base_var = np.zeros(g_n)
    inputs_var = np.zeros(g_n)
    floor_var = np.zeros(g_n)
    nonzero = np.zeros(g_n)
    step = max(16, model.block_cells // draws)
    for b, start in enumerate(range(0, n_cells, step)):
        n = min(step, n_cells - start)
        rng = np.random.default_rng([p["seed"], _STREAM_R2, b])
        types, library, eps, latent, counts = model.cells(rng, n)
        total = counts.sum(axis=1, keepdims=True)
        x = _log1p_norm(counts, total)
        sum_x += x.sum(axis=0)
        sum_x2 += (x**2).sum(axis=0)
        nonzero += (counts > 0).sum(axis=0)
        np.add.at(type_sum, types, x)
        np.add.at(type_sum2, types, x**2)
        type_n += np.bincount(types, minlength=p["n_types"])
        others = total - counts  # [n, G] the cell's total without the gene
        scale = library[:, None] / model.z
        parents_fresh = np.empty((draws, n, g_n))
        own_fresh = np.empty((draws, n, g_n))
        same = np.empty((draws, n, g_n))
        for r in range(draws):
            # a fresh latent of the same cell type: the gene's whole upstream redrawn
            other = model.latent(types, rng.normal(0.0, p["noise_sd"], (n, g_n)))
            c = model.draw_counts(rng, scale * np.exp(other))
            parents_fresh[r] = _log1p_norm(c, others + c)
            # the gene's own eps redrawn, its parents' latents held fixed
            mu = scale * np.exp(latent - eps + rng.normal(0.0, p["noise_sd"], (n, g_n)))
            c = model.draw_counts(rng, mu)
            own_fresh[r] = _log1p_norm(c, others + c)
            # only the gamma-Poisson draw redrawn
            c = model.draw_counts(rng, scale * np.exp(latent))
            same[r] = _log1p_norm(c, others + c)
        base_var += parents_fresh.var(axis=0, ddof=1).sum(axis=0)
        inputs_var += own_fresh.var(axis=0, ddof=1).sum(axis=0)
        floor_var += same.var(axis=0, ddof=1).sum(axis=0)
    mean = sum_x / n_cells
    var_x = sum_x2 / n_cells - mean**2
    present = type_n > 0
    within_type = (type_sum2[present] - type_sum[present] ** 2 / type_n[present, None]).sum(
        axis=0
    ) / n_cells
    safe = np.where(var_x > 0, var_x, np.nan)
    mse_base = base_var / n_cells
    mse_inputs = inputs_var / n_cells
    mse_floor = floor_var / n_cells
    r2_base = 1 - mse_base / safe
    r2_total = 1 - mse_inputs / safe
    return pd.DataFrame(
        {
            "frac_nonzero": nonzero / n_cells,
            "mean_x": mean,
            "var_x": var_x,
            "r2_type": 1 - within_type / safe,
            "r2_base": r2_base,
            "r2_network": r2_total - r2_base,
            "r2_total": r2_total,
            "r2_ceiling": 1 - mse_floor / safe,
            "mse_base": mse_base,
            "mse_inputs": mse_inputs,
            "mse_floor": mse_floor,
        }
    )


_SHARE_COLUMNS = [
    "frac_nonzero",
    "mean_x",
    "var_x",
    "r2_type",
    "r2_base",
    "r2_network",
    "r2_total",
    "r2_ceiling",
    "mse_base",
    "mse_inputs",
    "mse_floor",
]


def _gene_names(n: int) -> list[str]:
    return [f"gene_{g:0{len(str(n - 1))}d}" for g in range(n)]


def make_planted(
    n_cells: int = PLANTED_DEFAULTS["n_cells"],
    n_genes: int = PLANTED_DEFAULTS["n_genes"],
    n_types: int = PLANTED_DEFAULTS["n_types"],
    n_regulators: int | None = PLANTED_DEFAULTS["n_regulators"],
    regulated_fraction: float = PLANTED_DEFAULTS["regulated_fraction"],
    edges_per_gene: int = PLANTED_DEFAULTS["edges_per_gene"],
    weight_scale: float = PLANTED_DEFAULTS["weight_scale"],
    nonlinearity: str = PLANTED_DEFAULTS["nonlinearity"],
    noise_sd: float = PLANTED_DEFAULTS["noise_sd"],
    mean_counts: float = PLANTED_DEFAULTS["mean_counts"],
    library_sd: float = PLANTED_DEFAULTS["library_sd"],
    dispersion: float = PLANTED_DEFAULTS["dispersion"],
    base_sd: float = PLANTED_DEFAULTS["base_sd"],
    de_fraction: float = PLANTED_DEFAULTS["de_fraction"],
    seed: int = PLANTED_DEFAULTS["seed"],
    r2_cells: int = PLANTED_DEFAULTS["r2_cells"],
    r2_draws: int = PLANTED_DEFAULTS["r2_draws"],
) -> tuple[ad.AnnData, pd.DataFrame, dict[str, Any]]:
    """Seeded counts with a planted gene regulatory network (model: module docstring).

    ``edges_per_gene`` is the number of parents of each regulated gene (fewer for genes with
    fewer eligible earlier genes); about ``regulated_fraction * n_genes`` genes are regulated.
    ``r2_cells`` / ``r2_draws`` size the Monte-Carlo estimate of the per-gene variance shares
    (``r2_cells=0`` skips it: the R^2 columns are then NaN).

    Returns:
        adata: [n_cells, n_genes], X float32 CSR counts, obs ``cell_type`` (categorical
            ``type_<t>``), var indexed by gene name, ``uns["planted"]`` (parameters and the
            per-gene table as arrays).
        network: one row per edge, columns ``source``, ``target`` (gene names), ``weight``
            (signed), sorted by target then source.
        info: ``params`` (resolved), ``n_edges``, ``genes`` (the per-gene DataFrame: gene,
            n_parents, n_children, depth, topo_rank, frac_nonzero, mean_x, var_x, r2_type, r2_base,
            r2_network, r2_total, r2_ceiling, mse_base, mse_inputs, mse_floor; module docstring)
            and ``summary`` (counts of edges and genes, non-zero fraction, mean R^2s).

    Raises:
        InputError: a bad parameter (named ``planted.<key>``).
    """
    p = resolve_planted_params(
        {
            "n_cells": n_cells,
            "n_genes": n_genes,
            "n_types": n_types,
            "n_regulators": n_regulators,
            "regulated_fraction": regulated_fraction,
            "edges_per_gene": edges_per_gene,
            "weight_scale": weight_scale,
            "nonlinearity": nonlinearity,
            "noise_sd": noise_sd,
            "mean_counts": mean_counts,
            "library_sd": library_sd,
            "dispersion": dispersion,
            "base_sd": base_sd,
            "de_fraction": de_fraction,
            "seed": seed,
            "r2_cells": r2_cells,
            "r2_draws": r2_draws,
        }
    )
    n_cells, n_genes, n_types = p["n_cells"], p["n_genes"], p["n_types"]
    model = _Model(p)
    names = _gene_names(n_genes)

    blocks, all_types = [], []
    step = model.block_cells
    for b, start in enumerate(range(0, n_cells, step)):
        rng = np.random.default_rng([p["seed"], _STREAM_CELLS, b])
        types, _, _, _, counts = model.cells(rng, min(step, n_cells - start))
        blocks.append(sp.csr_matrix(counts.astype(np.float32)))
        all_types.append(types)
    x = sp.vstack(blocks, format="csr")
    x.sort_indices()
    types = np.concatenate(all_types)
    width = len(str(n_cells - 1))
    obs = pd.DataFrame(
        {
            LABEL_KEY: pd.Categorical(
                [f"type_{t}" for t in types], categories=[f"type_{t}" for t in range(n_types)]
            )
        },
        index=[f"cell_{i:0{width}d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=names)

    network = pd.DataFrame(
        {
            "source": [names[i] for i in model.sources],
            "target": [names[i] for i in model.targets],
            "weight": model.weights,
        }
    )
    network = network.sort_values(["target", "source"], kind="stable").reset_index(drop=True)

    topo_rank = np.empty(n_genes, dtype=np.int64)
    topo_rank[model.order] = np.arange(n_genes)
    genes = pd.DataFrame(
        {
            "gene": names,
            "n_parents": np.bincount(model.targets, minlength=n_genes),
            "n_children": np.bincount(model.sources, minlength=n_genes),
            "depth": model.depth,
            "topo_rank": topo_rank,
        }
    )
    if p["r2_cells"] > 0:
        shares = _variance_shares(model)
    else:
        shares = pd.DataFrame(np.nan, index=range(n_genes), columns=_SHARE_COLUMNS)
    genes = pd.concat([genes, shares], axis=1)
    has_parents = genes["n_parents"].to_numpy() > 0
    summary = {
        "n_edges": len(network),
        "n_genes_with_parents": int(has_parents.sum()),
        "n_isolated_genes": int(((genes["n_parents"] == 0) & (genes["n_children"] == 0)).sum()),
        "max_depth": int(model.depth.max()),
        "frac_nonzero": float(x.nnz / (n_cells * n_genes)),
        "mean_total_counts": float(x.sum() / n_cells),
        "mean_r2_network_with_parents": float(genes["r2_network"][has_parents].mean()),
        "mean_r2_network": float(genes["r2_network"].mean()),
        "mean_r2_type": float(genes["r2_type"].mean()),
        "mean_r2_base": float(genes["r2_base"].mean()),
        "mean_r2_total": float(genes["r2_total"].mean()),
        "mean_r2_ceiling": float(genes["r2_ceiling"].mean()),
    }
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.uns["planted"] = {
        "params": {k: v for k, v in p.items() if v is not None},
        "summary": summary,
        "genes": {c: genes[c].to_numpy() for c in genes.columns},
    }
    info = {"params": p, "n_edges": len(network), "genes": genes, "summary": summary}
    return adata, network, info


def planted_paths(out_h5ad: str | os.PathLike) -> tuple[Path, Path, Path]:
    """The three files of a planted dataset: ``<name>.h5ad``, ``<name>_network.tsv``,
    ``<name>_genes.tsv`` (same directory)."""
    out = Path(out_h5ad)
    stem = out.name[: -len(".h5ad")] if out.name.endswith(".h5ad") else out.stem
    return out, out.with_name(f"{stem}_network.tsv"), out.with_name(f"{stem}_genes.tsv")


def write_planted(out_h5ad: str | os.PathLike, params: Mapping[str, Any]) -> None:
    """Generate a planted dataset from config parameters ``datasets.<name>.planted`` and write
    ``<name>.h5ad``, ``<name>_network.tsv`` and ``<name>_genes.tsv`` atomically (the h5ad last).

    Raises InputError naming ``datasets.<name>.planted.<key>`` for an unknown or bad parameter.
    """
    out, network_path, genes_path = planted_paths(out_h5ad)
    name = network_path.name[: -len("_network.tsv")]
    p = resolve_planted_params(params, where=f"datasets.{name}.planted")
    adata, network, info = make_planted(**p)
    with atomic_path(network_path) as tmp:
        network.to_csv(tmp, sep="\t", index=False, float_format="%.10g")
    with atomic_path(genes_path) as tmp:
        info["genes"].to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    s = info["summary"]
    log.info(
        "wrote %s: %d cells x %d genes, %d edges, %.1f%% non-zero, mean R^2 from the network "
        "%.3f (genes with parents), %.3f (all)",
        out,
        adata.n_obs,
        adata.n_vars,
        s["n_edges"],
        100 * s["frac_nonzero"],
        s["mean_r2_network_with_parents"],
        s["mean_r2_network"],
    )
