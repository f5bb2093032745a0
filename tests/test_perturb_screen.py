"""Synthetic Perturb-seq screens: interventions on the planted network, the truth, the files."""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from evoformer.data import planted
from evoformer.errors import InputError
from evoformer.perturb import screen as screen_module
from evoformer.perturb.conditions import CONTROL, condition_genes, make_condition
from evoformer.perturb.screen import (
    SCPERTURB_TYPES,
    SCREEN_DEFAULTS,
    Screen,
    _coupled_poisson,
    resolve_screen_params,
    screen_paths,
    write_screen,
)

# 48 genes, 12 regulators in 3 modules: 11 singles, 3 within- and 4 across-module doubles
SMALL = {
    "n_genes": 48,
    "n_regulators": 12,
    "n_modules": 3,
    "regulated_fraction": 0.7,
    "cross_module_fraction": 0.0,
    "n_doubles_within": 3,
    "n_doubles_across": 4,
    "cooperative_fraction": 0.0,
    "n_control": 300,
    "cells_per_condition": 60,
    "truth_cells": 1000,
}


def _x(counts: np.ndarray) -> np.ndarray:
    """log1p(1e4 * counts / total) [N, G], as scanpy's normalize_total + log1p."""
    total = counts.sum(axis=1, keepdims=True)
    return np.log1p(1e4 * counts / np.where(total > 0, total, 1))


def _descendants(network: pd.DataFrame, gene: str) -> set[str]:
    """Genes strictly downstream of ``gene`` in an edge table (breadth-first search)."""
    children = network.groupby("source")["target"].apply(list).to_dict()
    seen, frontier = set(), [gene]
    while frontier:
        nxt = [c for g in frontier for c in children.get(g, []) if c not in seen]
        seen.update(nxt)
        frontier = nxt
    return seen


