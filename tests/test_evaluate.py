"""Evaluation: metric definitions by hand, training-cells-only baselines and probes, determinism."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from evoformer.data.arrays import BinnedData, write_token_expression
from evoformer.errors import InputError
from evoformer.evaluate import (
    GeneBaseline,
    attention_gene_scores,
    classification_metrics,
    evaluate,
    gene_bin_counts,
    paired_model_differences,
    pearson,
    value_metrics,
)
from evoformer.metrics import EXPR_METRICS
from evoformer.model import BioFormer, ModelConfig, fixed_mask
from evoformer.tasks.masked import label_codes, select_rows

ROOT = Path(__file__).resolve().parents[1]
N_GENES, N_BINS = 10, 5
LABELS = ("B", "NK", "T")
TINY = {
    "c_m": 8,
    "c_z": 4,
    "c_opm": 2,
    "n_heads_msa": 2,
    "c_hidden_msa": 4,
    "n_blocks": 1,
    "dropout_msa": 0.0,
    "dropout_pair": 0.0,
}
FAST = {"umap": False, "batch_size": 5, "knn_k": 3, "mask_ratio": 0.3, "n_bootstrap": 50}


# ----------------------------------------------------------------------------- fixtures
def write_binned(
    folder: Path,
    values: np.ndarray,
    gene_index: np.ndarray,
    cells: pd.DataFrame,
    x: np.ndarray,
) -> Path:
    """A binned folder in the format of ``evoformer.data.binning.bin_h5ad``; ``x [n, G]`` is the
    log1p expression behind the bins (the token expression, and per-cell quantile edges)."""
    folder.mkdir(parents=True)
    n, length = values.shape
    np.save(folder / "values.npy", values.astype(np.uint8))
    np.save(folder / "gene_index.npy", gene_index.astype(np.int16))
    edges = np.zeros((n, N_BINS - 1), np.float32)
    for i in range(n):
        nz = x[i][x[i] > 0]
        if nz.size:
            edges[i] = np.quantile(nz, np.linspace(0, 1, N_BINS - 1))
    np.save(folder / "edges.npy", edges)
    genes = np.broadcast_to(gene_index, values.shape)
    expr = np.where(genes >= 0, x[np.arange(n)[:, None], np.maximum(genes, 0)], 0.0)
    write_token_expression(folder, expr)
    cells.to_csv(folder / "cells.tsv", sep="\t", index=False)
    pd.DataFrame({"gene_id": [f"g{i}" for i in range(N_GENES)]}).to_csv(
        folder / "genes.tsv", sep="\t", index=False
    )
    include_zero = gene_index.shape[0] == 1
    meta = {
        "n_cells": n,
        "n_genes": N_GENES,
        "n_bins": N_BINS,
        "include_zero_genes": include_zero,
        "max_len": length,
        "dtype": "uint8",
        "gene_index_dtype": "int16",
        "gene_index_shape": list(gene_index.shape),
        "tie_mode": "random",
        "seed": 0,
        "n_empty_cells": 0,
        "mean_nonzero_per_cell": float((values > 0).sum(1).mean()),
        "source": "synthetic",
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def write_hvg(path: Path, x: np.ndarray, cells: pd.DataFrame) -> Path:
    import anndata as ad
    import scipy.sparse as sp

    obs = pd.DataFrame(index=pd.Index(cells["cell_id"].astype(str)))
    if "label" in cells:
        obs["label"] = cells["label"].to_numpy()
    var = pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)])
    ad.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs, var=var).write_h5ad(path)
    return path


def write_model(path: Path, cfg: dict, n_labels: int = 0, seed: int = 0) -> Path:
    """An initialised (untrained) model saved in evoformer.train's model.pt format."""
    torch.manual_seed(seed)
    mc = ModelConfig.from_dict(cfg)
    model = BioFormer(mc, n_genes=N_GENES, n_bins=N_BINS, n_labels=n_labels)
    torch.save(
        {
            "model": model.state_dict(),
            "model_config": mc.to_dict(),
            "n_genes": N_GENES,
            "n_bins": N_BINS,
            "n_labels": n_labels,
            "label_names": list(LABELS) if n_labels else [],
            "train_config": {"mask_ratio": 0.3},
        },
        path,
    )
    return path


