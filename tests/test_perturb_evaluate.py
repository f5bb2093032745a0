"""The perturbation evaluation driver on a small screen written in tmp_path."""

from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from evoformer.errors import InputError
from evoformer.perturb.baselines import BASELINES
from evoformer.perturb.evaluate import PerturbEvalParams, evaluate_perturbation
from evoformer.perturb.metrics import METRICS, SUBGROUP_COLUMNS

N_GENES = 30
GENES = [f"G{i}" for i in range(N_GENES)]
#: condition -> (set, subgroup, cells)
DESIGN = {
    "G0": ("train", "train", 15),
    "G1": ("train", "train", 15),
    "G2": ("train", "train", 15),
    "G3": ("train", "train", 15),
    "G1+G2": ("train", "train", 12),
    "G2+G3": ("val", "combo_seen2", 10),
    "G4": ("test", "unseen_single", 14),
    "G5": ("test", "unseen_single", 9),
    "G0+G1": ("test", "combo_seen2", 11),
    "G0+G4": ("test", "combo_seen1", 10),
    "G4+G5": ("test", "combo_seen0", 8),
}
TEST = sorted(c for c, d in DESIGN.items() if d[0] == "test")
PARAMS = {"n_de": 5, "n_bootstrap": 200, "seed": 3, "linear_components": 3}


def _screen(tmp_path) -> dict:
    """hvg.h5ad, split.tsv and truth.npz of a small screen; returns paths and the cells."""
    rng = np.random.default_rng(0)
    base = rng.uniform(1.5, 3.0, N_GENES)
    single = {}
    for i in range(6):
        d = np.zeros(N_GENES)
        d[i] = -1.2
        d[rng.choice(np.arange(6, N_GENES), 5, replace=False)] = rng.normal(0, 0.6, 5)
        single[f"G{i}"] = d
    delta, inter = {}, {}
    for c in DESIGN:
        parts = c.split("+")
        inter[c] = np.full(N_GENES, np.nan)
        delta[c] = sum(single[g] for g in parts)
        if len(parts) == 2:
            inter[c] = np.zeros(N_GENES)
            if c == "G0+G1":
                inter[c][10:14] = 0.8
            delta[c] = delta[c] + inter[c]
    cells, conds, sets, subs, rows = [], [], [], [], []
    for s, n, shift in (("train", 40, 0.0), ("val", 10, 0.7), ("test", 10, 0.7)):
        # val/test controls are shifted: using them anywhere would change the numbers
        for _ in range(n):
            rows.append(base + shift + rng.normal(0, 0.3, N_GENES))
            conds.append("ctrl"), sets.append(s), subs.append("control")
    for c, (s, sub, n) in DESIGN.items():
        for _ in range(n):
            rows.append(base + delta[c] + rng.normal(0, 0.3, N_GENES))
            conds.append(c), sets.append(s), subs.append(sub)
    x = np.maximum(np.stack(rows), 0).astype(np.float32)
    x[x < 0.4] = 0
    order = rng.permutation(len(x))  # cells of a condition are not contiguous
    x, conds = x[order], [conds[i] for i in order]
    sets, subs = [sets[i] for i in order], [subs[i] for i in order]
    cells = [f"cell{i:03d}" for i in range(len(x))]
    obs = pd.DataFrame({"condition": conds}, index=cells)
    ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=GENES)).write_h5ad(
        tmp_path / "hvg.h5ad"
    )
    split = pd.DataFrame({"cell_id": cells, "condition": conds, "set": sets, "subgroup": subs})
    split.to_csv(tmp_path / "split.tsv", sep="\t", index=False)
    names = list(DESIGN)
    np.savez(
        tmp_path / "screen_truth.npz",
        conditions=np.array(names),
        genes=np.array(GENES),
        delta=np.stack([delta[c] for c in names]).astype(np.float32),
        interaction=np.stack([inter[c] for c in names]).astype(np.float32),
    )
    return {
        "hvg": tmp_path / "hvg.h5ad",
        "split": tmp_path / "split.tsv",
        "truth": tmp_path / "screen_truth.npz",
        "x": x.astype(np.float64),
        "table": split,
    }


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    return _screen(tmp_path_factory.mktemp("screen"))


