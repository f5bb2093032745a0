"""The masked-expression task: predict the expression bins of masked gene tokens (scGPT-style).

Data: the binned arrays of one dataset (memory-mapped ``.npy``, :class:`BinnedData`) and the
cell split (``split.tsv``: train/val/test, CV folds; a perturbation split's ``set`` column
works too, so a model can be pretrained on a screen's training cells). Cells are grouped into
MSAs of ``S = n_cells_per_msa`` cells. Each training micro-batch masks ``train.mask_ratio`` of
every cell's real tokens, drawn from ``mask_generator(seed, epoch, step, micro, rank)``: the
same positions whatever the workers, prefetching or resuming. Validation masks are fixed
(``fixed_mask``, seed :data:`VAL_MASK_SEED`, tag :data:`VAL_MASK_TAG`): the same positions for
every grid point, batch size and number of processes.

Loss: the model's masked-value loss (``BioFormer.loss_terms``: cross-entropy over the bins, or
the squared error of the bin value) plus the cell-label loss with ``train.label_head``.
Validation: ``val_loss``, ``val_bin_acc`` (bin space) and ``val_expr_*`` (expression space,
:mod:`evoformer.metrics`). Test evaluation: :mod:`evoformer.evaluate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import torch

from evoformer.data.arrays import BinnedData
from evoformer.distributed import all_reduce_
from evoformer.errors import InputError
from evoformer.losses import LOSSES
from evoformer.memory.spec import StepSpec
from evoformer.metrics import bin_values, metrics_from_sums, moment_sums
from evoformer.model import BioFormer, apply_value_mask, fixed_mask, mask_generator
from evoformer.tasks.base import PlanEntry, StepContext, Task, TaskInputs
from evoformer.train_config import RunSpec, TrainConfig

#: ``mask_generator`` tag of the validation masks (training uses epochs >= 0, evaluation -2).
VAL_MASK_TAG = -1
#: Seed of the validation masks: fixed, so every grid point is validated on the same positions.
VAL_MASK_SEED = 0


class CellBatches:
    """Serves micro-batches of cells (or of S-cell groups) from the memory-mapped binned arrays.

    Every rank opens the ``.npy`` files memory-mapped; nothing reads the h5ad. Rows are grouped
    into MSAs of ``S`` cells (S = 1: each cell on its own); the item index is the group index.
    """

    def __init__(self, data: BinnedData, rows: np.ndarray, labels: np.ndarray, s: int) -> None:
        self.data = data
        n_groups = len(rows) // s
        self.groups = rows[: n_groups * s].reshape(n_groups, s)  # [n_groups, S] row indices
        self.labels = labels  # [N] int64, -1 = unknown

    def __len__(self) -> int:
        return len(self.groups)

    def batch(self, items: list[int] | np.ndarray, truth: bool = False) -> dict[str, torch.Tensor]:
        """Batch for group indices ``items``: gene_ids/values/pad_mask [B, S, L], labels [B, S];
        with ``truth`` also ``expression [B, S, L]`` (log1p values) and ``edges [B, S, K-1]``."""
        rows = self.groups[np.asarray(items)]  # [B, S]
        flat = np.sort(rows.ravel())  # sorted reads are kinder to the page cache
        order = np.argsort(np.argsort(rows.ravel()))
        values = np.asarray(self.data.values[flat])[order].astype(np.int64)  # [B*S, L]
        gi = self.data.gene_index
        gene_index = (
            np.asarray(gi[flat])[order] if gi.shape[0] > 1 else np.broadcast_to(gi, values.shape)
        )
        b, s = rows.shape
        gene_index = torch.as_tensor(np.asarray(gene_index, dtype=np.int64)).view(b, s, -1)
        out = {
            "gene_ids": gene_index.clamp(min=0),
            "values": torch.as_tensor(values).view(b, s, -1),
            "pad_mask": gene_index >= 0,
            "labels": torch.as_tensor(self.labels[rows]),
        }
        if truth:
            expr = np.asarray(self.data.expression[flat], dtype=np.float32)[order]
            edges = np.asarray(self.data.edges[flat], dtype=np.float32)[order]
            out["expression"] = torch.as_tensor(expr).view(b, s, -1)
            out["edges"] = torch.as_tensor(edges).view(b, s, -1)
        return out


class TrainBatches(torch.utils.data.Dataset):
    """The masked micro-batches of one epoch, as a map-style dataset for a ``DataLoader``.

    ``plan[i] = (items, step, micro)``: group indices of micro-batch ``i`` and where it sits in
    training; its mask comes from ``mask_generator(seed, epoch, step, micro, rank)``, so workers,
    prefetching and resuming mid-epoch do not change it.
    """

    def __init__(
        self,
        cells: CellBatches,
        plan: list[tuple[np.ndarray, int, int]],
        cfg: TrainConfig,
        n_bins: int,
        epoch: int,
        rank: int,
        with_labels: bool,
    ) -> None:
        self.cells, self.plan, self.cfg = cells, plan, cfg
        self.n_bins, self.epoch, self.rank, self.with_labels = n_bins, epoch, rank, with_labels

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        items, step, micro = self.plan[i]
        batch = self.cells.batch(items)
        gen = mask_generator(self.cfg.seed, self.epoch, step, micro, self.rank)
        values, loss_mask = apply_value_mask(
            batch["values"],
            batch["pad_mask"],
            self.cfg.mask_ratio,
            self.n_bins,
            gen,
            self.cfg.mask_nonzero_fraction,
        )
        batch = {**batch, "values": values, "target": batch["values"], "loss_mask": loss_mask}
        if not self.with_labels:
            batch.pop("labels")
        return batch


def select_rows(
    split: pd.DataFrame, cells: pd.DataFrame, fold: int, final: bool
) -> dict[str, np.ndarray]:
    """Row indices (into the binned arrays) of the training and validation cells.

    fold = -1: train on ``split == train``, validate on ``split == val``.
    fold = k >= 0: cross-validation; train on train+val cells with ``fold != k``, validate on ``fold == k``.
    final: train on all train+val cells, no validation (the retrain of the selected grid point).
    Test cells are never returned.
    """
    row_of = pd.Series(np.arange(len(cells)), index=cells["cell_id"].astype(str))
    split = split.assign(cell_id=split["cell_id"].astype(str))
    split = split[split["cell_id"].isin(row_of.index)]
    trval = split[split["split"].isin(["train", "val"])]
    if final:
        tr, va = trval, trval.iloc[:0]
    elif fold >= 0:
        if not (trval["fold"] == fold).any():
            raise InputError(
                f"split table has no cells in fold {fold} (is split.n_folds > {fold}?)"
            )
        tr, va = trval[trval["fold"] != fold], trval[trval["fold"] == fold]
    else:
        tr, va = split[split["split"] == "train"], split[split["split"] == "val"]
    return {"train": row_of[tr["cell_id"]].to_numpy(), "val": row_of[va["cell_id"]].to_numpy()}


def label_codes(cells: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Integer label per row (-1 where unknown or no label column) and the sorted label names."""
    if "label" not in cells:
        return np.full(len(cells), -1, dtype=np.int64), []
    lab = cells["label"]
    names = sorted(lab.dropna().astype(str).unique())
    code = {n: i for i, n in enumerate(names)}
    return np.array([code.get(str(x), -1) if pd.notna(x) else -1 for x in lab], np.int64), names