def make_dataset(d: Path, labelled: bool = True, include_zero: bool = True) -> dict[str, Path]:
    """72 cells (24 per label), 10 genes, 5 bins; label-dependent expression; 12 test cells."""
    rng = np.random.default_rng(0)
    n = 72
    lab = np.repeat(np.arange(3), 24)
    rng.shuffle(lab)
    centre = np.array(
        [
            [4, 3, 0, 1, 2, 0, 1, 3, 0, 2],
            [0, 1, 4, 3, 1, 2, 0, 1, 3, 0],
            [2, 0, 1, 0, 4, 3, 2, 0, 1, 4],
        ]
    )
    values = np.clip(centre[lab] + rng.integers(-1, 2, size=(n, N_GENES)), 0, N_BINS - 1)
    cells = pd.DataFrame({"cell_id": [f"c{i:02d}" for i in range(n)]})
    if labelled:
        cells["label"] = [LABELS[i] for i in lab]
    if include_zero:
        gene_index = np.arange(N_GENES)[None, :]
        vals = values
    else:  # each cell keeps its non-zero genes, padded with -1
        length = int((values > 0).sum(1).max())
        gene_index = np.full((n, length), -1)
        vals = np.zeros((n, length), np.int64)
        for i in range(n):
            g = np.flatnonzero(values[i])
            gene_index[i, : len(g)] = g
            vals[i, : len(g)] = values[i, g]
    split = np.array(["train"] * 48 + ["val"] * 12 + ["test"] * 12)
    split_df = pd.DataFrame({"cell_id": cells["cell_id"], "split": split, "fold": np.arange(n) % 2})
    split_df.loc[split_df["split"] == "test", "fold"] = -1
    if labelled:
        split_df.insert(1, "label", cells["label"])
    split_df.to_csv(d / "split.tsv", sep="\t", index=False)
    x = np.log1p(values * 1.5 + rng.random((n, N_GENES)) * (values > 0))
    return {
        "binned": write_binned(d / "binned", vals, gene_index, cells, x),
        "split": d / "split.tsv",
        "hvg": write_hvg(d / "hvg.h5ad", x, cells),
        "values": values,
    }


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ds")
    out = make_dataset(d)
    out["model"] = write_model(d / "model.pt", TINY)
    return out


# ----------------------------------------------------------------------------- metric definitions
def test_value_metrics_by_hand() -> None:
    true = np.array([0, 1, 2, 4, 3])
    pred_bin = np.array([0, 2, 2, 4, 1])
    pred_value = np.array([0.5, 1.5, 2.0, 3.0, 1.0])
    logp = np.log(np.array([0.5, 0.25, 0.8, 0.4, 0.1]))
    m = value_metrics(true, pred_bin, pred_value, logp)
    assert m["n"] == 5 and m["n_nonzero"] == 4
    assert m["bin_acc"] == pytest.approx(3 / 5)
    assert m["ce"] == pytest.approx(
        -(math.log(0.5) + math.log(0.25) + math.log(0.8) + math.log(0.4) + math.log(0.1)) / 5
    )
    assert m["mse"] == pytest.approx((0.25 + 0.25 + 0 + 1 + 4) / 5)
    # relative error over the non-zero true bins only: |1.5-1|/1, 0/2, 1/4, 2/3
    assert m["mre"] == pytest.approx((0.5 + 0 + 0.25 + 2 / 3) / 4)
    xm, ym = pred_value - pred_value.mean(), true - true.mean()
    assert m["pearson"] == pytest.approx((xm @ ym) / math.sqrt((xm @ xm) * (ym @ ym)))
    assert m["pearson"] == pytest.approx(np.corrcoef(pred_value, true)[0, 1])
    no_dist = value_metrics(true, pred_bin, pred_value, None)
    assert math.isnan(no_dist["ce"]) and no_dist["mse"] == m["mse"]
    assert math.isnan(value_metrics([0, 0], [0, 0], [0.1, 0.2], None)["mre"])  # no non-zero bins
    assert math.isnan(value_metrics([], [], [], None)["bin_acc"])


