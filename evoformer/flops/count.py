"""FLOPs and memory traffic of one training step, counted on fake tensors.

**Counting** (:func:`count_step`). The model's own step, ``model.loss(batch)`` (under bf16
autocast when the run uses it) and ``loss.backward()``, runs once under ``FakeTensorMode``
(nothing is allocated or computed: a step of the journal's size is counted in seconds on a CPU)
inside ``torch.utils.flop_counter.FlopCounterMode``, which adds up the FLOPs of the matrix
products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions) and of the fused attention
kernels (scaled dot-product attention: ``4 N H Q K d`` forward; backward ``8 N H Q K d`` for the
math path, ``10 N H Q K d`` for the fused kernels, which recompute ``Q K^T``). Elementwise
work (LayerNorm, softmax, residual adds, the AdamW step) is not counted: this is the usual
*model FLOPs* convention, and it is the FLOPs of the matrix units.

Three counts per micro-batch of ``B`` samples (a sample is one cell, or one MSA of
``n_cells_per_msa`` cells: the unit of ``average_speed_samples_per_s``):

* ``forward_flops``: the forward pass;
* ``model_flops``: forward + backward of the step without any recompute (no activation
  checkpointing, no chunking; the numerator of the model FLOPs utilisation, MFU);
* ``hardware_flops``: what the device executes: ``model_flops`` plus the recompute in backward
  of the checkpointed blocks (``blocks_per_ckpt``; non-reentrant checkpointing stops once the
  tensors backward needs are back, so a block's trailing ops may not be recomputed) and of the
  chunks of the triangle ops and transitions (``chunk_size``); equal to ``model_flops`` with
  neither (the numerator of the hardware FLOPs utilisation, HFU).

The model is the eager one (``train.compile`` changes no matrix product). For a CUDA step the
count runs inside :func:`evoformer.memory.emulation.cuda_emulation`, so attention goes through
the kernel a GPU picks (fused, backward ``10 N H Q K d``); a CPU step takes the model's explicit
softmax path, as the CPU does.

**Memory traffic** (``traffic_bytes``): an estimate of the bytes an *eager* step moves between
the device's memory and its compute units, counted in the same pass: every ATen operator reads
each distinct tensor input once and writes each output once (bytes = elements actually
addressed, a broadcast dimension counted once, times the element size); views and reshapes that
share their input's storage move nothing. Caches and fusion (a compiled step) move less; a
kernel that re-reads its inputs (tiled matrix products) moves more; for the memory-bound ``z``
work (LayerNorm, the pair-bias projection, the outer-product-mean output, residual adds: one
full pass over ``[B, r, r, c_z]`` each) it is exact. ``pair_traffic_bytes`` is the part over
tensors with an ``r x r`` extent (``z``, pair bias, attention logits): what the pair
representation costs. The optimizer step is not included (``O(parameters)``).

Peaks and the achieved figures: :mod:`evoformer.flops.peaks`.
"""

from __future__ import annotations

import contextlib
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from evoformer.memory.spec import StepSpec, build_model, fake_batch, step_loss


# ----------------------------------------------------------------------------- counting
def touched_bytes(t: torch.Tensor) -> int:
    """Bytes an operator addresses in ``t``: elements along non-broadcast dims x element size."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class TrafficCounter(TorchDispatchMode):
    """Adds up the bytes every ATen operator reads (distinct tensor inputs) and writes (outputs).

    Operators that mutate nothing and whose every output shares an input's storage (views,
    ``_unsafe_view``, ``detach``) or that return no tensor (``prim.device``) count nothing; creation ops without data (``empty*``) count
    their outputs as unwritten. A tensor whose addressed elements are a multiple of ``r^2``
    (``r``: tokens per cell) counts into ``pair_bytes`` as well: ``z``, the pair bias, attention
    logits, in any view (``[B r r, c_z]`` of a Linear, ``[B, r, r c_z]`` of the outer product
    mean). With the usual odd ``r = n_hvg + 1`` and power-of-two widths nothing else is; an
    even ``r`` can let an MSA-sized tensor count too.
    """

    _NO_DATA = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r2 = r * r
        self.total_bytes = 0
        self.pair_bytes = 0

    def _add(self, t: torch.Tensor) -> None:
        b = touched_bytes(t)
        self.total_bytes += b
        if b and (b // t.element_size()) % self.r2 == 0:
            self.pair_bytes += b

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        mutates = func._schema.is_mutable
        in_storages = {_storage_key(t) for t in ins}
        if not mutates and (
            func.is_view or all(_storage_key(t) in in_storages for t in outs)
        ):  # a view, an alias or a metadata query (no tensor output): nothing moves
            return out
        seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
        for t in ins:
            key = (_storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if key not in seen:
                seen.add(key)
                self._add(t)
        if func.overloadpacket.__name__ not in self._NO_DATA:
            for t in outs:
                self._add(t)
        return out


class _NoModules:
    """Stands in for ``FlopCounterMode``'s ``ModuleTracker``: every count goes to "Global"."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _NoModules:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


class GlobalFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` (its formulas, its decompositions, ``get_total_flops``) without the
    per-module breakdown: its ``ModuleTracker`` puts gradient hooks on module outputs that fail
    inside a backward's own ``torch.autograd.grad`` (the recomputed chunks of ``chunk_size``)."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _NoModules()


@dataclass
class StepCost:
    """FLOPs and memory traffic of one micro-batch's forward + backward (see the module doc).

    Attributes:
        batch_size: ``B``, samples in the micro-batch.
        forward_flops: the forward pass.
        model_flops: forward + backward without recompute.
        hardware_flops: forward + backward + the recompute of checkpoints and chunks.
        traffic_bytes: estimated memory traffic of the executed step (recompute included;
            None when not estimated).
        pair_traffic_bytes: the part of it over ``r x r`` tensors (None when not estimated).
        recompute_counted: whether the step recomputes (``blocks_per_ckpt`` or ``chunk_size``
            set: ``hardware_flops`` counts it, ``model_flops`` does not).
        device: ``cuda`` (GPU kernels emulated) or ``cpu``.
        precision: ``bf16`` or ``fp32``.
        seconds: wall time of the count.
    """

    batch_size: int
    forward_flops: int
    model_flops: int
    hardware_flops: int
    traffic_bytes: int | None
    pair_traffic_bytes: int | None
    recompute_counted: bool
    device: str
    precision: str
    seconds: float = 0.0
    spec: dict[str, Any] = field(default_factory=dict)

    def per_sample(self, value: int | None) -> float | None:
        """``value / B`` (None stays None)."""
        return None if value is None else value / self.batch_size

    @property
    def model_flops_per_sample(self) -> float:
        return self.model_flops / self.batch_size

    @property
    def hardware_flops_per_sample(self) -> float:
        return self.hardware_flops / self.batch_size

    @property
    def traffic_bytes_per_sample(self) -> float | None:
        return self.per_sample(self.traffic_bytes)

    @property
    def arithmetic_intensity(self) -> float | None:
        """Executed FLOPs per byte of estimated traffic (None without the estimate)."""
        return self.hardware_flops / self.traffic_bytes if self.traffic_bytes else None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the per-sample figures added."""
        d = asdict(self)
        d.update(
            forward_flops_per_sample=self.per_sample(self.forward_flops),
            model_flops_per_sample=self.model_flops_per_sample,
            hardware_flops_per_sample=self.hardware_flops_per_sample,
            traffic_bytes_per_sample=self.traffic_bytes_per_sample,
            pair_traffic_bytes_per_sample=self.per_sample(self.pair_traffic_bytes),
            arithmetic_intensity=self.arithmetic_intensity,
        )
        return d


def _fake_step(spec: StepSpec, traffic: bool) -> tuple[int, int, int, int]:
    """(forward FLOPs, forward + backward FLOPs, traffic bytes, pair traffic bytes) of one
    micro-batch of ``spec`` on fake tensors (traffic 0 unless ``traffic``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if spec.device == "cuda":
        from evoformer.memory.emulation import cuda_emulation

        emulate: Any = cuda_emulation()
    else:
        emulate = contextlib.nullcontext()
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if spec.precision == "bf16"
        else contextlib.nullcontext()
    )
    with torch.random.fork_rng(devices=[]), FakeTensorMode(), emulate:
        model = build_model(spec)
        model.train()
        batch = fake_batch(spec)
        bytes_ = TrafficCounter(spec.r)
        with GlobalFlopCounter() as counter, bytes_ if traffic else nullcontext():
            with autocast:
                loss = step_loss(spec, model, batch)
            forward = counter.get_total_flops()
            loss.backward()
        total = counter.get_total_flops()
    return int(forward), int(total), bytes_.total_bytes, bytes_.pair_bytes


def count_step(spec: StepSpec, traffic: bool = True) -> StepCost:
    """Count the FLOPs and the memory traffic of one training micro-batch of ``spec``.

    Args:
        spec: the step (model, ``B``, ``L``, ``G``, ``K``, labels, prior, precision, device);
            ``opm``, ``world_size`` and the optimizer settings do not enter.
        traffic: also estimate the memory traffic (else ``traffic_bytes`` is None).

    Returns:
        :class:`StepCost`; with ``blocks_per_ckpt`` or ``chunk_size`` the step is counted twice
        (as configured, and without checkpointing and chunking for ``model_flops``). Seconds on a CPU at the
        journal's size; about a minute for the full pair stack chunked at r = 2001 (the chunks'
        operators, not the sizes, set the time).
    """
    t0 = time.perf_counter()
    fwd, hardware, n_bytes, pair = _fake_step(spec, traffic)
    recompute = spec.model.blocks_per_ckpt is not None or spec.model.chunk_size is not None
    model_flops = hardware
    if recompute:
        plain = spec.replace(model={"blocks_per_ckpt": None, "chunk_size": None})
        _, model_flops, _, _ = _fake_step(plain, False)
    return StepCost(
        batch_size=spec.batch_size,
        forward_flops=fwd,
        model_flops=model_flops,
        hardware_flops=hardware,
        traffic_bytes=n_bytes if traffic else None,
        pair_traffic_bytes=pair if traffic else None,
        recompute_counted=recompute,
        device=spec.device,
        precision=spec.precision,
        seconds=time.perf_counter() - t0,
        spec=spec.to_dict(),
    )