class MaskedExpression(Task):
    """Masked-expression prediction on the cells of a split (module docstring)."""

    name = "masked_expression"
    loss_label = "masked-value loss (bin space)"

    def __init__(self, spec: RunSpec, inputs: TaskInputs) -> None:
        super().__init__(spec, inputs)
        labels, self.label_names = label_codes(self.data.cells)
        split = pd.read_csv(inputs.split, sep="\t")
        if "split" not in split and "set" in split:  # a perturbation split
            split = split.rename(columns={"set": "split"})
        rows = select_rows(split, self.data.cells, spec.fold, spec.final)
        s = spec.model.n_cells_per_msa
        self.train_cells = CellBatches(self.data, rows["train"], labels, s)
        self.val_cells = CellBatches(self.data, rows["val"], labels, s)
        self.n_labels = len(self.label_names) if spec.train.label_head else 0
        if spec.train.label_head and not self.n_labels:
            raise InputError(
                f"train.label_head is true but {self.data.folder}/cells.tsv has no label column"
            )

    @property
    def n_train_items(self) -> int:
        return len(self.train_cells)

    @property
    def n_val_items(self) -> int:
        return len(self.val_cells)

    def epoch_batches(
        self, plan: list[PlanEntry], epoch: int, rank: int
    ) -> torch.utils.data.Dataset:
        return TrainBatches(
            self.train_cells, plan, self.spec.train, self.n_bins, epoch, rank, self.n_labels > 0
        )

    def model_options(self) -> dict[str, Any]:
        return {"n_labels": self.n_labels}

    loss_terms = staticmethod(LOSSES["masked_expression"])

    @torch.no_grad()
    def validate(self, model: BioFormer, ctx: StepContext) -> dict[str, float]:
        """Masked-value metrics on this rank's shard of the validation cells, all-reduced.

        The mask of validation group ``i`` is ``fixed_mask(..., VAL_MASK_SEED, VAL_MASK_TAG, i)``
        with ``spec.val_mask_ratio``: the same positions at every validation, for every grid
        point, batch size and number of processes. Returns ``val_loss``, ``val_bin_acc`` (bin
        space) and ``val_expr_*`` (expression space, see :mod:`evoformer.metrics`).
        """
        cells = self.val_cells
        # loss*n, correct, n, then moment sums (pred, true) over all and non-zero positions
        sums = torch.zeros(15, dtype=torch.float64)
        idx = np.arange(ctx.rank, len(cells), ctx.world)
        for i in range(0, len(idx), ctx.micro_batch_size):
            items = idx[i : i + ctx.micro_batch_size]
            batch = cells.batch(items, truth=True)
            values, loss_mask = fixed_mask(
                batch["values"],
                batch["pad_mask"],
                self.spec.val_mask_ratio,
                self.n_bins,
                VAL_MASK_SEED,
                VAL_MASK_TAG,
                items,
            )
            with ctx.autocast:
                out = model(
                    batch["gene_ids"].to(ctx.device),
                    values.to(ctx.device),
                    batch["pad_mask"].to(ctx.device),
                )
            pred = out["pred"].float().cpu()
            per, hit = model.value_terms(pred, batch["values"])
            expr, _ = model.decode_expression(pred, bin_values(batch["edges"]))
            lm = loss_mask
            true = batch["expression"][lm].double()
            nz = true > 0
            sums += torch.cat(
                [
                    torch.stack(
                        [per[lm].double().sum(), hit[lm].double().sum(), lm.sum().double()]
                    ),
                    moment_sums(expr[lm], true),
                    moment_sums(expr[lm][nz], true[nz]),
                ]
            )
        sums = all_reduce_(sums.to(ctx.device)).cpu()
        n = max(sums[2].item(), 1.0)
        out = {"val_loss": sums[0].item() / n, "val_bin_acc": sums[1].item() / n}
        expr = metrics_from_sums({"all": sums[3:9].numpy(), "nonzero": sums[9:15].numpy()})
        out.update({f"val_{k}": v for k, v in expr.items()})
        return out

    def validation_line(self, v: dict[str, float]) -> str:
        return (
            f"loss {v['val_loss']:.4f} | bin accuracy {v['val_bin_acc']:.4f} | "
            f"expr MSE {v['val_expr_mse']:.4f} (non-zero {v['val_expr_mse_nonzero']:.4f})"
        )

    def model_file(self) -> dict[str, Any]:
        return {**super().model_file(), "n_labels": self.n_labels, "label_names": self.label_names}

    def step_spec(self, micro_batch_size: int, precision: str, device: str) -> StepSpec:
        spec = super().step_spec(micro_batch_size, precision, device)
        return dataclasses.replace(spec, n_labels=self.n_labels)