def test_pearson_and_classification_metrics_by_hand() -> None:
    assert math.isnan(pearson(np.ones(4), np.arange(4)))
    assert pearson(np.arange(4), 2 * np.arange(4) + 1) == pytest.approx(1.0)
    m = classification_metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]))
    assert m["accuracy"] == pytest.approx(2 / 4)
    # per-class F1: class 0: p=1, r=.5 -> 2/3; class 1: p=1/3, r=1 -> .5; class 2: 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)


def test_gene_baseline_by_hand() -> None:
    counts = np.array([[2, 1, 0], [0, 0, 0], [0, 3, 1]])
    b = GeneBaseline.from_counts(counts)
    assert b.mean[0] == pytest.approx(1 / 3) and b.mean[2] == pytest.approx(5 / 4)
    assert list(b.mode) == [0, 1, 1]  # gene 1 unseen: pooled histogram [2, 4, 1] -> bin 1
    assert b.mean[1] == pytest.approx((4 + 2) / 7)
    assert np.exp(b.log_prob[0]) == pytest.approx(np.array([3, 2, 1]) / 6)  # add-one smoothing
    p = b.predict(np.array([2, 0]), np.array([3 - 1, 0]))
    assert list(p["pred_bin"]) == [1, 0]
    assert p["log_prob_true"] == pytest.approx(np.log([2 / 7, 3 / 6]))


@pytest.mark.parametrize("include_zero", [True, False])
def test_gene_bin_counts_use_only_given_rows(tmp_path: Path, include_zero: bool) -> None:
    d = make_dataset(tmp_path, include_zero=include_zero)
    data = BinnedData.open(d["binned"])
    rows = np.array([5, 1, 30])
    counts = gene_bin_counts(data, rows, N_GENES, N_BINS, chunk=2)
    expect = np.zeros((N_GENES, N_BINS), np.int64)
    for r in rows:
        for g in range(N_GENES):
            if include_zero or d["values"][r, g] > 0:
                expect[g, d["values"][r, g]] += 1
    assert (counts == expect).all()


# ----------------------------------------------------------------------------- evaluate()
def test_model_metrics_match_bioformer_loss(ds: dict, tmp_path: Path) -> None:
    """CE and bin accuracy equal BioFormer's own loss terms on the same masks (S = 1)."""
    res = evaluate(ds["model"], ds["binned"], ds["split"], ds["hvg"], tmp_path, {**FAST, "seed": 7})
    m = res["metrics"]
    data = BinnedData.open(ds["binned"])
    test_ids = set(pd.read_csv(ds["split"], sep="\t").query("split == 'test'")["cell_id"])
    rows = np.flatnonzero(data.cells["cell_id"].isin(test_ids).to_numpy())
    model = BioFormer(ModelConfig.from_dict(TINY), n_genes=N_GENES, n_bins=N_BINS)
    model.load_state_dict(torch.load(ds["model"], weights_only=True)["model"])
    model.eval()
    values = torch.as_tensor(np.asarray(data.values[rows], np.int64))[:, None, :]
    gene_ids = torch.arange(N_GENES).expand_as(values)
    pad = torch.ones_like(values, dtype=torch.bool)
    masked_values, loss_mask = fixed_mask(values, pad, 0.3, N_BINS, 7, -2, np.arange(len(rows)))
    batch = {
        "gene_ids": gene_ids,
        "pad_mask": pad,
        "values": masked_values,
        "target": values,
        "loss_mask": loss_mask,
    }
    with torch.no_grad():
        _, ref = model.loss(batch)
    assert m["n_masked"] == int(batch["loss_mask"].sum()) == 12 * 3  # round(0.3 * 10) per cell
    assert m["model_bin_ce"] == pytest.approx(ref["value_loss"], rel=1e-5)
    assert m["model_bin_acc"] == pytest.approx(ref["bin_acc"], rel=1e-6)
    for k in ("model_bin_mse", "model_bin_pearson", "model_bin_mre", "mean_bin_ce", "mean_bin_mre"):
        assert m[k] is not None and math.isfinite(m[k]), k
    # expression space: every predictor on the same positions, with intervals
    for who in ("model", "mean", "ridge", "knn"):
        for k in ("expr_mse", "expr_mse_nonzero", "expr_pearson", "expr_auroc_zero"):
            v, lo, hi = m[f"{who}_{k}"], m[f"{who}_{k}_lo"], m[f"{who}_{k}_hi"]
            assert v is not None and lo <= v <= hi, (who, k, lo, v, hi)
    assert m["best_baseline_expr_mse"] in ("mean", "ridge", "knn")
    best = m["best_baseline_expr_mse"]
    assert m["diff_expr_mse"] == pytest.approx(m["model_expr_mse"] - m[f"{best}_expr_mse"])


