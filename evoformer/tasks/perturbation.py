"""The perturbation task: predict a perturbed cell's expression from a control cell and the
perturbed genes, for perturbations never seen in training.

**Data** (:class:`ScreenCells`): the binned cells of a Perturb-seq screen (every HVG a token:
``binning.include_zero_genes: true``), the perturbation split (``split.tsv``: each cell's
condition and set; a condition is wholly in train, val or test) and each cell's perturbation
type (the HVG h5ad's ``obs.perturbation_type``). The training items are the perturbed cells of
the training conditions; the controls the model sees are the training controls only.

**A batch** (:class:`PerturbationBatches`): for every item, a control cell drawn uniformly
from the training controls with ``mask_generator(seed, epoch, step, micro, rank)`` (fresh draws
every epoch, the same on a resumed run, whatever the workers), its expression bins as the
tokens' values, and ``perturbed [B, 1, L]``: the type of the item's perturbation
(:data:`TYPE_INDEX`) at its perturbed genes' tokens, 0 elsewhere. The model adds a learned
embedding per type to those tokens in ``m`` and to their rows and columns of ``z``
(:class:`~evoformer.model.BioFormer`). Target (``perturbation.target``): ``mean`` (default), the
mean log1p expression of the item's condition over its training cells; ``cell``, the item's own
cell. The control and the perturbed cell are never the same cell (Perturb-seq measures each
cell once), so a single cell's target carries noise the input cannot explain: for the squared
error both targets have the same optimum (the condition mean) and ``mean`` reaches it with less
gradient noise.

**Loss**: the mean squared error of the predicted log1p expression of every gene token (the
perturbed genes included: predicting their own change is part of the task).

**Predicting a condition** (:func:`predict_conditions`): the mean of the model's predictions
over ``n_eval_controls`` training controls drawn once with a fixed seed (:data:`EVAL_SEED`):
the same controls for every condition, grid point and process count. Validation scores the
validation conditions so (``val_loss``: the squared error of the predicted condition means over
all genes; ``val_mse`` and ``val_pearson_delta`` as :mod:`evoformer.perturb.metrics` defines
them, the condition's own perturbed genes left out); :func:`predict_file` writes the test
conditions' predicted means for the perturbation benchmark (:mod:`evoformer.perturb.evaluate`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from evoformer.data.arrays import BinnedData, take_rows
from evoformer.distributed import all_reduce_
from evoformer.errors import InputError
from evoformer.io import atomic_path
from evoformer.losses import LOSSES
from evoformer.model import BioFormer, mask_generator
from evoformer.perturb.conditions import CONTROL, TYPES, condition_genes
from evoformer.perturb.metrics import pearson
from evoformer.perturb.splits import read_split
from evoformer.tasks.base import PlanEntry, StepContext, Task, TaskInputs
from evoformer.train_config import PerturbationSettings, RunSpec

log = logging.getLogger(__name__)
#: Perturbation type -> the index of its embedding (0: not perturbed).
TYPE_INDEX = {t: i + 1 for i, t in enumerate(TYPES)}
#: Seed and tag of the controls every condition is predicted from (validation, test).
EVAL_SEED, EVAL_TAG = 0, -3


class ScreenCells:
    """A screen's binned cells, grouped as the perturbation task needs them.

    Args:
        data: the binned arrays (every HVG a token, one gene order for every cell).
        split: the perturbation split (:func:`evoformer.perturb.splits.read_split`).
        types: each cell's perturbation type, indexed by cell id (NaN for controls).
        where: the files, for error messages.
    """

    def __init__(self, data: BinnedData, split: pd.DataFrame, types: pd.Series, where: str):
        if data.gene_index.shape[0] != 1:
            raise InputError(
                f"{data.folder}: the perturbation task needs every gene as a token in every "
                "cell (binning.include_zero_genes: true)"
            )
        self.data = data
        token_index = np.asarray(data.gene_index[0], dtype=np.int64)  # [L] gene of each token
        if (token_index < 0).any():
            raise InputError(f"{data.folder}: padded tokens in a binning with every gene")
        names = data.genes["gene_id"].astype(str).to_numpy()
        self.gene_ids = torch.as_tensor(token_index)  # [L]
        self.tokens = names[token_index].tolist()  # [L] gene of each token
        self.position = {g: i for i, g in enumerate(self.tokens)}
        cell_ids = data.cells["cell_id"].astype(str)
        by_id = split.set_index("cell_id")
        absent = cell_ids[~cell_ids.isin(by_id.index)]
        if len(absent):
            raise InputError(
                f"{where}: cell {absent.iloc[0]!r} of the binned data is not in the split"
            )
        rows = by_id.loc[cell_ids.to_numpy()]
        self.condition = rows["condition"].to_numpy(dtype=object)  # [N]
        self.set = rows["set"].to_numpy(dtype=object)  # [N]
        self.train_controls = np.flatnonzero((self.condition == CONTROL) & (self.set == "train"))
        if not len(self.train_controls):
            raise InputError(f"{where}: no training control cells")
        perturbed = self.condition != CONTROL
        cond_of = pd.Series(self.condition[perturbed])
        set_of = pd.Series(self.set[perturbed])
        self.rows_of = {c: np.flatnonzero(self.condition == c) for c in sorted(set(cond_of))}
        self.set_of = dict(zip(cond_of, set_of, strict=True))
        type_of = types.reindex(cell_ids.to_numpy()).to_numpy(dtype=object)
        self.type_of: dict[str, str] = {}
        for c, r in self.rows_of.items():
            t = type_of[r[0]]
            if t not in TYPE_INDEX:
                raise InputError(f"{where}: condition {c!r} has perturbation type {t!r}")
            self.type_of[c] = t
            missing = [g for g in condition_genes(c) if g not in self.position]
            if missing:
                raise InputError(f"{where}: perturbed gene {missing[0]!r} of {c!r} is not a token")
        self.conditions = {
            s: [c for c in self.rows_of if self.set_of[c] == s] for s in ("train", "val", "test")
        }
        if not self.conditions["train"]:
            raise InputError(f"{where}: no training perturbation conditions")
        self.train_items = np.concatenate([self.rows_of[c] for c in self.conditions["train"]])
        self._means: dict[str, np.ndarray] = {}

    def expression(self, rows: np.ndarray) -> np.ndarray:
        """``[n, L]`` float32 log1p expression of the token genes of ``rows``."""
        return take_rows(self.data.expression, rows, np.float32)

    def mean(self, condition: str) -> np.ndarray:
        """``[L]`` mean log1p expression of a condition's cells (``ctrl``: training controls)."""
        if condition not in self._means:
            rows = self.train_controls if condition == CONTROL else self.rows_of[condition]
            self._means[condition] = (
                self.expression(rows).mean(0, dtype=np.float64).astype(np.float32)
            )
        return self._means[condition]

    def flags(self, condition: str) -> np.ndarray:
        """``[L]`` int64: the condition's type index at its perturbed genes' tokens, else 0."""
        out = np.zeros(len(self.tokens), np.int64)
        for g in condition_genes(condition):
            out[self.position[g]] = TYPE_INDEX[self.type_of[condition]]
        return out

    def inputs(self, controls: np.ndarray, conditions: list[str]) -> dict[str, torch.Tensor]:
        """The model inputs of control cells ``controls [B]`` perturbed by ``conditions [B]``:
        ``gene_ids``, ``values``, ``pad_mask`` and ``perturbed``, each ``[B, 1, L]``."""
        values = take_rows(self.data.values, controls, np.int64)
        b, length = values.shape
        flags = np.stack([self.flags(c) for c in conditions]) if conditions else values * 0
        return {
            "gene_ids": self.gene_ids.expand(b, 1, length).clone(),
            "values": torch.as_tensor(values).view(b, 1, length),
            "pad_mask": torch.ones(b, 1, length, dtype=torch.bool),
            "perturbed": torch.as_tensor(flags).view(b, 1, length),
        }

    def eval_controls(self, n: int) -> np.ndarray:
        """``[min(n, controls)]`` training controls every condition is predicted from."""
        k = min(n, len(self.train_controls))
        gen = mask_generator(EVAL_SEED, EVAL_TAG)
        pick = torch.randperm(len(self.train_controls), generator=gen)[:k].numpy()
        return self.train_controls[np.sort(pick)]