def _sampled_deltas(screen: Screen) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per perturbed condition [C, G]: sampled mean x minus the control's, its standard
    error, and the number of cells [C]."""
    labels, _, counts = screen.counts()
    x = _x(counts.toarray().astype(np.float64))
    ctrl = x[labels == CONTROL]
    diff, se = [], []
    for c in screen.conditions:
        xc = x[labels == c]
        diff.append(xc.mean(axis=0) - ctrl.mean(axis=0))
        se.append(np.sqrt(xc.var(axis=0, ddof=1) / len(xc) + ctrl.var(axis=0, ddof=1) / len(ctrl)))
    return np.array(diff), np.array(se), x


def test_design_modules_and_conditions():
    screen = Screen({**SMALL, "cross_module_fraction": 0.0})
    p = screen.params
    assert p == resolve_screen_params(SMALL) and p["truth_cells"] == 1000
    facts = screen.facts()
    network = screen.network()
    module = dict(zip(screen.genes, screen.module, strict=True))
    # modules of nearly equal size; without cross-module edges every edge stays in its module
    assert np.ptp(np.bincount(screen.module)) <= 1
    assert (network["source"].map(module) == network["target"].map(module)).all()
    # canonical conditions: 11 singles of genes with children, then the doubles
    assert screen.conditions == [make_condition(condition_genes(c)) for c in screen.conditions]
    assert list(facts["condition"]) == screen.conditions
    singles = facts[facts["n_genes"] == 1]
    with_children = set(network["source"])
    assert len(singles) == round(0.9 * len(with_children)) == 11
    assert set(singles["condition"]) <= with_children
    doubles = facts[facts["n_genes"] == 2]
    assert doubles["module_relation"].value_counts().to_dict() == {"within": 3, "across": 4}
    for _, row in doubles.iterrows():
        a, b = condition_genes(row["condition"])
        assert {a, b} <= set(singles["condition"])
        assert (module[a] == module[b]) == (row["module_relation"] == "within")
        assert row["modules"] == f"{module[a]}+{module[b]}"
        shared = (_descendants(network, a) | {a}) & (_descendants(network, b) | {b})
        assert row["n_shared_descendants"] == len(shared)
        assert row["additive"] == (not shared)
        assert row["n_descendants"] == len(
            (_descendants(network, a) | _descendants(network, b)) - {a, b}
        )
    assert not facts["additive"][facts["n_genes"] == 1].any()
    assert not facts["cooperative"].any() and (facts["perturbation"] == "knockdown").all()
    # with cross-module edges allowed, edges are still mostly within a module
    network = Screen({**SMALL, "cross_module_fraction": 0.2}).network()
    cross = (network["source"].map(module) != network["target"].map(module)).mean()
    assert 0.0 < cross < 0.5


def test_many_singles_draw_doubles_by_rejection(monkeypatch):
    """Past _ENUMERATE_PAIRS pairs of singles, doubles are drawn without listing the pairs."""
    monkeypatch.setattr(screen_module, "_ENUMERATE_PAIRS", 0)
    params = {**SMALL, "n_doubles_within": 6, "n_doubles_across": 9}
    screen = Screen(params)
    facts = screen.facts()
    doubles = facts[facts["n_genes"] == 2]
    assert doubles["module_relation"].value_counts().to_dict() == {"within": 6, "across": 9}
    assert doubles["condition"].is_unique
    module = dict(zip(screen.genes, screen.module, strict=True))
    for _, row in doubles.iterrows():
        a, b = condition_genes(row["condition"])
        assert (module[a] == module[b]) == (row["module_relation"] == "within")
    assert Screen(params).conditions == screen.conditions
    with pytest.raises(InputError, match=r"^screen\.n_doubles_within=40: only \d+ within"):
        Screen({**params, "n_doubles_within": 40})


def test_latent_propagation_subset_equals_full():
    """The truth's propagation over affected genes only equals the full propagation, and the
    intervention leaves every other gene's latent value exactly as in control."""
    screen = Screen({**SMALL, "cooperative_fraction": 1.0, "systematic_shift": 1.0})
    model, rng = screen.model, np.random.default_rng(5)
    n = 40
    types = rng.integers(0, 1, n)
    eps = rng.normal(0.0, 0.5, (n, 48))
    works = rng.random((n, 2)) > 0.3
    eff = rng.uniform(0.2, 1.0, (n, 2))
    latent0 = model.latent(types, eps)
    affected = screen.affected()
    for ci in range(1, len(screen.conditions) + 1):
        cond = np.full(n, ci)
        offset, clamp = screen._intervention(cond, types, eps, works, eff)
        full = model.latent(types, eps, offset=offset, clamp=clamp)
        genes = np.flatnonzero(affected[ci - 1])
        offset, clamp = screen._intervention(cond, types, eps, works, eff, genes)
        plan = model.subset_plan(genes)
        sub = model.latent_subset(latent0, types, eps, genes, plan, offset, clamp)
        np.testing.assert_allclose(sub, full[:, genes], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(full[:, ~affected[ci - 1]], latent0[:, ~affected[ci - 1]])
        assert (full[:, genes] != latent0[:, genes]).any(axis=0).mean() > 0.9


def test_descendants_move_and_non_descendants_do_not(monkeypatch):
    # small blocks: cells and truth in several blocks of 300 cells
    monkeypatch.setattr(planted, "_CELL_BUDGET", 300 * 48)
    screen = Screen(SMALL)
    truth = screen.truth()
    network = screen.network()
    index = {g: i for i, g in enumerate(screen.genes)}
    delta, se = truth["delta"], truth["delta_se"]
    bound = truth["abs_log_total_shift"]
    for i, c in enumerate(screen.conditions):
        if len(condition_genes(c)) > 1:
            continue
        down = [index[g] for g in _descendants(network, c)]
        moved = np.zeros(48, dtype=bool)
        moved[down + [index[c]]] = True
        np.testing.assert_array_equal(screen.affected()[i], moved)
        # the others move only through the cell's total: within its shift (+ MC error)
        assert (np.abs(delta[i, ~moved]) <= bound[i] + 4 * se[i, ~moved] + 1e-6).all()
        # the target and its direct children move far beyond the Monte-Carlo error
        assert delta[i, index[c]] < -0.3
        children = [index[t] for t in network.loc[network["source"] == c, "target"]]
        assert (np.abs(delta[i, children]) > 4 * se[i, children]).mean() >= 0.75
    # the sampled cells agree with the truth within their sampling and Monte-Carlo error
    diff, sd, _ = _sampled_deltas(screen)
    z = (diff - delta) / np.sqrt(sd**2 + se**2)
    z = z[np.isfinite(z)]
    assert 0.8 < (z**2).mean() < 1.25 and (np.abs(z) > 4.5).mean() < 0.002


def test_across_module_doubles_are_additive_without_cooperative_targets():
    """Doubles without shared descendants: the latent effects add exactly (cell by cell);
    in x the interaction is 0 up to the normalisation's share (bounded by the two singles'
    abs_log_total_shift) and the Monte-Carlo error."""
    screen = Screen(SMALL)
    truth = screen.truth()
    facts = screen.facts(truth)
    shift = dict(zip(facts["condition"], truth["abs_log_total_shift"], strict=True))
    free = facts[facts["additive"]]
    assert (free["module_relation"] == "across").sum() == 4
    assert (free["n_shared_descendants"] == 0).all()
    model, rng, n = screen.model, np.random.default_rng(1), 50
    types, eps = np.zeros(n, dtype=np.int64), rng.normal(0.0, 0.5, (n, 48))
    works, eff = rng.random((n, 2)) > 0.2, rng.uniform(0.3, 1.0, (n, 2))
    latent0 = model.latent(types, eps)

    def change(condition: str, slots: list[int]) -> np.ndarray:
        cond = np.full(n, screen.conditions.index(condition) + 1)
        offset, clamp = screen._intervention(cond, types, eps, works[:, slots], eff[:, slots])
        return model.latent(types, eps, offset=offset, clamp=clamp) - latent0

    for i in free.index:
        a, b = condition_genes(facts.loc[i, "condition"])
        both = change(facts.loc[i, "condition"], [0, 1])
        np.testing.assert_allclose(both, change(a, [0, 0]) + change(b, [1, 1]), atol=1e-12)
        inter, se = truth["interaction"][i], truth["interaction_se"][i]
        assert (np.abs(inter) <= shift[a] + shift[b] + 4.5 * se).all()
    singles = facts["n_genes"] == 1
    assert np.isnan(truth["interaction"][singles]).all()
    assert np.isfinite(truth["interaction"][~singles]).all()


def test_cooperative_targets_bring_interactions_back():
    plain = Screen(SMALL)
    coop = Screen({**SMALL, "cooperative_fraction": 1.0, "synergy_strength": 2.0})
    assert coop.conditions == plain.conditions  # same doubles, now all cooperative
    truth, planted_synergy = coop.truth(), coop.synergy()
    base = plain.truth()
    facts = coop.facts(truth)
    doubles = np.flatnonzero(facts["n_genes"] == 2)
    assert facts["cooperative"].iloc[doubles].all() and not facts["cooperative"].iloc[:11].any()
    inter, se = truth["interaction"], truth["interaction_se"]
    hits, planted_w, found = [], [], []
    for i in doubles:
        targets = np.flatnonzero(planted_synergy[i])
        assert facts["cooperative_targets"].iloc[i] == ",".join(coop.genes[t] for t in targets)
        assert len(targets) == 5
        hits.extend(np.abs(inter[i, targets]) > 4 * se[i, targets])
        planted_w.extend(planted_synergy[i, targets])
        found.extend(inter[i, targets])
        # without the cooperative targets these genes did not interact
        assert (np.abs(base["interaction"][i, targets]) < np.abs(inter[i, targets])).mean() > 0.8
    assert np.mean(hits) >= 0.8
    assert np.corrcoef(planted_w, found)[0, 1] > 0.8
    assert (np.sign(found) == np.sign(planted_w)).mean() >= 0.85


def test_coupled_counts_have_poisson_marginals_and_move_one_way():
    """The truth's common random numbers: a condition's counts are Poisson(rate), equal to
    the control's where the rate is unchanged, never below them where it rose nor above
    them where it fell."""
    rate0 = np.full((40000, 3), 4.0)
    rate = rate0 * np.array([0.25, 1.0, 3.0])
    counts0 = np.random.default_rng(0).poisson(rate0)
    out = _coupled_poisson(np.random.default_rng(1), counts0, rate0, rate)
    np.testing.assert_allclose(out.mean(axis=0), [1.0, 4.0, 12.0], rtol=0.02)
    np.testing.assert_allclose(out.var(axis=0), [1.0, 4.0, 12.0], rtol=0.04)
    np.testing.assert_array_equal(out[:, 1], counts0[:, 1])
    assert (out[:, 0] <= counts0[:, 0]).all() and (out[:, 2] >= counts0[:, 2]).all()
    assert np.corrcoef(out[:, 0], counts0[:, 0])[0, 1] > 0.4


@pytest.mark.parametrize("escape", [0.0, 0.3])
def test_knockout_escapees_keep_their_expression(escape):
    screen = Screen(
        {**SMALL, "perturbation": "knockout", "escape_fraction": escape, "truth_cells": 200}
    )
    labels, _, counts = screen.counts()
    counts = counts.toarray()
    ctrl_mean = counts[labels == CONTROL].mean(axis=0)
    kept, n = 0, 0
    for c in screen.conditions[:11]:
        g = screen.genes.index(c)
        if ctrl_mean[g] >= 20:  # a control cell has a count of 0 with probability < 1e-4
            cells = counts[labels == c, g]
            kept += (cells > 0).sum()
            n += len(cells)
    assert n >= 180
    share = kept / n
    assert abs(share - escape) < 4 * np.sqrt(max(escape, 0.01) * (1 - escape) / n)


@pytest.mark.parametrize(
    ("efficiency_mean", "escape"), [(0.8, 0.1), (1.0, 0.1), (0.8, 0.0), (0.5, 0.2)]
)
def test_knockdown_lowers_a_root_target_by_its_efficiency(efficiency_mean, escape):
    """A target without parents keeps its own term: its mean count is the control's times
    escape + (1 - escape) * E[exp(-strength * e)], e ~ Beta(mean * k, (1 - mean) * k)."""
    params = {
        **SMALL,
        "n_genes": 24,
        "n_regulators": 8,
        "efficiency_mean": efficiency_mean,
        "escape_fraction": escape,
        "n_doubles_within": 0,
        "n_doubles_across": 0,
        "n_control": 3000,
        "cells_per_condition": 1500,
        "truth_cells": 2,
    }
    screen = Screen(params)
    labels, _, counts = screen.counts()
    counts = counts.toarray()
    roots = [c for c in screen.conditions if screen.model.depth[screen.genes.index(c)] == 0]
    assert len(roots) >= 2
    genes = [screen.genes.index(c) for c in roots]
    ctrl = counts[labels == CONTROL][:, genes].mean(axis=0)
    pert = np.array([counts[labels == c, g].mean() for c, g in zip(roots, genes, strict=True)])
    e = 1.0
    if efficiency_mean < 1:
        k = 10.0  # efficiency_concentration
        e = np.random.default_rng(0).beta(efficiency_mean * k, (1 - efficiency_mean) * k, 10**6)
    expected = escape + (1 - escape) * np.exp(-2.0 * e).mean()
    # pooled over the root targets (count noise: a few per cent)
    assert pert.sum() / ctrl.sum() == pytest.approx(expected, rel=0.08)


def test_activation_raises_and_knockout_silences_the_target():
    for kind, check in (("activation", lambda d: d > 0.5), ("knockout", lambda d: d < -1.0)):
        screen = Screen({**SMALL, "perturbation": kind, "escape_fraction": 0.0})
        truth = screen.truth()
        own = [
            truth["delta"][i, screen.genes.index(c)] for i, c in enumerate(screen.conditions[:11])
        ]
        assert all(check(d) for d in own), (kind, own)


def test_systematic_shift_moves_the_program_in_all_perturbed_cells():
    params = {**SMALL, "systematic_fraction": 0.2}
    off = Screen(params)
    on = Screen({**params, "systematic_shift": 1.0})
    assert on.conditions == off.conditions
    program = on.systematic
    assert (off.systematic == 0).all() and (np.flatnonzero(program) == on.program).all()
    assert len(on.program) == round(0.2 * 48)
    sign = np.sign(program)
    t_on, t_off = on.truth(), off.truth()
    moved = (t_on["delta"] - t_off["delta"]) * sign  # [C, G] along the program's signs
    assert (moved[:, on.program].mean(axis=1) > 0.2).all()
    # every perturbed condition's cells carry it (sampled data), control cells do not
    diff, sd, _ = _sampled_deltas(on)
    score = (diff[:, on.program] * sign[on.program]).sum(axis=1)
    noise = np.sqrt((sd[:, on.program] ** 2).sum(axis=1))
    assert (score > 3 * noise).all()
    # the shift is counted once in delta_AB and twice in delta_A + delta_B: sub-additive
    doubles = np.array([len(condition_genes(c)) == 2 for c in on.conditions])
    inter = (t_on["interaction"][doubles] * sign)[:, on.program]
    assert (inter.mean(axis=1) < -0.2).all()
    assert off.facts()["additive"].sum() == 4 and not on.facts()["additive"].any()


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_written_files_are_reproducible(tmp_path):
    params = {**SMALL, "truth_cells": 300, "cooperative_fraction": 0.5}
    for run in ("a", "b", "c"):
        write_screen(tmp_path / run / "toy.h5ad", {**params, "seed": 1 if run == "c" else 0})
    a, b, c = (screen_paths(tmp_path / run / "toy.h5ad") for run in ("a", "b", "c"))
    assert [p.name for p in a] == [
        "toy.h5ad",
        "toy_truth.npz",
        "toy_conditions.tsv",
        "toy_network.tsv",
    ]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in a)
    assert [_sha(p) for p in a] == [_sha(p) for p in b]
    assert all(_sha(p) != _sha(q) for p, q in zip(a, c, strict=True))


