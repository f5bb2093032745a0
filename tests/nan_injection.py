"""Test helper: make the loss or the gradients of chosen optimizer steps non-finite, to test
``evoformer.train``'s divergence handling (skip, count, stop).

In-process: ``monkeypatch.setattr(BioFormer, "loss_terms", poisoned_loss_terms(...))``. In the
training processes torchrun starts: :func:`subprocess_env` returns the environment (a
``sitecustomize.py`` on ``PYTHONPATH`` that calls :func:`install_from_env`, and the plan as
JSON in ``EVOFORMER_TEST_NAN``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor

ENV = "EVOFORMER_TEST_NAN"
REPO = Path(__file__).resolve().parents[1]
#: How a step is poisoned: ``loss`` (value and every gradient NaN), ``value`` (the loss value
#: NaN, gradients finite), ``grad`` (the loss finite, every gradient NaN).
MODES = ("loss", "value", "grad")


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * math.nan


def poison(loss: torch.Tensor, mode: str) -> torch.Tensor:
    """The scalar ``loss`` made non-finite as ``mode`` says (see :data:`MODES`)."""
    if mode == "loss":
        return loss * math.nan
    if mode == "value":
        return loss + math.nan  # d(loss + c)/d(loss) = 1: the gradients stay finite
    if mode == "grad":
        return _NanGrad.apply(loss)
    raise ValueError(f"mode {mode!r} is not one of {MODES}")


def poisoned_loss_terms(
    orig: Callable,
    accum: int,
    steps: tuple[int, ...] | list[int] = (),
    from_step: int | None = None,
    mode: str = "loss",
    rank: int | None = None,
) -> Callable:
    """``BioFormer.loss_terms`` whose loss is poisoned on every micro-batch of the optimizer
    steps ``steps`` and ``from_step`` on (1-based, counted from the first call; ``accum``
    micro-batches per step), on process ``rank`` only (None: every process)."""
    calls = [0]

    def loss_terms(self: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        loss, metrics = orig(self, batch)
        if isinstance(loss, FakeTensor):  # the trainer's FLOP count at start: not a step
            return loss, metrics
        step = calls[0] // accum + 1
        calls[0] += 1
        hit = step in steps or (from_step is not None and step >= from_step)
        if hit and (rank is None or int(os.environ.get("RANK", "0")) == rank):
            loss = poison(loss, mode)
        return loss, metrics

    return loss_terms


def install_from_env() -> None:
    """Patch ``BioFormer.loss_terms`` from the JSON plan in ``$EVOFORMER_TEST_NAN`` (if set)."""
    plan = os.environ.get(ENV)
    if not plan:
        return
    from evoformer.model.bioformer import BioFormer

    BioFormer.loss_terms = poisoned_loss_terms(BioFormer.loss_terms, **json.loads(plan))


def subprocess_env(folder: Path, **plan: Any) -> dict[str, str]:
    """Environment entries that make every Python process started with them apply ``plan``
    (the keyword arguments of :func:`poisoned_loss_terms` but ``orig``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "from tests.nan_injection import install_from_env\n\ninstall_from_env()\n"
    )
    path = os.pathsep.join(x for x in (str(folder), str(REPO), os.environ.get("PYTHONPATH")) if x)
    return {"PYTHONPATH": path, ENV: json.dumps(plan)}
