"""Perturbation metrics on hand-computed examples, NaN handling and the subgroup bootstrap."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd
import pytest

from evoformer.perturb.metrics import (
    ALL,
    METRICS,
    Reference,
    condition_metrics,
    perturbed_gene_deltas,
    summarise_subgroups,
)

GENES = ["A", "B", "g1", "g2", "g3"]
CTRL = np.ones(5)
PERT_REF = np.array([1.0, 1.0, 1.0, 2.0, 1.0])
TRUE = np.array(
    [
        [0.0, 1.0, 2.0, 3.0, 1.0],  # A
        [0.0, 0.0, 1.5, 2.0, 1.2],  # A+B
    ]
)
SINGLE_B = np.array([1.0, 0.0, 1.0, 1.5, 1.0])
PRED = np.array(
    [
        [0.5, 2.0, 1.5, 2.0, 1.0],
        [0.0, 0.0, 1.6, 2.2, 1.1],
    ]
)


def _reference(true: np.ndarray = TRUE) -> Reference:
    add = np.full((2, 5), np.nan)
    add[1] = (TRUE[0] - CTRL) + (SINGLE_B - CTRL)  # observed singles A and B
    de = [np.array([3, 2, 4]), np.array([4, 2])]
    return Reference(["A", "A+B"], GENES, true, CTRL, PERT_REF, de, add)


def test_every_metric_on_a_hand_computed_example():
    m = condition_metrics(PRED, _reference())
    assert set(m) == set(METRICS)
    # A: perturbed gene 0 left out; kept genes B, g1, g2, g3
    # pred - ctrl = [1, .5, 1, 0], true - ctrl = [0, 1, 2, 0]
    assert m["mse"][0] == pytest.approx((1 + 0.25 + 1 + 0) / 4)
    assert m["pearson_delta"][0] == pytest.approx(5 / 11)  # .625 / sqrt(.6875 * 2.75)
    # DE genes g2, g1, g3: errors 1, .25, 0; changes pred [1, .5, 0] vs true [2, 1, 0]
    assert m["mse_de"][0] == pytest.approx(1.25 / 3)
    assert m["pearson_delta_de"][0] == pytest.approx(1.0)
    assert m["de_sign"][0] == pytest.approx(1.0)  # sign 0 == sign 0 for g3
    # pred - pert_ref = [1, .5, 0, 0], true - pert_ref = [0, 1, 1, 0]: -.25 / sqrt(.6875 * 1)
    assert m["pearson_delta_pert"][0] == pytest.approx(-0.25 / math.sqrt(0.6875))
    # centroid genes g1, g2, g3 (A and B are perturbed in a test condition):
    # pred A [1.5, 2, 1]: own truth at distance^2 1.25, A+B's truth [1.5, 2, 1.2] at 0.04
    assert m["centroid_rank"][0] == 1.0 and m["centroid_acc"][0] == 0.0
    assert math.isnan(m["pearson_interaction"][0])  # a single
    # A+B: kept genes g1, g2, g3; pred [1.6, 2.2, 1.1] vs true [1.5, 2, 1.2]
    assert m["mse"][1] == pytest.approx(0.06 / 3)
    # pred A+B: own truth at distance^2 .06, A's truth at .81
    assert m["centroid_rank"][1] == 0.0 and m["centroid_acc"][1] == 1.0
    # DE g3, g1: pred change [.1, .6] vs true [.2, .5]: same signs, correlation 1 (2 points)
    assert m["de_sign"][1] == 1.0 and m["pearson_delta_de"][1] == pytest.approx(1.0)
    # additive part on g1, g2, g3: [1, 2.5, 0]; interactions pred [-.4, -1.3, .1], true
    # [-.5, -1.5, .2]; centred: [.4, -2.3, 1.9] / 3 and [.1, -.9, .8]
    expected = 1.21 / math.sqrt(9.06 / 9 * 1.46)
    assert m["pearson_interaction"][1] == pytest.approx(expected)


def test_perturbed_gene_deltas_reported_apart():
    true, pred = perturbed_gene_deltas(PRED, _reference())
    np.testing.assert_allclose(true, [-1.0, -1.0])  # A: 0 - 1; A+B: mean(-1, -1)
    np.testing.assert_allclose(pred, [-0.5, -1.0])


def test_perturbed_genes_do_not_move_delta_metrics():
    pred = PRED.copy()
    pred[0, 0] = 100.0  # the perturbed gene of A
    pred[1, :2] = -50.0  # those of A+B
    base, moved = condition_metrics(PRED, _reference()), condition_metrics(pred, _reference())
    for m in METRICS:
        np.testing.assert_array_equal(base[m], moved[m])


def test_undefined_metrics_stay_nan():
    ref = _reference()
    no_change = np.tile(CTRL, (2, 1))
    m = condition_metrics(no_change, ref)
    assert np.isnan(m["pearson_delta"]).all() and np.isnan(m["pearson_delta_de"]).all()
    assert np.isfinite(m["mse"]).all()
    assert (m["de_sign"] == [1 / 3, 0.0]).all()  # only g3 of A has true change 0
    pert = condition_metrics(np.tile(PERT_REF, (2, 1)), ref)
    assert np.isnan(pert["pearson_delta_pert"]).all()
    # a double without observed singles: interaction undefined
    ref.additive[1] = np.nan
    assert np.isnan(condition_metrics(PRED, ref)["pearson_interaction"][1])
    # no prediction for a condition: every metric NaN there
    pred = PRED.copy()
    pred[1, 3] = np.nan
    m = condition_metrics(pred, _reference())
    for name in METRICS:
        assert math.isnan(m[name][1]), name
    assert math.isfinite(m["mse"][0])


def test_truth_reference_gives_zero_error_to_the_truth():
    true = CTRL + np.array([[-1.0, 0.2, 0.5, 1.0, -0.3], [-1.0, -1.0, 0.4, 0.1, 0.6]])
    ref = _reference(true)
    m = condition_metrics(true, ref)
    assert (m["mse"] == 0).all() and np.allclose(m["pearson_delta"], 1.0)
    assert (m["centroid_acc"] == 1).all()


# ----------------------------------------------------------------------------- subgroups
def _values(seed: int = 0) -> tuple[dict, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    conds = [f"P{i}" for i in range(6)] + [f"P{i}+Q{i}" for i in range(6)]
    subs = ["unseen_single"] * 6 + ["combo_seen2"] * 6
    values = {}
    for name, shift in (("model", 0.3), ("no_change", 0.0), ("additive", 0.1)):
        v = {m: rng.normal(shift, 1.0, size=12) for m in METRICS}
        v["pearson_interaction"][:6] = np.nan  # singles
        values[name] = v
    values["no_change"]["pearson_delta"][:] = np.nan
    values["additive"]["mse"][[0, 7]] = np.nan
    return values, conds, subs


def _row(rows, sub, method, metric):
    (r,) = [r for r in rows if (r["subgroup"], r["method"], r["metric"]) == (sub, method, metric)]
    return r


def test_subgroup_means_counts_and_strongest_baseline():
    values, conds, subs = _values()
    rows = summarise_subgroups(values, conds, subs, ("no_change", "additive"), 200, 0)
    r = _row(rows, "combo_seen2", "additive", "mse")
    assert r["n_conditions"] == 6 and r["n_undefined"] == 1
    assert r["value"] == pytest.approx(np.nanmean(values["additive"]["mse"][6:]))
    # no rows for a doubles-only metric in a subgroup of singles
    assert not [
        r for r in rows if r["subgroup"] == "unseen_single" and "interaction" in r["metric"]
    ]
    r = _row(rows, "combo_seen2", "no_change", "pearson_interaction")
    assert r["n_conditions"] == 6 and r["n_undefined"] == 0
    # pearson_delta undefined for no_change everywhere: additive is the strongest baseline
    r = _row(rows, ALL, "no_change", "pearson_delta")
    assert r["n_undefined"] == 12 and math.isnan(r["value"]) and r["best_baseline"] == "additive"
    # strongest baseline per metric: lowest mse, highest otherwise; diff = paired mean
    for metric, lower in (("mse", True), ("de_sign", False)):
        means = {b: np.nanmean(values[b][metric][:6]) for b in ("no_change", "additive")}
        best = (min if lower else max)(means, key=means.get)
        r = _row(rows, "unseen_single", "model", metric)
        assert r["best_baseline"] == best
        d = values["model"][metric][:6] - values[best][metric][:6]
        assert r["diff"] == pytest.approx(np.nanmean(d))
        assert math.isnan(_row(rows, "unseen_single", best, metric)["diff"])


def test_bootstrap_reproducible_and_equal_to_a_direct_resampling():
    values, conds, subs = _values()
    kw = dict(competitors=("no_change", "additive"), n_boot=300)
    a = summarise_subgroups(values, conds, subs, seed=5, **kw)
    b = summarise_subgroups(values, conds, subs, seed=5, **kw)
    c = summarise_subgroups(values, conds, subs, seed=6, **kw)
    assert a == b
    assert [r["lo"] for r in a] != [r["lo"] for r in c]
    # direct: resample the subgroup's conditions with the documented seed, nanmean each draw
    rng = np.random.default_rng([5, zlib.crc32(b"combo_seen2")])
    weights = rng.multinomial(6, np.full(6, 1 / 6), size=300)
    x = values["additive"]["mse"][6:]
    draws = []
    for w in weights:
        picked = np.repeat(x, w)
        picked = picked[np.isfinite(picked)]
        draws.append(picked.mean() if picked.size else np.nan)
    lo, hi = np.nanquantile(draws, [0.025, 0.975])
    r = _row(a, "combo_seen2", "additive", "mse")
    assert r["lo"] == pytest.approx(lo) and r["hi"] == pytest.approx(hi)
    assert r["lo"] <= r["value"] <= r["hi"]
    none = summarise_subgroups(values, conds, subs, ("no_change",), 0, 5)
    assert all(math.isnan(r["lo"]) and math.isnan(r["hi"]) for r in none)


def test_no_interval_and_no_claim_from_fewer_than_five_conditions():
    """A mean (or paired difference) defined on fewer than MIN_INTERVAL_CONDITIONS conditions
    gets no interval, however consistent its draws; the summary then claims nothing."""
    from evoformer.perturb.metrics import MIN_INTERVAL_CONDITIONS
    from evoformer.perturb.report import _verdict

    assert MIN_INTERVAL_CONDITIONS == 5
    values, conds, subs = _values()
    values["additive"]["mse"][6:] = np.arange(6.0)  # combo_seen2: 6 defined, the strongest
    values["no_change"]["mse"][6:] = np.arange(6.0) + 10.0
    values["model"]["mse"][6:] = np.arange(6.0) - 1.0  # better by exactly 1 on every condition
    rows = summarise_subgroups(values, conds, subs, ("no_change", "additive"), 300, 0)
    r = _row(rows, "combo_seen2", "model", "mse")
    assert r["best_baseline"] == "additive" and r["diff"] == pytest.approx(-1.0)
    assert r["diff_lo"] == pytest.approx(-1.0) and r["diff_hi"] == pytest.approx(-1.0)
    assert _verdict(pd.Series(r), True) == "the model is better"
    values["model"]["mse"][[6, 7]] = np.nan  # 4 defined: the same consistent gap, no claim
    rows = summarise_subgroups(values, conds, subs, ("no_change", "additive"), 300, 0)
    r = _row(rows, "combo_seen2", "model", "mse")
    assert r["diff"] == pytest.approx(-1.0) and r["n_undefined"] == 2
    assert math.isnan(r["lo"]) and math.isnan(r["diff_lo"]) and math.isnan(r["diff_hi"])
    assert not math.isnan(_row(rows, "combo_seen2", "additive", "mse")["lo"])  # 6 defined
    assert _verdict(pd.Series(r), True) == "undecided (an interval needs 5 conditions, 4 defined)"


def test_strongest_baseline_is_compared_on_the_same_conditions():
    """A baseline undefined on the hard conditions must not win on the easy ones: 'a' is
    defined only where both do well (and is better there than 'b' is overall), but on those
    conditions 'b' is better; a baseline undefined everywhere is never chosen."""
    from evoformer.perturb.metrics import strongest

    nan = math.nan
    values = {
        "a": {"pearson_delta": np.array([0.80, 0.70, nan, nan])},
        "b": {"pearson_delta": np.array([0.90, 0.85, 0.10, 0.00])},
        "c": {"pearson_delta": np.full(4, nan)},
    }
    idx = np.arange(4)
    # means over each one's own conditions would pick 'a' (0.75 vs 0.4625)
    assert strongest(values, "pearson_delta", idx, ("a", "b", "c"), sign=-1.0) == "b"
    assert strongest(values, "pearson_delta", idx, ("c",), sign=-1.0) is None
    # no condition where both are defined: each on its own conditions
    values["a"]["pearson_delta"] = np.array([nan, nan, 0.5, 0.4])
    values["b"]["pearson_delta"] = np.array([0.9, 0.1, nan, nan])
    assert strongest(values, "pearson_delta", idx, ("a", "b"), sign=-1.0) == "b"
