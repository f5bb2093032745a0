"""What a task is: the part of a training run that knows its data, its loss and its metrics.

The trainer (:mod:`evoformer.train`: the loop, processes, checkpoints, early stopping, signals,
profiling, outputs) knows nothing task-specific; it asks its :class:`Task` for

* the training items (``n_train_items``: what the distributed sampler shuffles) and the
  micro-batches of an epoch (:meth:`Task.epoch_batches`, a map-style dataset whose batches are
  a pure function of the plan, the epoch and the rank: resuming mid-epoch replays them);
* the model (:meth:`Task.build_model`, with the task's own parts from :meth:`Task.model_options`)
  and the loss of a batch (:meth:`Task.loss_terms`);
* the validation metrics (:meth:`Task.validate`, all-reduced over the processes) and the log line;
* what ``model.pt`` must carry besides the weights (:meth:`Task.model_file`) and the shapes of
  one step for the FLOP count (:meth:`Task.step_spec`).

The tasks: :class:`~evoformer.tasks.masked.MaskedExpression` (predict masked expression bins)
and :class:`~evoformer.tasks.perturbation.Perturbation` (predict a perturbed cell's expression
from a control cell and the perturbed genes). Registry: :data:`evoformer.tasks.TASKS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from evoformer.data.arrays import BinnedData
from evoformer.io import file_sha256
from evoformer.memory.spec import StepSpec
from evoformer.model import BioFormer, load_prior_network
from evoformer.train_config import RunSpec

#: One micro-batch of the plan of an epoch: (item indices, optimizer step, micro-batch index).
PlanEntry = tuple[np.ndarray, int, int]


@dataclass
class StepContext:
    """Where the model runs: what validation needs from the trainer."""

    device: torch.device
    rank: int
    world: int
    autocast: AbstractContextManager[Any]
    micro_batch_size: int


@dataclass
class TaskInputs:
    """The files a training reads: ``binned`` (bin rule output folder), ``split`` (the split
    table), ``hvg`` (the HVG h5ad; the perturbation task reads each cell's perturbation type)."""

    binned: Path
    split: Path
    hvg: Path | None = None


class Task(ABC):
    """One task's data, model, loss and metrics for one training run (module docstring)."""

    #: The task's name in ``RunSpec.task`` and the config.
    name: ClassVar[str]
    #: Y-axis label of the learning curve's loss.
    loss_label: ClassVar[str]

    def __init__(self, spec: RunSpec, inputs: TaskInputs) -> None:
        self.spec = spec
        self.inputs = inputs
        self.data = BinnedData.open(inputs.binned)
        self.n_bins = int(self.data.meta["n_bins"])
        self.genes = self.data.genes["gene_id"].astype(str).tolist()

    # ------------------------------------------------------------------ data
    @property
    @abstractmethod
    def n_train_items(self) -> int:
        """Training items (the distributed sampler shuffles ``range(n_train_items)``)."""

    @property
    @abstractmethod
    def n_val_items(self) -> int:
        """Validation items (0: no validation)."""

    @property
    def data_meta(self) -> dict[str, Any]:
        """What a checkpoint's data must match to be resumed: the binned data's meta, the split
        table's bytes and those of the pretrained model it starts from (a split or a pretrained
        model rebuilt since the checkpoint starts the run afresh)."""
        meta = {**self.data.meta, "split_sha256": file_sha256(self.inputs.split)}
        if self.spec.init is not None:
            meta["init_sha256"] = file_sha256(self.spec.init)
        return meta

    @abstractmethod
    def epoch_batches(
        self, plan: list[PlanEntry], epoch: int, rank: int
    ) -> torch.utils.data.Dataset:
        """The micro-batches of ``plan`` (item ``i`` of the dataset = ``plan[i]``)."""

    # ------------------------------------------------------------------ model and loss
    def build_model(self) -> BioFormer:
        """The task's model (called right after ``torch.manual_seed(train.seed)``): a BioFormer
        over the task's genes with the spec's prior network, and the task's own parts
        (:meth:`model_options`)."""
        p = self.spec.prior
        return BioFormer(
            self.spec.model,
            n_genes=len(self.genes),
            n_bins=self.n_bins,
            prior=None if p is None else load_prior_network(p.path, self.genes, p.min_gene_share),
            prior_mode=p.mode if p is not None else "init",
            **self.model_options(),
        )

    @abstractmethod
    def model_options(self) -> dict[str, Any]:
        """The task's keyword arguments of :class:`~evoformer.model.BioFormer` (its heads)."""

    @staticmethod
    @abstractmethod
    def loss_terms(
        model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and detached 0-d metric tensors of one micro-batch (no host sync: the
        pre-flight and the FLOP count run it on fake tensors)."""

    # ------------------------------------------------------------------ validation
    @abstractmethod
    def validate(self, model: BioFormer, ctx: StepContext) -> dict[str, float]:
        """Validation metrics (``val_*``) over every rank's share, all-reduced."""

    @abstractmethod
    def validation_line(self, v: dict[str, float]) -> str:
        """The metrics of a validation for the log (the monitor is added by the trainer)."""

    # ------------------------------------------------------------------ outputs
    def model_file(self) -> dict[str, Any]:
        """What ``model.pt`` carries besides the weights and configs (rebuilds the model); a
        task adds its own keys."""
        return {"n_genes": len(self.genes), "n_bins": self.n_bins, "genes": self.genes}

    def step_spec(self, micro_batch_size: int, precision: str, device: str) -> StepSpec:
        """The shapes of one training micro-batch (the FLOP count)."""
        prior = self.spec.prior
        return StepSpec(
            model=self.spec.model,
            batch_size=micro_batch_size,
            seq_len=int(self.data.values.shape[1]),
            n_genes=len(self.genes),
            n_bins=self.n_bins,
            precision=precision,
            device=device,
            prior=prior is not None,
            prior_mode=prior.mode if prior is not None else "init",
            task=self.name,
        )


class TaskLoss(torch.nn.Module):
    """``forward(batch) = task.loss_terms(model, batch)``: DDP sees (and all-reduces) the whole
    loss graph of whatever task runs."""

    def __init__(self, model: torch.nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self._task = task  # not a module: kept out of state_dict

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        return self._task.loss_terms(self.model, batch)
