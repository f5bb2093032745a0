"""The model learns: on data with a planted gene regulatory network (the answer is known) a
short training must beat the per-gene mean on masked non-zero expression, with a bootstrap
interval that excludes zero, and its attention must point at the planted edges.

A smaller version of ``configs/planted.yaml`` (whose full results are in RESULTS.md), run
through the package API: planted data -> HVG -> binning -> split -> training (early stopping,
best weights) -> evaluation against the baselines. It fails when the model does not learn
(e.g. with a learning rate of 1e-6 it stays at the per-gene mean).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PLANTED = {"n_cells": 1500, "n_genes": 32, "seed": 0}
MODEL = {
    "preset": "bioformer",
    "c_m": 32,
    "c_z": 8,
    "c_opm": 4,
    "n_heads_msa": 2,
    "c_hidden_msa": 16,
    "n_blocks": 2,
    "dropout_msa": 0.0,
}
TRAIN = {
    "micro_batch_size": 16,
    "global_batch_size": 32,
    "epochs": 10,
    "lr": 3e-3,
    "warmup_steps": 20,
    "val_every": 38,
    "patience": 4,
    "log_every": 50,
    "seed": 0,
}


def test_the_model_learns_planted_gene_gene_structure(tmp_path: Path) -> None:
    from evoformer.data import binning, hvg, split
    from evoformer.data.planted import write_planted
    from evoformer.evaluate import evaluate
    from evoformer.train import train

    h5ad = tmp_path / "planted.h5ad"
    write_planted(h5ad, PLANTED)
    ds = {"expression": "X", "value_type": "counts", "label_key": "cell_type"}
    n = PLANTED["n_genes"]
    hvg.run_hvg(
        h5ad, "planted", ds, n, {"flavor": "seurat"},
        tmp_path / "hvg.h5ad", tmp_path / "genes.tsv", tmp_path / "hvg.png",
    )  # fmt: skip
    binning.bin_h5ad(tmp_path / "hvg.h5ad", tmp_path / "binned", n_bins=21, seed=0)
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    split.run_split(
        h5ad, "planted", "cell_type", {"fractions": fractions, "n_folds": 0, "seed": 0},
        tmp_path / "split.tsv",
    )  # fmt: skip
    spec = {"model": MODEL, "train": TRAIN, "fold": -1, "final": False}
    train(tmp_path / "binned", tmp_path / "split.tsv", spec, tmp_path / "out", tmp_path / "ckpt")
    res = evaluate(
        tmp_path / "out" / "model.pt",
        tmp_path / "binned",
        tmp_path / "split.tsv",
        tmp_path / "hvg.h5ad",
        tmp_path / "eval",
        {"umap": False, "n_bootstrap": 300},
        network=tmp_path / "planted_network.tsv",
    )
    m, expr = res["metrics"], res["details"]["expression"]
    summary = json.dumps({k: m[k] for k in m if k.startswith(("model_expr", "mean_expr"))})
    # better than the per-gene mean on non-zero masked values, the interval excluding 0
    vs_mean = expr["diff:mean"]["expr_mse_nonzero"]
    assert vs_mean["hi"] < 0, (vs_mean, summary)
    assert m["model_expr_mse_nonzero"] < 0.8 * m["mean_expr_mse_nonzero"], summary
    assert expr["diff:mean"]["expr_mse"]["hi"] < 0, summary
    # the attention maps point at the planted edges far more often than chance
    assert m["grn_model_auprc"] > 2 * m["grn_random_auprc"], (
        m["grn_model_auprc"],
        m["grn_random_auprc"],
    )