class PerturbationBatches(torch.utils.data.Dataset):
    """The micro-batches of one epoch: ``plan[i] = (items, step, micro)``, items index the
    training perturbed cells; the controls come from ``mask_generator(seed, epoch, step, micro,
    rank)`` (module docstring)."""

    def __init__(
        self,
        cells: ScreenCells,
        plan: list[PlanEntry],
        seed: int,
        epoch: int,
        rank: int,
        target: str,
    ) -> None:
        self.cells, self.plan, self.seed = cells, plan, seed
        self.epoch, self.rank, self.target = epoch, rank, target

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        items, step, micro = self.plan[i]
        cells = self.cells
        rows = cells.train_items[np.asarray(items)]
        conds = [str(c) for c in cells.condition[rows]]
        gen = mask_generator(self.seed, self.epoch, step, micro, self.rank)
        draw = torch.randint(len(cells.train_controls), (len(rows),), generator=gen).numpy()
        batch = cells.inputs(cells.train_controls[draw], conds)
        if self.target == "mean":
            target = np.stack([cells.mean(c) for c in conds])
        else:
            target = cells.expression(rows)
        batch["target"] = torch.as_tensor(target).unsqueeze(1)  # [B, 1, L]
        return batch


@torch.no_grad()
def predict_conditions(
    model: BioFormer,
    cells: ScreenCells,
    conditions: list[str],
    controls: np.ndarray,
    ctx: StepContext,
) -> np.ndarray:
    """``[C, L]`` predicted mean log1p expression of each condition: the mean of the model's
    predictions for the control cells ``controls`` perturbed by it."""
    out = np.zeros((len(conditions), len(cells.tokens)), np.float64)
    per = max(1, ctx.micro_batch_size)
    for i, c in enumerate(conditions):
        total = np.zeros(len(cells.tokens), np.float64)
        for j in range(0, len(controls), per):
            part = controls[j : j + per]
            batch = cells.inputs(part, [c] * len(part))
            with ctx.autocast:
                pred = model(**{k: v.to(ctx.device) for k, v in batch.items()})["expression"]
            total += pred.float().sum((0, 1)).double().cpu().numpy()
        out[i] = total / len(controls)
    return out


