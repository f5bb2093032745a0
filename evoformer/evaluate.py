"""Evaluate one trained BioFormer on the held-out test cells, side by side with honest baselines.

Read top to bottom: parameters -> bin-space metric definitions -> model inference on the test
cells -> masked-value evaluation in expression space (baselines, bootstrap) -> gene-gene scores
-> probes -> UMAP -> :func:`evaluate` (the ``evaluate`` rule's entry point).

1. **Masked-value prediction.** In every test cell ``round(mask_ratio * n_real)`` real gene
   tokens are masked by ``fixed_mask`` (seeded by ``(seed, cell group)`` only: the same positions
   whatever the model, its ``n_bins`` or training settings, or the batch size). Every predictor is
   scored on the same held-out values, the cells' log1p-normalised expression at those positions
   (:mod:`evoformer.metrics`): the model through its decoded prediction, and the baselines of
   :mod:`evoformer.baselines` fitted on the **training cells** only (the cells the model was
   trained on): the per-gene mean, ridge co-expression and kNN. Seeded bootstrap over test cells
   gives 95% intervals for every metric and for the paired difference model - baseline. The
   bin-space metrics of the model and of the per-gene bin histogram are kept, labelled ``bin_``
   (they are not comparable across ``n_bins``).
2. **Gene-gene scores** (with a known network, e.g. planted data): the model's row-attention maps
   averaged over heads, blocks and test cells, and the ridge baseline's |coefficients|, scored by
   AUPRC against the true network.
3. **Cell-label probes** (only when the binned cells have a ``label`` column): a logistic
   regression and a kNN classifier trained on embeddings of the training cells, scored on the
   test cells, for the CLS embedding, the mean-pooled embedding and, as the baseline, PCA of the
   log-normalised HVG expression (PCA fitted on the training cells only).
4. **Label head** (only when the model was trained with ``train.label_head``): its test accuracy.

Outputs: ``eval_metrics.json`` (flat ``metrics`` for the tables + ``details``),
``embeddings.h5ad`` (obs = test cells and the probe's training cells; obsm ``X_cls``, ``X_mean``,
``X_pca``, ``X_umap_cls``/``X_umap_mean`` for test cells) and ``umap.png``.

Deterministic on CPU: fixed mask seeds, no dropout (eval mode), seeded baselines and bootstrap,
sklearn and UMAP with fixed ``random_state``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import evoformer
from evoformer.baselines import BASELINES, fit_baselines
from evoformer.data.arrays import BinnedData
from evoformer.errors import InputError
from evoformer.io import atomic_path, json_safe, write_text_atomic
from evoformer.metrics import (
    EXPR_METRICS,
    LOWER_IS_BETTER,
    Positions,
    Scorer,
    bin_values,
    bootstrap,
)
from evoformer.model import BioFormer, fixed_mask
from evoformer.model.saved import load_model
from evoformer.tasks.masked import CellBatches, label_codes, select_rows
from evoformer.typed import from_plain

log = logging.getLogger("evoformer.evaluate")

#: ``mask_generator`` tag of the evaluation masks (training uses epochs >= 0, validation -1).
EVAL_MASK_TAG = -2
#: Representations the probes are trained on; ``pca`` is the baseline.
PROBE_REPS = ("cls", "mean", "pca")
PROBE_CLASSIFIERS = ("logreg", "knn")
VALUE_METRICS = ("bin_acc", "ce", "mse", "pearson", "mre")
#: Predictors of the expression-space evaluation: the model, then the baselines.
PREDICTORS = ("model", *BASELINES)


# ----------------------------------------------------------------------------- parameters
@dataclass
class EvalParams:
    """Settings of one evaluation (the config's ``evaluation:`` section plus the run's fold).

    Attributes:
        mask_ratio: fraction of each test cell's real tokens to mask (also the validation mask
            during training: every grid point is scored on the same positions).
        seed: seed of the test masks, the baselines, the bootstrap, the probe subsample, sklearn
            and UMAP.
        batch_size: cell groups per forward pass.
        n_bootstrap: bootstrap resamples of the test cells for the 95% intervals.
        max_baseline_train_cells: training cells the ridge / kNN baselines are fitted on at most
            (a seeded subsample; the per-gene mean uses all of them).
        gene_score_cells: test cells whose attention maps are averaged into gene-gene scores.
        knn_k: neighbours of the kNN probe (capped at the number of training cells).
        n_pcs: components of the PCA baseline (capped by cells and genes).
        fold: the model's fold: -1 = holdout (trained on ``split == train``), k >= 0 = CV fold k
            (trained on train+val cells outside fold k). Chooses the "training cells".
        final: the model is the retrain on all train+val cells.
        max_probe_train_cells: training cells the probes see at most (seeded subsample).
        umap: compute the UMAP of test embeddings (``umap.png`` says so when off).
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available).
    """

    mask_ratio: float = 0.15
    seed: int = 0
    batch_size: int = 32
    n_bootstrap: int = 1000
    max_baseline_train_cells: int = 20000
    gene_score_cells: int = 500
    knn_k: int = 15
    n_pcs: int = 50
    fold: int = -1
    final: bool = False
    max_probe_train_cells: int = 10000
    umap: bool = True
    device: str = "cpu"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "evaluation") -> EvalParams:
        """Build from plain params; an unknown key or bad value raises ``InputError`` naming it."""
        d = dict(d or {})
        if d.get("fold") in ("holdout", None):
            d["fold"] = -1
        elif d.get("fold") == "final":
            d["fold"], d["final"] = -1, True
        p = from_plain(cls, d, where)
        p.validate(where)
        return p

    def validate(self, where: str = "evaluation") -> None:
        def bad(key: str, what: str) -> InputError:
            return InputError(f"config key '{where}.{key}': got {getattr(self, key)!r}, {what}")

        if not 0 < self.mask_ratio < 1:
            raise bad("mask_ratio", "expected a number in (0, 1)")
        if self.seed < 0:
            raise bad("seed", "expected an integer >= 0")
        positive = (
            "batch_size",
            "knn_k",
            "n_pcs",
            "max_probe_train_cells",
            "max_baseline_train_cells",
            "gene_score_cells",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise bad(key, "expected a positive integer")
        if self.n_bootstrap < 0:
            raise bad("n_bootstrap", "expected an integer >= 0 (0: no intervals)")
        if self.fold < -1:
            raise bad("fold", "expected -1 (holdout), a fold index >= 0, 'holdout' or 'final'")
        if self.device not in ("cpu", "cuda", "auto"):
            raise bad("device", "expected cpu, cuda or auto")


# ----------------------------------------------------------------------------- metric definitions
def value_metrics(
    true: np.ndarray,
    pred_bin: np.ndarray,
    pred_value: np.ndarray,
    log_prob_true: np.ndarray | None,
) -> dict[str, float]:
    """Masked-value metrics over ``M`` masked positions.

    Args:
        true: ``[M]`` true bins (ints in ``[0, K)``).
        pred_bin: ``[M]`` predicted bin (CE model: argmax of the logits; MSE model: the
            predicted value rounded and clipped to ``[0, K-1]``; baseline: the gene's modal bin).
        pred_value: ``[M]`` predicted bin value as a real number (CE model: the expected bin
            ``sum_k k p_k`` under the softmax; MSE model: the regression output; baseline: the
            gene's mean bin).
        log_prob_true: ``[M]`` natural-log probability given to the true bin, or None when the
            predictor has no distribution (MSE model).

    Returns:
        ``bin_acc`` = mean(pred_bin == true); ``ce`` = -mean(log_prob_true) (nats);
        ``mse`` = mean((pred_value - true)^2); ``pearson`` = Pearson correlation of pred_value and
        true over the masked positions (NaN when either is constant); ``mre`` = masked relative
        error as BioFormer / scGPT define it, ``mean(|pred_value - true| / true)``, taken over the
        masked positions whose true bin is non-zero (scGPT divides by ``true + 1e-6``, which
        explodes on zero-expression positions; restricting to ``true > 0`` keeps it finite);
        ``n`` and ``n_nonzero``: the positions counted. Empty input gives NaN metrics.
    """
    true = np.asarray(true, dtype=np.float64)
    pred_bin = np.asarray(pred_bin, dtype=np.float64)
    pred_value = np.asarray(pred_value, dtype=np.float64)
    n = true.size
    nz = true > 0
    out: dict[str, float] = {"n": float(n), "n_nonzero": float(nz.sum())}
    if n == 0:
        return {**out, **dict.fromkeys(VALUE_METRICS, math.nan)}
    out["bin_acc"] = float(np.mean(pred_bin == true))
    out["ce"] = (
        math.nan
        if log_prob_true is None
        else float(-np.mean(np.asarray(log_prob_true, np.float64)))
    )
    out["mse"] = float(np.mean((pred_value - true) ** 2))
    out["pearson"] = pearson(pred_value, true)
    out["mre"] = (
        float(np.mean(np.abs(pred_value[nz] - true[nz]) / true[nz])) if nz.any() else math.nan
    )
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two ``[M]`` vectors; NaN when M < 2 or either is constant."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / den if den > 0 else math.nan


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """``accuracy`` and ``macro_f1`` (unweighted mean of per-class F1 over the classes present in
    ``y_true`` or ``y_pred``; a class never predicted has F1 0)."""
    from sklearn.metrics import accuracy_score, f1_score

    if len(y_true) == 0:
        return {"accuracy": math.nan, "macro_f1": math.nan}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


# ----------------------------------------------------------------------------- bin-space baseline
def gene_bin_counts(
    data: BinnedData, rows: np.ndarray, n_genes: int, n_bins: int, chunk: int = 4096
) -> np.ndarray:
    """``[G, K]`` int64 histogram of the bins of every gene over the cells ``rows`` (real tokens).

    Reads the memory-mapped arrays in chunks of ``chunk`` cells (bounded memory on large data).
    """
    counts = np.zeros(n_genes * n_bins, dtype=np.int64)
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    gi = data.gene_index
    for i in range(0, len(rows), chunk):
        r = rows[i : i + chunk]
        values = np.asarray(data.values[r], dtype=np.int64)  # [c, L]
        genes = np.asarray(
            gi[r] if gi.shape[0] > 1 else np.broadcast_to(gi, values.shape), np.int64
        )
        real = genes >= 0
        counts += np.bincount(genes[real] * n_bins + values[real], minlength=n_genes * n_bins)
    return counts.reshape(n_genes, n_bins)


@dataclass
class GeneBaseline:
    """Per-gene predictors from the training cells' bin histogram ``counts [G, K]``.

    ``mean [G]`` mean bin, ``mode [G]`` modal bin (lowest on ties), ``log_prob [G, K]`` log of the
    add-one smoothed frequencies ``(c_gk + 1) / (n_g + K)``. Genes never seen in the training
    cells use the pooled histogram of all genes.
    """

    mean: np.ndarray
    mode: np.ndarray
    log_prob: np.ndarray

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> GeneBaseline:
        counts = np.asarray(counts, dtype=np.float64)
        g, k = counts.shape
        unseen = counts.sum(1) == 0
        if unseen.any():
            counts = counts.copy()
            counts[unseen] = counts.sum(0)
        n = counts.sum(1)
        bins = np.arange(k, dtype=np.float64)
        mean = np.where(n > 0, counts @ bins / np.maximum(n, 1), 0.0)
        mode = counts.argmax(1)
        log_prob = np.log((counts + 1.0) / (n[:, None] + k))
        return cls(mean=mean, mode=mode, log_prob=log_prob)

    def predict(self, genes: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
        """Predictions for masked positions with gene ids ``genes [M]`` and true bins ``true [M]``."""
        return {
            "pred_bin": self.mode[genes],
            "pred_value": self.mean[genes],
            "log_prob_true": self.log_prob[genes, true],
        }


# ----------------------------------------------------------------------------- model
def padded_rows(rows: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows cycled up to a multiple of the MSA size ``s``; (padded rows, keep [len] bool).

    The repeated cells only complete the last group; ``keep`` marks each cell's first copy.
    """
    n = len(rows)
    total = -(-n // s) * s if n else 0
    padded = np.resize(rows, total) if n else rows
    keep = np.arange(total) < n
    return padded, keep


def held_out_rows(split: pd.DataFrame, cells: pd.DataFrame) -> np.ndarray:
    """Row indices (into the binned arrays) of the ``split == test`` cells, in binned order."""
    test_ids = set(split.loc[split["split"] == "test", "cell_id"].astype(str))
    return np.flatnonzero(cells["cell_id"].astype(str).isin(test_ids).to_numpy())


@torch.no_grad()
def run_model(
    model: BioFormer,
    data: BinnedData,
    rows: np.ndarray,
    labels: np.ndarray,
    params: EvalParams,
    device: torch.device,
    with_masks: bool,
) -> dict[str, np.ndarray]:
    """Embeddings (and, with ``with_masks``, masked-value predictions) for the cells ``rows``.

    Returns ``cls``, ``mean`` ``[n, c_m]`` and ``label_pred [n]`` (-1 without a label head), in
    the order of ``rows``. With masks also, per masked position (``M`` of them): ``true`` (bin),
    ``gene``, ``cell`` (index into ``rows``), ``pred_bin``, ``pred_value`` (bin space),
    ``log_prob_true`` (CE models only, else None), ``expr_true`` (log1p value), ``expr_pred``
    (decoded, :meth:`BioFormer.decode_expression`) and ``nonzero_score``; and ``hidden [n, G]``,
    the masked genes of every cell. The mask of group ``i`` is
    ``fixed_mask(..., params.seed, EVAL_MASK_TAG, i)`` at ``params.mask_ratio``.
    """
    s = model.cfg.n_cells_per_msa
    n_bins = model.n_bins
    rows_p, keep = padded_rows(np.asarray(rows), s)
    cells = CellBatches(data, rows_p, labels, s)
    keep = keep.reshape(-1, s)  # [n_groups, S]
    emb: dict[str, list[np.ndarray]] = {"cls": [], "mean": [], "label_pred": []}
    names = (
        "true", "gene", "cell", "pred_bin", "pred_value", "log_prob_true", "expr_true",
        "expr_pred", "nonzero_score",
    )  # fmt: skip
    pos: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for start in range(0, len(cells), params.batch_size):
        items = np.arange(start, min(start + params.batch_size, len(cells)))
        batch = cells.batch(items, truth=with_masks)
        k = torch.as_tensor(keep[items])  # [B, S]
        gene_ids, values, pad = batch["gene_ids"], batch["values"], batch["pad_mask"]
        out = model(gene_ids.to(device), values.to(device), pad.to(device))
        emb["cls"].append(out["cls"].float().cpu()[k].numpy())
        emb["mean"].append(out["mean"].float().cpu()[k].numpy())
        if out.get("label_logits") is not None:
            emb["label_pred"].append(out["label_logits"].float().argmax(-1).cpu()[k].numpy())
        if not with_masks:
            continue
        mv, lm = fixed_mask(
            values, pad, params.mask_ratio, n_bins, params.seed, EVAL_MASK_TAG, items
        )
        lm = lm & k[:, :, None]  # [B, S, L]; repeated cells do not count
        pred = model(gene_ids.to(device), mv.to(device), pad.to(device))["pred"].float().cpu()
        expr, score = model.decode_expression(pred, bin_values(batch["edges"]))
        true = values[lm]
        cell_of = torch.as_tensor(items[:, None] * s + np.arange(s)[None, :])  # [B, S]
        pos["true"].append(true.numpy())
        pos["gene"].append(gene_ids[lm].numpy())
        pos["cell"].append(cell_of[:, :, None].expand_as(lm)[lm].numpy())
        pos["expr_true"].append(batch["expression"][lm].numpy())
        pos["expr_pred"].append(expr[lm].numpy())
        pos["nonzero_score"].append(score[lm].numpy())
        if model.cfg.loss == "ce":
            logp = torch.log_softmax(pred[lm], dim=-1)  # [M, K]
            pos["pred_bin"].append(logp.argmax(-1).numpy())
            bins = torch.arange(n_bins, dtype=logp.dtype)
            pos["pred_value"].append((logp.exp() @ bins).numpy())
            pos["log_prob_true"].append(logp.gather(-1, true[:, None])[:, 0].numpy())
        else:
            v = pred[lm]
            pos["pred_bin"].append(v.round().clamp(0, n_bins - 1).numpy())
            pos["pred_value"].append(v.numpy())

    def cat(parts: list[np.ndarray], dtype: Any, width: int | None = None) -> np.ndarray:
        if parts:
            return np.concatenate(parts).astype(dtype)
        return np.zeros((0,) if width is None else (0, width), dtype)

    c_m = model.cfg.c_m
    result: dict[str, Any] = {
        "cls": cat(emb["cls"], np.float32, c_m),
        "mean": cat(emb["mean"], np.float32, c_m),
        "label_pred": cat(emb["label_pred"], np.int64)
        if emb["label_pred"]
        else np.full(len(rows), -1, np.int64),
    }
    if with_masks:
        for key in names:
            if key != "log_prob_true":
                result[key] = cat(pos[key], np.float64)
        for key in ("true", "gene", "cell"):
            result[key] = result[key].astype(np.int64)
        result["log_prob_true"] = (
            cat(pos["log_prob_true"], np.float64) if model.cfg.loss == "ce" else None
        )
        hidden = np.zeros((len(rows), data.n_genes), bool)
        hidden[result["cell"], result["gene"]] = True
        result["hidden"] = hidden
    return result


# ----------------------------------------------------------------------------- expression space
def dense_expression(data: BinnedData, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x [n, G] float64 log1p expression, real [n, G] bool)`` of the cells ``rows``: real =
    the entries that are tokens (every gene with include_zero_genes, else the non-zero ones)."""
    g = data.n_genes
    x = np.zeros((len(rows), g))
    real = np.zeros((len(rows), g), bool)
    order = np.argsort(rows, kind="stable")
    sorted_rows = np.asarray(rows)[order]
    for i in range(0, len(rows), 4096):
        r = sorted_rows[i : i + 4096]
        genes, _ = data.tokens(r)
        expr = np.asarray(data.expression[r], dtype=np.float64)
        dest = order[i : i + 4096]
        ok = genes >= 0
        rr = np.broadcast_to(dest[:, None], genes.shape)[ok]
        x[rr, genes[ok]] = expr[ok]
        real[rr, genes[ok]] = True
    return x, real


def expression_evaluation(
    res: dict[str, Any],
    x_test: np.ndarray,
    x_train: np.ndarray,
    real_train: np.ndarray,
    params: EvalParams,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, Any]]:
    """Score the model and the baselines on the same masked test positions, with bootstrap.

    Args:
        res: :func:`run_model` output for the test cells (with masks).
        x_test: ``[n_test, G]`` log1p expression of the test cells (the baselines hide
            ``res["hidden"]`` of it).
        x_train, real_train: ``[n_train, G]`` training cells (:func:`dense_expression`).

    Returns:
        ``(intervals, fitted)``: :func:`evoformer.metrics.bootstrap` output (``model``, the
        baselines and ``diff:<baseline>``), and the fitted baselines.
    """
    hidden = res["hidden"]
    fitted = fit_baselines(x_train, real_train, params.mask_ratio, params.seed)
    cell, gene = res["cell"], res["gene"]
    positions = Positions(res["expr_true"], gene, cell, len(x_test))
    scorers = {"model": Scorer(positions, res["expr_pred"], res["nonzero_score"])}
    for name, baseline in fitted.items():
        pred = baseline.predict(x_test, hidden)
        scorers[name] = Scorer(positions, pred[cell, gene])
    return bootstrap(scorers, len(x_test), params.n_bootstrap, params.seed), fitted


def paired_model_differences(
    models: dict[str, tuple[str | os.PathLike, str | os.PathLike | None]],
    binned: str | os.PathLike,
    split: str | os.PathLike,
    reference: str,
    params: dict[str, Any] | EvalParams | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Models trained on the same binned data, compared on the same masked test positions (as
    :func:`evaluate` masks them) with paired bootstrap intervals: does one grid point beat
    another (a prior against none)?

    Args:
        models: name -> (``model.pt``, its prior-network TSV or None).
        binned, split: the binned data folder and ``split.tsv`` the models were trained on.
        reference: the name every other model is compared with (``reference - other``).
        params: :class:`EvalParams` (mask ratio, seed, bootstrap) or its plain dict.

    Returns:
        :func:`evoformer.metrics.bootstrap` output: ``{name: {metric: {value, lo, hi}}}`` and
        ``{"diff:<other>": ...}`` for :data:`evoformer.metrics.EXPR_METRICS`.

    Raises:
        InputError: ``reference`` is not a model, or the models' masked positions differ
            (another ``n_cells_per_msa``).
    """
    if reference not in models:
        raise InputError(f"reference {reference!r} is not among the models ({', '.join(models)})")
    p = params if isinstance(params, EvalParams) else EvalParams.from_dict(params)
    device = torch.device("cpu")
    data = BinnedData.open(binned)
    gene_names = data.genes["gene_id"].astype(str).tolist()
    split_df = pd.read_csv(split, sep="\t", dtype={"cell_id": str})
    labels, _ = label_codes(data.cells)
    test = held_out_rows(split_df, data.cells)
    scorers: dict[str, Scorer] = {}
    positions, where, first = None, None, next(iter(models))
    for name, (path, prior) in models.items():
        model, _ = load_model(path, gene_names, prior)
        res = run_model(model.to(device), data, test, labels, p, device, with_masks=True)
        if positions is None:
            positions = Positions(res["expr_true"], res["gene"], res["cell"], len(test))
            where = (res["cell"], res["gene"])
        elif not (np.array_equal(res["cell"], where[0]) and np.array_equal(res["gene"], where[1])):
            raise InputError(f"{path}: masks other test positions than model {first!r}")
        scorers[name] = Scorer(positions, res["expr_pred"], res["nonzero_score"])
    return bootstrap(scorers, len(test), p.n_bootstrap, p.seed, reference=reference)


def strongest_baselines(intervals: dict[str, dict[str, dict[str, float]]]) -> dict[str, str]:
    """Per expression metric, the baseline with the best point estimate."""
    out = {}
    for m in EXPR_METRICS:
        sign = 1.0 if LOWER_IS_BETTER[m] else -1.0
        values = {b: intervals[b][m]["value"] for b in BASELINES}
        finite = {b: v for b, v in values.items() if math.isfinite(v)}
        out[m] = min(finite, key=lambda b: sign * finite[b]) if finite else BASELINES[0]
    return out


# ----------------------------------------------------------------------------- gene-gene scores
@torch.no_grad()
def attention_gene_scores(
    model: BioFormer, data: BinnedData, rows: np.ndarray, device: torch.device, batch_size: int
) -> np.ndarray:
    """``[G, G]`` gene-gene scores: the row-attention weights between gene tokens (pair bias, a
    prior network's bias and key mask included), averaged over heads, blocks and the cells
    ``rows``, symmetrised.

    The weights are recomputed explicitly from each block's attention input (captured with a
    forward pre-hook), as the fused attention kernel does not return them.
    """
    g = data.n_genes
    total = torch.zeros(g, g, dtype=torch.float64)
    count = torch.zeros(g, g, dtype=torch.float64)
    captured: list[tuple] = []  # (m, z, msa_mask[, attn_bias]) of each block
    ops = [blk.msa_row_attention.op for blk in model.stack.blocks]

    def hook(module: torch.nn.Module, args: tuple) -> None:
        captured.append(args[:4])

    handles = [op.register_forward_pre_hook(hook) for op in ops]
    try:
        cells = CellBatches(data, np.asarray(rows), np.full(len(data), -1), 1)
        for start in range(0, len(cells), batch_size):
            batch = cells.batch(np.arange(start, min(start + batch_size, len(cells))))
            captured.clear()
            model(*(batch[k].to(device) for k in ("gene_ids", "values", "pad_mask")))
            att = sum(_attention_weights(op, *a) for op, a in zip(ops, captured, strict=True))
            att = (att / len(ops)).mean(-3)[:, 0, 1:, 1:].double().cpu()  # [B, L, L] genes
            ids = batch["gene_ids"][:, 0]  # [B, L]
            real = batch["pad_mask"][:, 0]
            pair = (real[:, :, None] & real[:, None, :]).reshape(-1)
            flat = (ids[:, :, None] * g + ids[:, None, :]).reshape(-1)[pair]
            total.view(-1).index_add_(0, flat, att.reshape(-1)[pair])
            count.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    finally:
        for h in handles:
            h.remove()
    scores = (total / count.clamp(min=1)).numpy()
    return (scores + scores.T) / 2


def _attention_weights(
    op: torch.nn.Module,
    m: torch.Tensor,
    z: torch.Tensor | None,
    msa_mask: torch.Tensor,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + pair bias + prior bias + key mask) of one row attention:
    ``[B, S, H, r, r]`` (``attn_bias [B, 1, H, r, r]``: a prior network's bias, mode bias/both)."""
    from evoformer.model.primitives import mask_bias

    mha = op.mha
    h, d = mha.n_heads, mha.c_hidden
    q = mha.linear_q(m).unflatten(-1, (h, d)).transpose(-2, -3)  # [B, S, H, r, d]
    k = mha.linear_k(m).unflatten(-1, (h, d)).transpose(-2, -3)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d)
    logits = logits + mask_bias(msa_mask, torch.float32)[..., None, None, :]
    if z is not None and op.linear_z is not None:
        bias = op.linear_z(op.layer_norm_z(z)).float().movedim(-1, -3).unsqueeze(-4)
        logits = logits + bias
    if attn_bias is not None:
        logits = logits + attn_bias.float()
    return torch.softmax(logits, dim=-1)


def network_recovery(scores: dict[str, np.ndarray], network: str, genes: list[str]) -> dict:
    """AUPRC of each ``[G, G]`` score matrix against the true network (undirected, no diagonal)
    and the random rate."""
    from evoformer.grn import auprc, random_auprc, read_truth

    truth = read_truth(network, genes)
    out = {"random_auprc": random_auprc(truth)}
    for name, sc in scores.items():
        out[f"{name}_auprc"] = auprc(sc, truth)
    return out


# ----------------------------------------------------------------------------- probes
def read_hvg_expression(path: str | os.PathLike, cell_ids: list[str]) -> np.ndarray:
    """Log-normalised HVG expression ``[n, G]`` float32 of ``cell_ids`` from ``hvg.h5ad`` (G: its
    genes, n_hvg plus a Perturb-seq dataset's perturbed genes)."""
    import anndata as ad
    import scipy.sparse as sp

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: HVG h5ad not found")
    a = ad.read_h5ad(path, backed="r")
    try:
        where = pd.Series(np.arange(a.n_obs), index=a.obs_names.astype(str))
        missing = [c for c in cell_ids if c not in where.index]
        if missing:
            raise InputError(
                f"{path}: {len(missing)} cells of the binned data are missing (e.g. {missing[0]!r})"
            )
        idx = where[cell_ids].to_numpy()
        order = np.argsort(idx, kind="stable")
        x = a.X[np.sort(idx)] if len(idx) else np.zeros((0, a.n_vars), np.float32)
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
        out = np.empty_like(x, dtype=np.float32)
        out[order] = x
        return out
    finally:
        a.file.close()


def pca_features(
    x_train: np.ndarray, x_test: np.ndarray, n_pcs: int, seed: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """PCA fitted on the training cells only; (train PCs, test PCs, components used)."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    n = max(1, min(n_pcs, x_train.shape[0] - 1, x_train.shape[1]))
    with threadpool_limits(limits=1):  # results independent of the core count (see probe)
        pca = PCA(n_components=n, svd_solver="full", random_state=seed).fit(x_train)
        return (
            pca.transform(x_train).astype(np.float32),
            pca.transform(x_test).astype(np.float32),
            n,
        )


def probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    knn_k: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Logistic-regression and kNN probes fitted on ``(x_train [n, d], y_train [n])`` only and
    scored on the test cells: ``{"logreg": {accuracy, macro_f1}, "knn": {...}}``.

    Logistic regression: standardised features, L2, lbfgs, ``max_iter`` 2000. kNN: Euclidean on
    the raw features, ``k = min(knn_k, n)`` uniform votes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    # Single-threaded BLAS/OpenMP: with several threads, near-tied kNN distances (and lbfgs'
    # last bits) depend on how many threads some earlier library (numba, via UMAP) left set.
    with threadpool_limits(limits=1):
        logreg = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)
        ).fit(x_train, y_train)
        knn = KNeighborsClassifier(n_neighbors=min(knn_k, len(y_train))).fit(x_train, y_train)
        pred_logreg, pred_knn = logreg.predict(x_test), knn.predict(x_test)
    return {
        "logreg": classification_metrics(y_test, pred_logreg),
        "knn": classification_metrics(y_test, pred_knn),
    }


# ----------------------------------------------------------------------------- UMAP
def umap_figure(
    emb: dict[str, np.ndarray], labels: list[str] | None, seed: int, path: Path
) -> dict[str, np.ndarray]:
    """UMAP (scanpy) of the test embeddings ``emb[rep] [n, c]``, coloured by label; saved as PNG.

    Returns the 2-d coordinates per representation (``{}`` when there are too few cells).
    """
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    n = len(next(iter(emb.values())))
    coords: dict[str, np.ndarray] = {}
    fig, axes = plt.subplots(1, len(emb), figsize=(7.5 * len(emb), 4.5), squeeze=False)
    for ax, (rep, x) in zip(axes[0], emb.items(), strict=True):
        if n < 4:
            ax.text(0.5, 0.5, f"{n} test cells: too few for a UMAP", ha="center", va="center")
            ax.set_axis_off()
            continue
        a = ad.AnnData(np.zeros((n, 0), np.float32))
        a.obsm["X_rep"] = np.asarray(x, np.float32)
        if labels is not None:
            a.obs["label"] = pd.Categorical(labels)
        sc.pp.neighbors(a, n_neighbors=min(15, n - 1), use_rep="X_rep", random_state=seed)
        sc.tl.umap(a, random_state=seed)
        coords[rep] = a.obsm["X_umap"].astype(np.float32)
        with warnings.catch_warnings():  # scanpy's own deprecation noise
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            sc.pl.embedding(
                a,
                basis="umap",
                color="label" if labels is not None else None,
                ax=ax,
                show=False,
                title=f"test cells, {rep} embedding",
                frameon=True,
            )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return coords


def placeholder_png(path: Path, text: str) -> None:
    """A small PNG saying why there is no plot (the rule's output must exist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 1.5))
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def package_versions() -> dict[str, str]:
    """Versions of the packages an evaluation depends on (provenance)."""
    out = {"evoformer": evoformer.__version__, "torch": torch.__version__}
    for pkg in ("scanpy", "anndata", "scikit-learn", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def evaluate(
    model_path: str | os.PathLike,
    binned: str | os.PathLike,
    split: str | os.PathLike,
    hvg_h5ad: str | os.PathLike,
    out_dir: str | os.PathLike,
    params: dict[str, Any] | EvalParams | None = None,
    prior: str | os.PathLike | None = None,
    outputs: dict[str, str | os.PathLike] | None = None,
    network: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate ``model_path`` on the test cells; write the outputs and return the metrics dict.

    Args:
        model_path: ``model.pt`` from ``evoformer.train``.
        binned: binned data folder (``BinnedData``).
        split: ``split.tsv`` (``cell_id``, ``split``, ``fold``).
        hvg_h5ad: log-normalised HVG expression (the PCA baseline).
        out_dir: folder of the default output names.
        params: :class:`EvalParams` or its plain dict.
        prior: optional prior-network TSV (else the prior saved in the weights, if any).
        outputs: optional explicit paths for ``metrics`` (JSON), ``embeddings`` (h5ad), ``umap``
            (PNG); defaults ``out_dir/eval_metrics.json``, ``embeddings.h5ad``, ``umap.png``.
        network: optional true gene-gene network TSV (planted data): the model's attention
            scores and the ridge baseline's coefficients are scored against it (AUPRC).

    Returns:
        The content of ``eval_metrics.json``: ``metrics`` (flat name -> number or None; see
        :func:`flat_metrics`), ``details`` and ``versions``.
    """
    p = params if isinstance(params, EvalParams) else EvalParams.from_dict(params)
    out_dir = Path(out_dir)
    paths = {
        "metrics": out_dir / "eval_metrics.json",
        "embeddings": out_dir / "embeddings.h5ad",
        "umap": out_dir / "umap.png",
    }
    paths.update({k: Path(v) for k, v in (outputs or {}).items() if k in paths})
    split_path = Path(split)

    if p.device == "cpu" or (p.device == "auto" and not torch.cuda.is_available()):
        device = torch.device("cpu")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        device = torch.device("cuda")

    data = BinnedData.open(binned)
    n_bins = int(data.meta["n_bins"])
    gene_names = data.genes["gene_id"].astype(str).tolist()
    model, saved = load_model(model_path, gene_names, prior)
    if int(saved["n_bins"]) != n_bins:
        raise InputError(
            f"{model_path}: model has n_bins {saved['n_bins']} but {binned} has {n_bins}"
        )
    model.to(device)

    if not split_path.is_file():
        raise InputError(f"{split_path}: split table not found")
    split_df = pd.read_csv(split_path, sep="\t", dtype={"cell_id": str})
    for col in ("cell_id", "split", "fold"):
        if col not in split_df:
            raise InputError(f"{split_path}: missing column '{col}'")
    labels, label_names = label_codes(data.cells)
    has_labels = bool(label_names)
    train_rows = select_rows(split_df, data.cells, p.fold, p.final)["train"]
    test = held_out_rows(split_df, data.cells)
    if len(train_rows) == 0:
        raise InputError(f"{split_path}: no training cells for fold {p.fold} (final={p.final})")
    if len(test) == 0:
        raise InputError(f"{split_path}: no test cells among the binned cells of {binned}")
    log.info("evaluating on %d test cells, %d training cells", len(test), len(train_rows))

    # 1. masked-value prediction: the model and the baselines on the same masked positions
    res = run_model(model, data, test, labels, p, device, with_masks=True)
    counts = gene_bin_counts(data, train_rows, len(gene_names), n_bins)
    base = GeneBaseline.from_counts(counts).predict(res["gene"], res["true"])
    bin_space = {
        "model": value_metrics(
            res["true"], res["pred_bin"], res["pred_value"], res["log_prob_true"]
        ),
        "mean": value_metrics(res["true"], **base),
    }
    fit_rows = train_rows
    if len(fit_rows) > p.max_baseline_train_cells:
        rng = np.random.default_rng(p.seed)
        fit_rows = np.sort(rng.choice(fit_rows, p.max_baseline_train_cells, replace=False))
    x_train, real_train = dense_expression(data, fit_rows)
    x_test, _ = dense_expression(data, test)
    intervals, fitted = expression_evaluation(res, x_test, x_train, real_train, p)
    strongest = strongest_baselines(intervals)

    # 2. gene-gene scores against a known network
    recovery = None
    if network is not None:
        score_rows = test[: p.gene_score_cells]
        scores = {
            "model": attention_gene_scores(model, data, score_rows, device, p.batch_size),
            "ridge": fitted["ridge"].gene_scores(),
        }
        recovery = network_recovery(scores, str(network), gene_names)
        log.info("network recovery: %s", recovery)

    # 3. probes on embeddings of (a seeded subsample of) the training cells
    probe_rows = train_rows
    if len(probe_rows) > p.max_probe_train_cells:
        rng = np.random.default_rng(p.seed)
        probe_rows = np.sort(rng.choice(probe_rows, p.max_probe_train_cells, replace=False))
    tr = run_model(model, data, probe_rows, labels, p, device, with_masks=False)
    ids = data.cells["cell_id"].astype(str).to_numpy()
    x_hvg_tr = read_hvg_expression(hvg_h5ad, ids[probe_rows].tolist())
    x_hvg_te = read_hvg_expression(hvg_h5ad, ids[test].tolist())
    pca_tr, pca_te, n_pcs = pca_features(x_hvg_tr, x_hvg_te, p.n_pcs, p.seed)
    feats = {
        "cls": (tr["cls"], res["cls"]),
        "mean": (tr["mean"], res["mean"]),
        "pca": (pca_tr, pca_te),
    }
    y_tr, y_te = labels[probe_rows], labels[test]
    probes: dict[str, Any] = {}
    if not has_labels:
        probe_status = "skipped: the binned cells have no label column"
    elif len(np.unique(y_tr[y_tr >= 0])) < 2:
        probe_status = "skipped: fewer than 2 labelled classes among the training cells"
    elif not (y_te >= 0).any():
        probe_status = "skipped: no labelled test cells"
    else:
        probe_status = "ok"
        ktr, kte = y_tr >= 0, y_te >= 0
        for rep, (a, b) in feats.items():
            probes[rep] = probe(a[ktr], y_tr[ktr], b[kte], y_te[kte], p.knn_k, p.seed)
    head = None
    if saved.get("n_labels", 0) and has_labels and (y_te >= 0).any():
        kte = y_te >= 0
        head = classification_metrics(y_te[kte], res["label_pred"][kte])

    # 4. UMAP of the test embeddings
    test_labels = [label_names[i] if i >= 0 else "unknown" for i in y_te] if has_labels else None
    if p.umap:
        coords = umap_figure(
            {"cls": res["cls"], "mean": res["mean"]}, test_labels, p.seed, paths["umap"]
        )
    else:
        coords = {}
        placeholder_png(paths["umap"], "UMAP switched off (evaluate params umap: false)")

    # outputs
    write_embeddings(
        paths["embeddings"],
        ids,
        test,
        probe_rows,
        labels,
        label_names,
        res,
        tr,
        pca_te,
        pca_tr,
        coords,
    )
    details = {
        "model": str(model_path),
        "n_test_cells": len(test),
        "n_train_cells": len(train_rows),
        "n_probe_train_cells": len(probe_rows),
        "fold": p.fold,
        "final": p.final,
        "mask_ratio": p.mask_ratio,
        "mask_seed": p.seed,
        "loss": model.cfg.loss,
        "n_bins": n_bins,
        "preset": model.cfg.preset,
        "n_parameters": int(saved.get("n_parameters") or 0),
        "selected_step": saved.get("selected_step"),
        "n_baseline_train_cells": len(fit_rows),
        "baselines": {
            "ridge_alpha": fitted["ridge"].alpha,
            "knn_k": fitted["knn"].k,
        },
        "n_bootstrap": p.n_bootstrap,
        "bin_space": bin_space,
        "expression": intervals,
        "strongest_baseline": strongest,
        "network_recovery": recovery,
        "probe_status": probe_status,
        "probe": probes,
        "label_head": head,
        "n_pcs": n_pcs,
        "knn_k": p.knn_k,
        "label_names": label_names,
    }
    result = {
        "metrics": flat_metrics(
            bin_space, intervals, strongest, probes, head, recovery, details_counts(res, saved)
        ),
        "details": details,
        "versions": package_versions(),
    }
    result = json_safe(result)
    write_text_atomic(paths["metrics"], json.dumps(result, indent=2) + "\n")
    return result


def details_counts(res: dict[str, Any], saved: dict[str, Any]) -> dict[str, float]:
    """Counts shown in the tables: masked positions (all, non-zero) and model parameters."""
    return {
        "n_masked": int(len(res["true"])),
        "n_masked_nonzero": int((res["expr_true"] > 0).sum()),
        "n_parameters": int(saved.get("n_parameters") or 0),
    }


def flat_metrics(
    bin_space: dict[str, dict[str, float]],
    expression: dict[str, dict[str, dict[str, float]]],
    strongest: dict[str, str],
    probes: dict[str, dict[str, dict[str, float]]],
    head: dict[str, float] | None,
    recovery: dict[str, float] | None,
    counts: dict[str, float],
) -> dict[str, Any]:
    """The columns the result tables show, always the same keys (NaN where not applicable).

    * ``n_masked``, ``n_masked_nonzero``, ``n_parameters``;
    * expression space (comparable across grid points): ``{model,mean,ridge,knn}_<m>`` with
      ``_lo``/``_hi`` (95% bootstrap interval) for every ``m`` in
      :data:`evoformer.metrics.EXPR_METRICS`; ``best_baseline_<m>`` (its name) and
      ``diff_<m>`` = model - that baseline, ``diff_mean_<m>`` = model - the per-gene mean
      (the floor), each with ``_lo``/``_hi``;
    * bin space (not comparable across n_bins or loss): ``{model,mean}_bin_{acc,ce,mse,pearson,mre}``;
    * ``grn_{model,ridge,random}_auprc`` (NaN without a known network);
    * ``probe_{cls,mean,pca}_{logreg,knn}_{accuracy,macro_f1}`` (``pca`` is the baseline),
      ``head_{accuracy,macro_f1}``.
    """
    out: dict[str, Any] = dict(counts)
    for who in PREDICTORS:
        for m in EXPR_METRICS:
            iv = expression[who][m]
            out[f"{who}_{m}"] = iv["value"]
            out[f"{who}_{m}_lo"] = iv["lo"]
            out[f"{who}_{m}_hi"] = iv["hi"]
    for m in EXPR_METRICS:
        best = strongest[m]
        out[f"best_baseline_{m}"] = best
        for key, who in ((f"diff_{m}", best), (f"diff_mean_{m}", "mean")):
            iv = expression[f"diff:{who}"][m]
            out[key] = iv["value"]
            out[f"{key}_lo"] = iv["lo"]
            out[f"{key}_hi"] = iv["hi"]
    for who in ("model", "mean"):
        for m in VALUE_METRICS:
            name = m if m == "bin_acc" else f"bin_{m}"
            out[f"{who}_{name}"] = bin_space[who][m]
    rec = recovery or {}
    for who in ("model", "ridge", "random"):
        out[f"grn_{who}_auprc"] = rec.get(f"{who}_auprc", math.nan)
    for rep in PROBE_REPS:
        for clf in PROBE_CLASSIFIERS:
            for m in ("accuracy", "macro_f1"):
                out[f"probe_{rep}_{clf}_{m}"] = probes.get(rep, {}).get(clf, {}).get(m, math.nan)
    for m in ("accuracy", "macro_f1"):
        out[f"head_{m}"] = (head or {}).get(m, math.nan)
    return out


def write_embeddings(
    path: Path,
    ids: np.ndarray,
    test: np.ndarray,
    probe_rows: np.ndarray,
    labels: np.ndarray,
    label_names: list[str],
    res: dict[str, np.ndarray],
    tr: dict[str, np.ndarray],
    pca_te: np.ndarray,
    pca_tr: np.ndarray,
    coords: dict[str, np.ndarray],
) -> None:
    """``embeddings.h5ad``: obs = test cells then the probe's training cells (``role``,
    ``label``); obsm ``X_cls``, ``X_mean`` ``[n, c_m]``, ``X_pca`` (the baseline features) and
    ``X_umap_<rep>`` ``[n, 2]`` (NaN for training cells)."""
    import anndata as ad

    rows = np.concatenate([test, probe_rows])
    n_te = len(test)
    obs = pd.DataFrame(
        {"role": pd.Categorical(["test"] * n_te + ["probe_train"] * len(probe_rows))},
        index=pd.Index(ids[rows], name="cell_id"),
    )
    if label_names:
        lab = labels[rows]
        obs["label"] = pd.Categorical(
            [label_names[i] if i >= 0 else None for i in lab], categories=label_names
        )
    if obs.index.duplicated().any():
        obs.index = pd.Index([f"{c}|{r}" for c, r in zip(obs.index, obs["role"], strict=True)])
    a = ad.AnnData(np.zeros((len(rows), 0), np.float32), obs=obs)
    a.obsm["X_cls"] = np.concatenate([res["cls"], tr["cls"]])
    a.obsm["X_mean"] = np.concatenate([res["mean"], tr["mean"]])
    a.obsm["X_pca"] = np.concatenate([pca_te, pca_tr])
    for rep, xy in coords.items():
        full = np.full((len(rows), 2), np.nan, np.float32)
        full[:n_te] = xy
        a.obsm[f"X_umap_{rep}"] = full
    with atomic_path(path) as tmp:
        a.write_h5ad(tmp)