def test_both_layouts_hold_the_same_cells(tmp_path):
    params = {**SMALL, "truth_cells": 300, "cooperative_fraction": 0.5, "n_types": 2}
    write_screen(tmp_path / "gears.h5ad", params, layout="gears")
    write_screen(tmp_path / "scp.h5ad", params, layout="scperturb")
    g, s = ad.read_h5ad(tmp_path / "gears.h5ad"), ad.read_h5ad(tmp_path / "scp.h5ad")
    screen = Screen(params)
    labels, types, counts = screen.counts()
    assert list(g.obs_names) == list(s.obs_names) and g.n_obs == 300 + 18 * 60
    assert sp.issparse(g.X) and g.X.dtype == np.float32 and s.X.dtype == np.float32
    assert (g.layers["counts"] != s.X).nnz == 0 and (s.X != counts).nnz == 0
    np.testing.assert_allclose(g.X.toarray(), _x(counts.toarray().astype(np.float64)), rtol=1e-6)
    # var: GEARS Ensembl-like ids + gene_name; scPerturb symbols
    assert list(g.var["gene_name"]) == list(s.var_names) == screen.genes
    assert g.var_names.str.fullmatch(r"ENSG\d{11}").all() and g.var_names.is_unique
    # obs: each layout's spelling of the same canonical conditions
    canon = pd.Series(labels, index=g.obs_names)
    gears = g.obs["condition"].astype(str).str.replace("+ctrl", "", regex=False)
    assert (gears == canon).all()
    assert (
        s.obs["perturbation"].astype(str).str.replace("_", "+") == canon.replace(CONTROL, "control")
    ).all()
    single = canon.map(lambda c: len(condition_genes(c)) == 1)
    assert g.obs["condition"][single].astype(str).str.endswith("+ctrl").all()
    assert (g.obs["control"] == (canon == CONTROL)).all()
    assert (s.obs["nperts"] == canon.map(lambda c: len(condition_genes(c)))).all()
    assert (s.obs["perturbation_type"] == SCPERTURB_TYPES["knockdown"]).all()
    cell_type = pd.Series([f"type{t}" for t in types], index=g.obs_names)
    assert (g.obs["cell_type"].astype(str) == cell_type).all()
    assert (s.obs["celltype"].astype(str) == cell_type).all()
    dose = np.where(canon == CONTROL, "1", "1+1")
    expected = cell_type + "_" + g.obs["condition"].astype(str) + "_" + dose
    assert (g.obs["condition_name"].astype(str) == expected).all()
    assert g.uns["screen"]["layout"] == "gears" and s.uns["screen"]["params"]["n_genes"] == 48
    # the side files
    _, truth_npz, facts_tsv, network_tsv = screen_paths(tmp_path / "gears.h5ad")
    truth = np.load(truth_npz)
    assert (
        list(truth["conditions"])
        == screen.conditions
        == sorted(set(labels) - {CONTROL}, key=lambda c: (len(condition_genes(c)), c))
    )
    assert list(truth["genes"]) == screen.genes
    for key in ("delta", "delta_se", "interaction", "interaction_se", "synergy"):
        assert truth[key].shape == (18, 48) and truth[key].dtype == np.float32
    assert truth["affected"].dtype == bool and int(truth["truth_cells"]) == 300
    facts = pd.read_csv(facts_tsv, sep="\t")
    assert list(facts["condition"]) == screen.conditions
    assert (facts["n_cells"] == pd.Series(labels).value_counts()[facts["condition"]].values).all()
    pd.testing.assert_frame_equal(
        pd.read_csv(network_tsv, sep="\t"), screen.network(), check_exact=False, rtol=1e-9
    )


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"n_cells": 10}, "n_cells"),
        ({"n_genes": 1}, "n_genes"),
        ({"noise_sd": 0}, "noise_sd"),
        ({"n_modules": 49}, "n_modules"),
        ({"n_modules": 0}, "n_modules"),
        ({"cross_module_fraction": 1.5}, "cross_module_fraction"),
        ({"perturbation": "crispri"}, "perturbation"),
        ({"strength": 0}, "strength"),
        ({"efficiency_mean": 0.0}, "efficiency_mean"),
        ({"efficiency_concentration": -1}, "efficiency_concentration"),
        ({"escape_fraction": 1.0}, "escape_fraction"),
        ({"perturb_genes": "all"}, "perturb_genes"),
        ({"single_fraction": 0}, "single_fraction"),
        ({"n_doubles_within": -1}, "n_doubles_within"),
        ({"n_doubles_within": 50}, "n_doubles_within"),
        ({"n_doubles_across": 2.5}, "n_doubles_across"),
        ({"cooperative_fraction": True}, "cooperative_fraction"),
        ({"n_cooperative_targets": 47}, "n_cooperative_targets"),
        ({"synergy_strength": float("nan")}, "synergy_strength"),
        ({"systematic_shift": -1.0}, "systematic_shift"),
        ({"systematic_fraction": "a lot"}, "systematic_fraction"),
        ({"n_control": 0}, "n_control"),
        ({"cells_per_condition": 0}, "cells_per_condition"),
        ({"truth_cells": 1}, "truth_cells"),
        ({"edges_per_gene": 0}, "perturb_genes"),
    ],
)
def test_bad_params_name_the_config_key(tmp_path, params, key):
    with pytest.raises(InputError, match=rf"^datasets\.toy\.screen\.{key}\b") as exc:
        write_screen(tmp_path / "toy.h5ad", {**SMALL, **params})
    assert "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match=rf"^screen\.{key}\b"):
        Screen({**SMALL, **params})


def test_bad_layout_and_defaults(tmp_path):
    with pytest.raises(InputError, match="layout='anndata'"):
        write_screen(tmp_path / "toy.h5ad", SMALL, layout="anndata")
    assert list(tmp_path.iterdir()) == []
    # the defaults are a valid screen (Screen draws its design without cells)
    screen = Screen({})
    assert screen.params == resolve_screen_params({}) == {**SCREEN_DEFAULTS}
    assert len(screen.conditions) > 50