def _mean(screen, condition, set_=None):
    t = screen["table"]
    keep = (t["condition"] == condition) & ((t["set"] == set_) if set_ else True)
    return screen["x"][keep.to_numpy()].mean(0)


def test_driver_tables_and_byte_identical_rerun(screen, tmp_path):
    perfect = pd.DataFrame([_mean(screen, c) for c in TEST], index=TEST, columns=GENES)
    kw = dict(params=PARAMS, truth_npz=screen["truth"], predictions={"model": perfect})
    details = evaluate_perturbation(screen["hvg"], screen["split"], tmp_path / "a", **kw)
    evaluate_perturbation(screen["hvg"], screen["split"], tmp_path / "b", **kw)
    for name in ("per_condition.tsv", "subgroups.tsv", "details.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    per = pd.read_csv(tmp_path / "a" / "per_condition.tsv", sep="\t")
    metrics = [*METRICS, *(f"truth_{m}" for m in METRICS)]
    assert list(per.columns) == [
        "condition",
        "subgroup",
        "n_cells",
        "method",
        *metrics,
        "perturbed_gene_delta_true",
        "perturbed_gene_delta_pred",
        "perturbed_gene_delta_truth",
        "truth_interaction_msq",
    ]
    assert sorted(set(per["condition"])) == TEST
    assert list(per["method"].unique()) == ["model", *BASELINES]
    by = per.set_index(["condition", "method"])
    assert by.loc[("G4", "oracle"), "n_cells"] == 14
    assert by.loc[("G0+G4", "model"), "subgroup"] == "combo_seen1"
    # the exact model has no error; the oracle is exact against the noise-free truth
    assert (by.xs("model", level="method")["mse"] < 1e-10).all()
    oracle = by.xs("oracle", level="method")
    assert (oracle["truth_mse"] < 1e-10).all() and np.allclose(oracle["truth_pearson_delta"], 1)
    # ctrl = the training controls only (val/test controls are shifted by 0.7)
    ctrl = _mean(screen, "ctrl", "train")
    add = ctrl + (_mean(screen, "G0") - ctrl) + (_mean(screen, "G1") - ctrl)
    keep = np.arange(2, N_GENES)  # G0, G1 left out
    want = np.mean((add[keep] - _mean(screen, "G0+G1")[keep]) ** 2)
    assert by.loc[("G0+G1", "additive"), "mse"] == pytest.approx(want, rel=1e-5)
    # the noise-free interaction's mean square over the scored genes, doubles only
    with np.load(screen["truth"]) as z:
        row = list(z["conditions"]).index("G0+G1")
        genes = [str(g) for g in z["genes"]]
        inter = z["interaction"][row][[genes.index(g) for g in GENES[2:]]]
    msq = by.xs("oracle", level="method")["truth_interaction_msq"]
    assert msq["G0+G1"] == pytest.approx(np.mean(inter.astype(np.float64) ** 2), rel=1e-5)
    assert np.isnan(msq["G4"])
    # undefined stays missing: no_change has no pearson_delta, additive no interaction on G0+G1
    assert by.xs("no_change", level="method")["pearson_delta"].isna().all()
    assert math.isnan(by.loc[("G0+G1", "additive"), "pearson_interaction"])
    assert by.loc[("G0+G1", "model"), "truth_pearson_interaction"] > 0.5

    sub = pd.read_csv(tmp_path / "a" / "subgroups.tsv", sep="\t")
    assert list(sub.columns) == list(SUBGROUP_COLUMNS)
    assert list(sub["subgroup"].unique()) == [
        "unseen_single",
        "combo_seen0",
        "combo_seen1",
        "combo_seen2",
        "all",
    ]
    assert set(sub["best_baseline"].dropna()) <= {
        "no_change",
        "mean_perturbation",
        "additive",
        "linear",
    }
    r = sub[
        (sub["subgroup"] == "all")
        & (sub["method"] == "no_change")
        & (sub["metric"] == "pearson_delta")
    ]
    assert r["n_undefined"].item() == 5 and r["n_conditions"].item() == 5
    r = sub[(sub["subgroup"] == "all") & (sub["metric"] == "truth_pearson_interaction")]
    assert (r["n_conditions"] == 3).all()  # doubles only

    saved = json.loads((tmp_path / "a" / "details.json").read_text())
    assert saved["train_conditions"] == ["G0", "G1", "G1+G2", "G2", "G3"]
    assert saved["n_train_control_cells"] == 40
    assert "G4" not in saved["de_genes"]["G4"] and len(saved["de_genes"]["G4"]) == 5
    fig = saved["figure"]
    assert [f["condition"] for f in fig] == ["G4", "G4+G5", "G0+G4", "G0+G1"]
    assert set(fig[0]["pred_delta"]) == {"model", *BASELINES} and len(fig[0]["true_delta"]) == 5
    assert details["methods"] == saved["methods"]


def test_driver_without_truth(screen, tmp_path):
    evaluate_perturbation(screen["hvg"], screen["split"], tmp_path, {**PARAMS, "n_bootstrap": 0})
    per = pd.read_csv(tmp_path / "per_condition.tsv", sep="\t")
    assert "oracle" not in set(per["method"]) and not any(c.startswith("truth_") for c in per)
    sub = pd.read_csv(tmp_path / "subgroups.tsv", sep="\t")
    assert sub["lo"].isna().all()


def test_driver_refuses_bad_inputs(screen, tmp_path):
    t = screen["table"]
    bad = t.copy()
    bad.loc[bad["condition"] == "G4", "set"] = ["train"] + ["test"] * 13
    bad.to_csv(tmp_path / "leak.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="condition .G4. has cells in several sets"):
        evaluate_perturbation(screen["hvg"], tmp_path / "leak.tsv", tmp_path / "o")
    bad = t.copy()
    bad.loc[bad["condition"] == "ctrl", "set"] = "test"
    bad.to_csv(tmp_path / "noctrl.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="no control cell in training"):
        evaluate_perturbation(screen["hvg"], tmp_path / "noctrl.tsv", tmp_path / "o")
    bad = t.copy()
    bad.loc[0, "condition"] = "G9"
    bad.to_csv(tmp_path / "cond.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="cell 'cell000' has condition 'G9'"):
        evaluate_perturbation(screen["hvg"], tmp_path / "cond.tsv", tmp_path / "o")
    t.drop(columns="subgroup").to_csv(tmp_path / "cols.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="missing columns .*subgroup"):
        evaluate_perturbation(screen["hvg"], tmp_path / "cols.tsv", tmp_path / "o")
    t.iloc[1:].to_csv(tmp_path / "short.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="1 cells of .* missing"):
        evaluate_perturbation(screen["hvg"], tmp_path / "short.tsv", tmp_path / "o")
    partial = pd.DataFrame(0.0, index=TEST[:2], columns=GENES)
    with pytest.raises(InputError, match="predictions\\['m'\\]: missing test conditions"):
        evaluate_perturbation(
            screen["hvg"], screen["split"], tmp_path / "o", predictions={"m": partial}
        )
    assert not (tmp_path / "o").exists()


def test_params_from_dict_names_the_key():
    p = PerturbEvalParams.from_dict({"linear_ridge": "1e-1", "n_de": 10})
    assert p.linear_ridge == 0.1 and p.n_de == 10 and p.linear_components == 10
    with pytest.raises(InputError, match="'perturbation.evaluation.nde' is unknown"):
        PerturbEvalParams.from_dict({"nde": 3})
    with pytest.raises(InputError, match="'pe.n_de': got 0, expected a positive integer"):
        PerturbEvalParams.from_dict({"n_de": 0}, "pe")
    with pytest.raises(InputError, match="linear_ridge"):
        PerturbEvalParams.from_dict({"linear_ridge": 0})
    with pytest.raises(InputError, match="n_bootstrap"):
        PerturbEvalParams.from_dict({"n_bootstrap": 1.5})
