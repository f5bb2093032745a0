"""Measured memory of a real training step.

* GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (what the CUDA
  caching allocator handed out, 512-byte blocks; the CUDA context and fragmentation are not in
  it), optionally with an allocator snapshot (``torch.cuda.memory._dump_snapshot``, viewable at
  https://pytorch.org/memory_viz).
* CPU: the PyTorch profiler's allocator events (``profile_memory=True``): every allocation and
  free of the CPU allocator with its size, in order. The peak is the largest running sum, plus
  the bytes already live when the step starts (parameters, gradients, optimizer states, batch),
  which the profiler does not see being allocated. This is the CPU counterpart of
  ``max_memory_allocated``; the process RSS includes the Python heap, libraries and the
  allocator's caches and is not comparable with the traced estimate.

The trainer can call :func:`measure_cpu_peak` / :func:`measure_cuda_peak` (or wrap its inline
step in ``with record_cpu_peak(model, optimizer, batch) as rec:``) around one optimizer
step (from the second step on, so AdamW's moments exist) and write the result to
``performance_summary.json`` as ``peak_memory_bytes`` with ``peak_memory_source``
``"profiler"`` / ``"cuda.max_memory_allocated"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class MeasuredResult:
    """Measured peak of one step (bytes).

    Attributes:
        peak_bytes: ``baseline_bytes + step_peak_bytes``.
        baseline_bytes: tensors live before the step (those passed as ``live``).
        step_peak_bytes: the largest rise above the baseline during the step.
        source: ``"profiler"`` (CPU) or ``"cuda.max_memory_allocated"``.
    """

    peak_bytes: int
    baseline_bytes: int
    step_peak_bytes: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, nn.Module):
        for t in obj.parameters():
            yield from _tensors(t)
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from _tensors(list(state.values()))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


def live_bytes(*objs: Any) -> int:
    """Bytes of the distinct storages of the tensors in ``objs`` (modules with their parameters,
    gradients and buffers, optimizers' states, dicts/lists of tensors)."""
    seen: dict[int, int] = {}
    for t in _tensors(list(objs)):
        st = t.untyped_storage()
        seen[st.data_ptr() or id(st)] = st.nbytes()
    return sum(seen.values())


def measure_cpu_peak(step_fn: Callable[[], Any], *live: Any) -> MeasuredResult:
    """Run ``step_fn()`` once on CPU under the profiler and return its peak tensor memory.

    Args:
        step_fn: one training step (forward, backward, optimizer step).
        live: what exists before the step and stays (model, optimizer, batch); their bytes are
            the baseline.
    """
    with record_cpu_peak(*live) as rec:
        step_fn()
    assert rec.result is not None
    return rec.result


class record_cpu_peak:  # noqa: N801 - used like a function: ``with record_cpu_peak(...) as rec``
    """Context manager form of :func:`measure_cpu_peak` for an inline training step::

    with record_cpu_peak(model, optimizer, batch) as rec:
        ...  # forward, backward, optimizer step
    rec.result.peak_bytes  # -> performance_summary peak_memory_bytes ("profiler")
    """

    def __init__(self, *live: Any) -> None:
        self.live = live
        self.result: MeasuredResult | None = None

    def __enter__(self) -> record_cpu_peak:
        self._baseline = live_bytes(*self.live)
        self._prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._prof.__exit__(*exc)
        peak = _peak_of(self._prof)
        self.result = MeasuredResult(self._baseline + peak, self._baseline, peak, "profiler")


def _peak_of(prof: torch.profiler.profile) -> int:
    """Largest running sum of the CPU allocator events of a finished profile."""
    events = [
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(prof.profiler.kineto_results.events())
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort()
    running, peak = 0, 0
    for _, _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def measure_cuda_peak(
    step_fn: Callable[[], Any],
    device: torch.device | int | None = None,
    snapshot: str | Path | None = None,
) -> MeasuredResult:
    """Run ``step_fn()`` on a GPU and return ``torch.cuda.max_memory_allocated`` for it.

    Args:
        step_fn: one training step.
        device: the CUDA device (default: current).
        snapshot: if given, record the allocator history during the step and dump a snapshot
            pickle there (open it at https://pytorch.org/memory_viz).
    """
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    if snapshot is not None:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    step_fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    if snapshot is not None:
        torch.cuda.memory._dump_snapshot(str(snapshot))
        torch.cuda.memory._record_memory_history(enabled=None)
    return MeasuredResult(peak, baseline, peak - baseline, "cuda.max_memory_allocated")


def measure_step(spec: Any, seed: int = 0) -> MeasuredResult:
    """Measure one steady-state training step of ``spec`` for real (CPU or the current GPU).

    Builds the model, AdamW (with its moments, as from the second step on) and a random batch of
    ``spec``'s shapes on ``spec.device``, then measures the step of
    :func:`evoformer.memory.traced.train_step`. Allocates for real: use small configs on CPU.
    """
    from evoformer.memory.traced import (
        build_model,
        fake_batch,
        init_optimizer_state,
        make_optimizer,
        train_step,
    )

    device = torch.device(spec.device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_model(spec)
        optimizer = make_optimizer(model, spec)
        init_optimizer_state(model, optimizer)
        batch = fake_batch(spec)
    if device.type == "cuda":
        return measure_cuda_peak(lambda: train_step(model, optimizer, batch, spec), device)
    return measure_cpu_peak(
        lambda: train_step(model, optimizer, batch, spec), model, optimizer, batch
    )