def test_baseline_uses_training_cells_only(tmp_path: Path) -> None:
    """Train cells: every bin 1; val: bin 2; test: bin 3. A leak-free baseline predicts 1."""
    d = make_dataset(tmp_path)
    split = pd.read_csv(d["split"], sep="\t")
    data_dir = d["binned"]
    vals = np.load(data_dir / "values.npy")
    vals[(split["split"] == "train").to_numpy()] = 1
    vals[(split["split"] == "val").to_numpy()] = 2
    vals[(split["split"] == "test").to_numpy()] = 3
    np.save(data_dir / "values.npy", vals)
    model = write_model(tmp_path / "model.pt", TINY)
    m = evaluate(model, data_dir, d["split"], d["hvg"], tmp_path / "holdout", FAST)["metrics"]
    assert m["mean_bin_acc"] == 0.0 and m["mean_bin_mse"] == pytest.approx(4.0)
    assert m["mean_bin_mre"] == pytest.approx(2 / 3)
    # CV fold 0 trains on train+val outside fold 0: bins 1 and 2 -> mean in (1, 2), still not 3
    m0 = evaluate(model, data_dir, d["split"], d["hvg"], tmp_path / "f0", {**FAST, "fold": 0})[
        "metrics"
    ]
    fold0 = split[split["split"].isin(["train", "val"]) & (split["fold"] != 0)]
    mean = np.where(fold0["split"] == "train", 1, 2).mean()
    assert m0["mean_bin_mse"] == pytest.approx((3 - mean) ** 2)


