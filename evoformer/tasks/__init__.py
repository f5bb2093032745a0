"""Training tasks: what a training run learns, separate from how it is trained.

Public API::

    Task, TaskInputs, StepContext  base.py           what the trainer asks a task for
    MaskedExpression               masked.py         predict masked expression bins
    Perturbation                   perturbation.py   predict a perturbation's effect on a cell
    TASKS                          here              name -> task class
    loss_function(name)            here              the loss of one micro-batch of a task

Where does perturbation prediction live? :mod:`evoformer.tasks.perturbation` (data, batches,
loss, validation, predictions); the benchmark it joins is :mod:`evoformer.perturb`.
"""

from __future__ import annotations

from evoformer.losses import LOSSES, LossFunction
from evoformer.tasks.base import StepContext, Task, TaskInputs, TaskLoss
from evoformer.tasks.masked import MaskedExpression
from evoformer.tasks.perturbation import Perturbation

#: Task name -> task class (``RunSpec.task``; :data:`evoformer.train_config.TASK_METRICS`).
TASKS: dict[str, type[Task]] = {t.name: t for t in (MaskedExpression, Perturbation)}


def loss_function(name: str) -> LossFunction:
    """``f(model, batch) -> (loss, metrics)`` of task ``name``: the step the trainer runs, the
    pre-flight traces and the FLOP count counts (:data:`evoformer.losses.LOSSES`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return LOSSES[name]


__all__ = [
    "TASKS",
    "MaskedExpression",
    "Perturbation",
    "StepContext",
    "Task",
    "TaskInputs",
    "TaskLoss",
    "loss_function",
]
