"""The loss of one micro-batch of each training task (:mod:`evoformer.tasks`), in one light
module (torch only): the trainer runs it, the memory pre-flight traces it and the FLOP count
counts it, the latter two without the tasks' data code (a GPU machine may lack anndata).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

LossFunction = Callable[
    [torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]
]


def masked_loss_terms(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The masked-value loss (+ label loss) of ``BioFormer.loss_terms``."""
    return model.loss_terms(batch)


def perturbation_loss_terms(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean squared error of the predicted log1p expression over every gene token.

    Args:
        batch: ``gene_ids``, ``values``, ``pad_mask``, ``perturbed`` (the inputs) and
            ``target`` (float log1p), each ``[B, 1, L]``.
    """
    out = model(batch["gene_ids"], batch["values"], batch["pad_mask"], batch["perturbed"])
    pred = out["expression"]
    w = batch["pad_mask"].to(torch.float32)
    loss = (((pred.float() - batch["target"].float()) ** 2) * w).sum() / w.sum().clamp(min=1)
    return loss, {"loss": loss.detach(), "expr_mse": loss.detach()}


#: Task name -> its loss (the task classes use these; :func:`evoformer.tasks.loss_function`).
LOSSES: dict[str, LossFunction] = {
    "masked_expression": masked_loss_terms,
    "perturbation": perturbation_loss_terms,
}