def test_probes_train_on_training_cells_only(
    ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anndata as ad

    import evoformer.evaluate as ev

    seen: list[tuple[int, np.ndarray, int]] = []
    real = ev.probe

    def spy(x_train, y_train, x_test, y_test, knn_k, seed):
        seen.append((len(x_train), y_train.copy(), len(x_test)))
        return real(x_train, y_train, x_test, y_test, knn_k, seed)

    monkeypatch.setattr(ev, "probe", spy)
    res = evaluate(ds["model"], ds["binned"], ds["split"], ds["hvg"], tmp_path, {**FAST, "fold": 1})
    data = BinnedData.open(ds["binned"])
    split = pd.read_csv(ds["split"], sep="\t")
    train_rows = select_rows(split, data.cells, 1, False)["train"]
    labels, names = label_codes(data.cells)
    assert len(seen) == 3  # cls, mean, pca
    for n_train, y_train, n_test in seen:
        assert n_train == len(train_rows) == 30 and n_test == 12
        assert (y_train == labels[train_rows]).all()
    emb = ad.read_h5ad(tmp_path / "embeddings.h5ad")
    roles = emb.obs["role"].astype(str)
    test_ids = set(split.loc[split["split"] == "test", "cell_id"])
    assert set(emb.obs_names[roles == "test"]) == test_ids
    assert set(emb.obs_names[roles == "probe_train"]) == set(data.cells["cell_id"].iloc[train_rows])
    assert emb.obsm["X_cls"].shape == (42, TINY["c_m"]) and emb.obsm["X_mean"].shape == (
        42,
        TINY["c_m"],
    )
    assert res["details"]["probe_status"] == "ok" and names == list(LABELS)
    # label-dependent expression: the PCA baseline separates the classes
    assert res["metrics"]["probe_pca_logreg_accuracy"] >= 0.9
    for rep in ("cls", "mean", "pca"):
        for clf in ("logreg", "knn"):
            for k in ("accuracy", "macro_f1"):
                assert 0 <= res["metrics"][f"probe_{rep}_{clf}_{k}"] <= 1


def test_deterministic_and_umap(ds: dict, tmp_path: Path) -> None:
    import anndata as ad

    params = {"knn_k": 3, "n_bootstrap": 100}
    a = evaluate(ds["model"], ds["binned"], ds["split"], ds["hvg"], tmp_path / "a", params)
    b = evaluate(
        ds["model"],
        ds["binned"],
        ds["split"],
        ds["hvg"],
        tmp_path / "b",
        {**params, "batch_size": 4},
    )
    assert (tmp_path / "a" / "eval_metrics.json").read_bytes() == (
        tmp_path / "b" / "eval_metrics.json"
    ).read_bytes()
    assert a == b
    assert (tmp_path / "a" / "umap.png").read_bytes()[:4] == b"\x89PNG"
    emb = ad.read_h5ad(tmp_path / "a" / "embeddings.h5ad")
    test = (emb.obs["role"] == "test").to_numpy()
    assert (
        np.isfinite(emb.obsm["X_umap_cls"][test]).all()
        and np.isnan(emb.obsm["X_umap_cls"][~test]).all()
    )
    emb_b = ad.read_h5ad(tmp_path / "b" / "embeddings.h5ad")
    assert np.array_equal(emb.obsm["X_umap_mean"][test], emb_b.obsm["X_umap_mean"][test])


def test_unlabelled_data_skips_probes(tmp_path: Path) -> None:
    d = make_dataset(tmp_path, labelled=False, include_zero=False)
    model = write_model(tmp_path / "model.pt", TINY)
    res = evaluate(model, d["binned"], d["split"], d["hvg"], tmp_path / "out", FAST)
    assert res["details"]["probe_status"].startswith("skipped")
    assert res["metrics"]["probe_cls_logreg_accuracy"] is None
    assert res["metrics"]["model_bin_acc"] is not None
    # padded cells: only real (non-zero here) tokens are masked, so every masked bin is > 0
    assert res["details"]["bin_space"]["model"]["n_nonzero"] == res["metrics"]["n_masked"]
    assert res["metrics"]["n_masked_nonzero"] == res["metrics"]["n_masked"]
    text = (tmp_path / "out" / "eval_metrics.json").read_text()
    assert "NaN" not in text  # strict JSON


def test_mse_model_msa_groups_and_label_head(ds: dict, tmp_path: Path) -> None:
    """S = 5 cells per MSA: 12 test cells padded to 3 whole groups; MSE loss; a label head."""
    cfg = {**TINY, "loss": "mse", "n_cells_per_msa": 5}
    model = write_model(tmp_path / "model.pt", cfg, n_labels=3)
    res = evaluate(model, ds["binned"], ds["split"], ds["hvg"], tmp_path / "out", FAST)
    m = res["metrics"]
    assert m["model_bin_ce"] is None and m["mean_bin_ce"] is not None
    assert m["model_expr_mse"] is not None  # the regression head decodes through the bin values
    assert m["n_masked"] == 12 * 3  # repeated cells completing the last group are not counted
    assert 0 <= m["head_accuracy"] <= 1
    assert res["details"]["n_test_cells"] == 12


def test_bad_input_raises_input_error(ds: dict, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="'evaluation.knn' is unknown"):
        evaluate(ds["model"], ds["binned"], ds["split"], ds["hvg"], tmp_path, {"knn": 3})
    with pytest.raises(InputError, match="batch_size"):
        evaluate(ds["model"], ds["binned"], ds["split"], ds["hvg"], tmp_path, {"batch_size": 0})
    wrong = tmp_path / "wrong.pt"
    d = torch.load(ds["model"], weights_only=True)
    torch.save({**d, "n_genes": N_GENES + 1}, wrong)
    with pytest.raises(InputError, match="genes"):
        evaluate(wrong, ds["binned"], ds["split"], ds["hvg"], tmp_path, FAST)
    with pytest.raises(InputError, match="not found"):
        evaluate(tmp_path / "none.pt", ds["binned"], ds["split"], ds["hvg"], tmp_path, FAST)
    assert not (tmp_path / "eval_metrics.json").exists()


def test_workflow_script(ds: dict, tmp_path: Path) -> None:
    from snakemake.iocontainers import Namedlist

    class Snake:
        pass

    def snake(model: Path, out: Path) -> Snake:
        s = Snake()
        s.scriptdir = str(ROOT / "workflow_scripts")
        s.input = Namedlist(
            fromdict={
                "model": str(model),
                "binned": str(ds["binned"] / "meta.json"),
                "split": str(ds["split"]),
                "hvg": str(ds["hvg"]),
            }
        )
        s.output = Namedlist(
            fromdict={
                k: str(out / n)
                for k, n in (("metrics", "m.json"), ("embeddings", "e.h5ad"), ("umap", "u.png"))
            }
        )
        s.params = Namedlist(fromdict={"fold": "final", "eval": FAST})
        s.log = Namedlist(fromdict={"log": str(out / "evaluate.log")})
        return s

    script = str(ROOT / "workflow_scripts" / "evaluate.py")
    runpy.run_path(script, init_globals={"snakemake": snake(ds["model"], tmp_path / "ok")})
    res = json.loads((tmp_path / "ok" / "m.json").read_text())
    assert res["details"]["final"] is True and res["details"]["n_train_cells"] == 60
    with pytest.raises(SystemExit):
        runpy.run_path(
            script, init_globals={"snakemake": snake(tmp_path / "none.pt", tmp_path / "bad")}
        )
    log = (tmp_path / "bad" / "evaluate.log").read_text().strip().splitlines()
    lines = [line for line in log if line.startswith("error: ")]
    assert len(lines) == 1 and "none.pt" in lines[0]


def test_attention_scores_include_a_prior_networks_bias(ds: dict) -> None:
    """Mode bias adds the prior's bias to the row attention: the scores must see it (a strong
    bias on three prior edges pulls their rows' attention onto them)."""
    data = BinnedData.open(ds["binned"])
    prior = torch.zeros(N_GENES, N_GENES)
    edges = [(0, 5), (3, 8), (2, 7)]
    for s, t in edges:
        prior[s, t] = 1.0
    torch.manual_seed(0)
    model = BioFormer(
        ModelConfig.from_dict(TINY), N_GENES, N_BINS, prior=prior, prior_mode="bias"
    ).eval()
    rows, cpu = np.arange(12), torch.device("cpu")
    before = attention_gene_scores(model, data, rows, cpu, 5)
    with torch.no_grad():
        model.prior_bias.weight[:, [1, 3]] = 20.0  # edge present, either direction
    after = attention_gene_scores(model, data, rows, cpu, 5)
    for s, t in edges:
        assert after[s, t] > 0.9 > before[s, t] + 0.5, (s, t, after[s, t], before[s, t])
    others = np.ones((N_GENES, N_GENES), bool)
    for s, t in edges:
        others[[s, t], :] = others[:, [s, t]] = False
    np.testing.assert_allclose(after[others], before[others], atol=1e-6)  # other rows unchanged


def test_paired_model_differences_match_the_evaluation(ds: dict, tmp_path: Path) -> None:
    """Each model scores as its evaluation does (same masks, same resamples); the differences
    are paired: a model against itself differs by exactly 0."""
    other = write_model(tmp_path / "other.pt", TINY, seed=1)
    models = {"a": (ds["model"], None), "b": (other, None), "a_again": (ds["model"], None)}
    out = paired_model_differences(models, ds["binned"], ds["split"], "a", FAST)
    for name, path in (("a", ds["model"]), ("b", other)):
        ev = evaluate(path, ds["binned"], ds["split"], ds["hvg"], tmp_path / name, FAST)["metrics"]
        for m in EXPR_METRICS:
            for k, suffix in (("value", ""), ("lo", "_lo"), ("hi", "_hi")):
                assert out[name][m][k] == pytest.approx(ev[f"model_{m}{suffix}"], nan_ok=True)
    d = out["diff:b"]["expr_mse"]
    assert d["value"] == pytest.approx(
        out["a"]["expr_mse"]["value"] - out["b"]["expr_mse"]["value"]
    )
    assert d["lo"] < d["value"] < d["hi"]
    assert out["diff:a_again"]["expr_mse"] == {"value": 0.0, "lo": 0.0, "hi": 0.0}
    with pytest.raises(InputError, match="reference 'c' is not among the models"):
        paired_model_differences(models, ds["binned"], ds["split"], "c", FAST)