class Perturbation(Task):
    """The perturbation task of one training run (module docstring)."""

    name = "perturbation"
    loss_label = "squared error of the predicted log1p expression"

    def __init__(self, spec: RunSpec, inputs: TaskInputs) -> None:
        super().__init__(spec, inputs)
        if inputs.hvg is None:
            raise InputError("the perturbation task needs the HVG h5ad (--hvg)")
        if spec.model.n_cells_per_msa != 1:
            raise InputError(
                "config key 'model.n_cells_per_msa': the perturbation task reads one control "
                f"cell per item (1), got {spec.model.n_cells_per_msa}"
            )
        # the HVG h5ad's reader needs anndata: imported here, not with the trainer (a GPU
        # machine running only the masked-expression task may lack it)
        from evoformer.perturb.stats import read_hvg_types

        self.settings: PerturbationSettings = spec.perturbation or PerturbationSettings()
        split = read_split(inputs.split)
        where = f"{inputs.split}"
        self.cells = ScreenCells(self.data, split, read_hvg_types(inputs.hvg), where)
        if spec.final:
            raise InputError("the perturbation task has no final retrain (fold final)")
        self.val_conditions = self.cells.conditions["val"]
        self.controls = self.cells.eval_controls(self.settings.n_eval_controls)
        ctrl = self.cells.mean(CONTROL)
        self.baseline = torch.zeros(len(self.genes))
        self.baseline[self.cells.gene_ids] = torch.as_tensor(ctrl)
        log.info(
            "perturbation task: %d training cells of %d training conditions, %d training "
            "controls; %d validation conditions; target %s",
            len(self.cells.train_items),
            len(self.cells.conditions["train"]),
            len(self.cells.train_controls),
            len(self.val_conditions),
            self.settings.target,
        )

    @property
    def n_train_items(self) -> int:
        return len(self.cells.train_items)

    @property
    def n_val_items(self) -> int:
        return len(self.val_conditions)

    def epoch_batches(
        self, plan: list[PlanEntry], epoch: int, rank: int
    ) -> torch.utils.data.Dataset:
        return PerturbationBatches(
            self.cells, plan, self.spec.train.seed, epoch, rank, self.settings.target
        )

    def model_options(self) -> dict[str, Any]:
        return {
            "n_perturbation_types": len(TYPES),
            "output": "expression",
            "expression_baseline": self.baseline,
        }

    loss_terms = staticmethod(LOSSES["perturbation"])

    def validate(self, model: BioFormer, ctx: StepContext) -> dict[str, float]:
        """``val_loss``, ``val_mse``, ``val_pearson_delta`` over the validation conditions
        (module docstring), each process predicting every ``world``-th condition."""
        cells = self.cells
        mine = self.val_conditions[ctx.rank :: ctx.world]
        pred = predict_conditions(model, cells, mine, self.controls, ctx)
        ctrl = cells.mean(CONTROL).astype(np.float64)
        sums = torch.zeros(5, dtype=torch.float64)  # loss, mse, pearson, n pearson, n
        for i, c in enumerate(mine):
            true = cells.mean(c).astype(np.float64)
            keep = np.ones(len(ctrl), bool)
            keep[[cells.position[g] for g in condition_genes(c)]] = False
            r = pearson((pred[i] - ctrl)[keep], (true - ctrl)[keep])
            sums += torch.tensor(
                [
                    np.mean((pred[i] - true) ** 2),
                    np.mean((pred[i] - true)[keep] ** 2),
                    0.0 if math.isnan(r) else r,
                    0.0 if math.isnan(r) else 1.0,
                    1.0,
                ],
                dtype=torch.float64,
            )
        s = all_reduce_(sums.to(ctx.device)).cpu().tolist()
        n = max(s[4], 1.0)
        return {
            "val_loss": s[0] / n,
            "val_mse": s[1] / n,
            "val_pearson_delta": s[2] / s[3] if s[3] else math.nan,
        }

    def validation_line(self, v: dict[str, float]) -> str:
        return (
            f"{self.n_val_items} conditions | loss {v['val_loss']:.4f} | MSE {v['val_mse']:.4f} "
            f"| Pearson delta {v['val_pearson_delta']:.4f}"
        )

    def model_file(self) -> dict[str, Any]:
        return {
            **super().model_file(),
            "output": "expression",
            "n_perturbation_types": len(TYPES),
            "perturbation": self.settings.to_dict(),
        }


def predict_file(
    model_pt: str | os.PathLike,
    binned: str | os.PathLike,
    split_tsv: str | os.PathLike,
    hvg_h5ad: str | os.PathLike,
    out_tsv: str | os.PathLike,
    sets: tuple[str, ...] = ("val", "test"),
) -> pd.DataFrame:
    """Predict the mean expression of every condition of ``sets`` with a trained perturbation
    model; write ``out_tsv`` (``condition`` then one column per gene symbol, atomically). Runs on
    the first CUDA device when there is one (bf16 autocast when the training resolved to it),
    else on the CPU, with the training's micro-batch.

    Returns:
        The table (index: condition, columns: genes in token order).
    """
    from contextlib import nullcontext

    from evoformer.memory.spec import resolve_precision
    from evoformer.model.saved import load_model
    from evoformer.perturb.stats import read_hvg_types
    from evoformer.train_config import TrainConfig

    data = BinnedData.open(binned)
    genes = data.genes["gene_id"].astype(str).tolist()
    model, saved = load_model(model_pt, genes)
    if saved.get("output") != "expression":
        raise InputError(f"{model_pt}: not a perturbation model (output {saved.get('output')!r})")
    settings = PerturbationSettings.from_dict(saved.get("perturbation"))
    train_cfg = TrainConfig.from_dict(saved.get("train_config"))
    cells = ScreenCells(data, read_split(split_tsv), read_hvg_types(hvg_h5ad), str(split_tsv))
    conditions = [c for s in sets for c in cells.conditions[s]]
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    bf16 = device.type == "cuda" and resolve_precision(train_cfg.precision, device.type) == "bf16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    ctx = StepContext(device, 0, 1, autocast, train_cfg.micro_batch_size)
    controls = cells.eval_controls(settings.n_eval_controls)
    pred = predict_conditions(model, cells, conditions, controls, ctx)
    table = pd.DataFrame(pred, index=pd.Index(conditions, name="condition"), columns=cells.tokens)
    out = Path(out_tsv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, sep="\t", float_format="%.6g")
    return table


def read_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """A :func:`predict_file` table (index: condition, columns: genes)."""
    try:
        return pd.read_csv(path, sep="\t", index_col="condition")
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise InputError(f"{path}: cannot read the predictions ({e})") from None
