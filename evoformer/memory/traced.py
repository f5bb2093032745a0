"""Traced estimate: the real training step under ``FakeTensorMode`` with ``MemTracker``.

Nothing is allocated: every tensor is a fake CPU tensor carrying only shape, dtype and strides,
so a step that needs 500 GB on a GPU is traced on a laptop. ``MemTracker`` sees every storage
the step creates and frees (parameters, gradients, optimizer states, activations kept for
backward, temporaries) and reports the peak with its breakdown by category and by module.

The traced step is the trainer's (``evoformer/train.py``)::

    model.train()
    with autocast(bf16) if precision == "bf16":
        loss = step_loss(spec, model, batch)
    loss.backward()
    clip_grad_norm_(params, grad_clip); AdamW(lr, weight_decay).step(); zero_grad(set_to_none=True)

in the steady state (the AdamW moments already exist, as from the second step on; with
gradient accumulation, the last micro-batch of a cycle, whose gradients already exist). For a CUDA
target the step runs inside :func:`evoformer.memory.emulation.cuda_emulation` and AdamW /
gradient clipping use their CUDA default (``foreach``) implementations. With ``world_size > 1``
DDP's gradient buckets (one more fp32 copy of the gradients, alive from the first bucket's
all-reduce in backward) are added to the peak as a separate term, ``ddp_buckets``.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from evoformer.memory.emulation import HOST_DEVICE, cuda_emulation
from evoformer.memory.spec import StepSpec, build_model, fake_batch, step_loss

#: MemTracker category names -> ours.
CATEGORIES = {
    "Parameter": "parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "backward_temporaries",
    "Other": "inputs",
}


@dataclass
class TracedResult:
    """Peak memory of one traced training step (bytes, per device).

    Attributes:
        peak_bytes: peak of all live tensors, plus ``ddp_buckets`` when ``world_size > 1``.
        by_category: the live bytes at the peak per category (``parameters``, ``gradients``,
            ``optimizer``, ``activations`` (forward outputs kept alive), ``backward_temporaries``
            (gradients of activations and kernel outputs in backward), ``inputs`` (the batch),
            ``buffers``, ``ddp_buckets``).
        phase: where the peak happens: ``forward``, ``backward`` or ``optimizer``.
        host_peak_bytes: peak of the host memory the step holds for the device (the checkpoint
            inputs ``offload_checkpoints`` keeps in pinned memory; 0 without offloading). Not in
            ``peak_bytes``.
        by_op: per Evoformer op (summed over blocks) and top-level module, the bytes the forward
            leaves alive (``kept``: saved activations plus the output) and the transient rise
            above the memory at entry (``transient``), from MemTracker's module snapshots.
        seconds: wall time of the trace.
    """

    peak_bytes: int
    by_category: dict[str, int]
    phase: str
    by_op: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    host_peak_bytes: int = 0
    spec: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _PhaseTracker(MemTracker):
    """MemTracker that also records the phase of the peak and updates module peaks in O(depth).

    ``MemTracker._update_peak_stats`` scans every tracked module after every op (quadratic in
    model size); here only the active modules (``ModTracker.parents``) are visited, which gives
    the same module peaks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak_phase = "forward"
        self.peak_modules: list[str] = []
        self._by_fqn: dict[str, Any] = {}

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        super()._pre_fw_hook(module, inputs)
        stats = self.memory_tracking[module]
        self._by_fqn[stats.mod_fqn] = stats

    def _update_peak_stats(self, peak_state: Any) -> None:  # same results as the base method
        curr = self._curr_mem_snap
        for fqn in self._mod_tracker.parents:
            stats = self._by_fqn.get(fqn)
            if stats is None or peak_state not in stats.snapshots:
                continue
            for dev, snap in curr.items():
                if stats.local_peak.get(dev, 0) < snap["Total"]:
                    stats.local_peak[dev] = snap["Total"]
                    stats.snapshots[peak_state][-1][dev] = dict(snap)
        for dev, snap in curr.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)
                self.peak_modules = sorted(self._mod_tracker.parents - {"Global"}, key=len)
                if self._in_opt:
                    self.peak_phase = "optimizer"
                elif self._mod_tracker.is_bw:
                    self.peak_phase = "backward"
                else:
                    self.peak_phase = "forward"


def make_optimizer(model: nn.Module, spec: StepSpec) -> torch.optim.Optimizer:
    """The trainer's AdamW; ``foreach`` as CUDA's default when emulating CUDA."""
    foreach = True if spec.device == "cuda" else None
    return torch.optim.AdamW(
        model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, foreach=foreach
    )


def init_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's moments (zero gradients, one step), as they exist from the 2nd step on."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    spec: StepSpec,
) -> torch.Tensor:
    """One optimizer step exactly as the trainer runs it (accumulation 1); returns the loss."""
    model.train()
    device = next(iter(batch.values())).device.type  # "cpu" for fake tensors
    autocast = (
        torch.autocast(device, dtype=torch.bfloat16)
        if spec.precision == "bf16"
        else contextlib.nullcontext()
    )
    with autocast:
        loss = step_loss(spec, model, batch)
    loss.backward()
    foreach = True if spec.device == "cuda" else None
    torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip, foreach=foreach)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


_BLOCK = re.compile(r"\.blocks\.\d+\.([A-Za-z_]+)$")


def _module_breakdown(tracker: _PhaseTracker) -> dict[str, dict[str, int]]:
    """Per op type (summed over blocks) and per top-level module: kept and transient bytes."""
    out: dict[str, dict[str, int]] = {}
    for stats in tracker.memory_tracking.values():
        fqn = stats.mod_fqn
        match = _BLOCK.search(fqn)
        parts = fqn.split(".")
        if match:
            key = match.group(1)
        elif len(parts) == 2:
            key = parts[1]
        else:
            continue
        snaps = stats.snapshots
        pre = snaps.get("Pre-Forward") or []
        post = snaps.get("Post-Forward") or []
        peak = snaps.get("Peak-Forward") or []
        if not pre or not post:
            continue

        def total(s: dict) -> int:  # device memory only (not the emulated host)
            return sum(
                v.get("Total", 0) for d, v in s.items() if torch.device(d).type != HOST_DEVICE
            )

        kept = total(post[0]) - total(pre[0])
        transient = (total(peak[0]) if peak else 0) - total(pre[0])
        pre_bw = snaps.get("Pre-Backward") or []
        peak_bw = snaps.get("Peak-Backward") or []
        bwd = total(peak_bw[-1]) - total(pre_bw[-1]) if pre_bw and peak_bw else 0
        row = out.setdefault(key, {"kept": 0, "transient": 0, "bwd_transient": 0, "count": 0})
        row["kept"] += kept
        row["transient"] = max(row["transient"], transient - kept)
        row["bwd_transient"] = max(row["bwd_transient"], bwd)
        row["count"] += 1
    return out


def trace_step(spec: StepSpec) -> TracedResult:
    """Trace one training step of ``spec`` and return its peak memory per device.

    Runs in ``FakeTensorMode`` (no allocation); takes seconds to a minute on a CPU depending on
    the number of blocks (not on ``B`` or ``r``).
    """
    t0 = time.perf_counter()
    emulate = cuda_emulation() if spec.device == "cuda" else contextlib.nullcontext()
    with FakeTensorMode(), emulate:
        torch.manual_seed(0)
        model = build_model(spec)
        optimizer = make_optimizer(model, spec)
        init_optimizer_state(model, optimizer)
        if spec.grad_accumulation > 1:  # earlier micro-batches of the cycle left gradients
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        batch = fake_batch(spec)
        tracker = _PhaseTracker()
        tracker.track_external(model, optimizer, *batch.values())
        with tracker:
            train_step(model, optimizer, batch, spec)
        snap = tracker.get_tracker_snapshot("peak")
    by_category = dict.fromkeys(CATEGORIES.values(), 0)
    peak = host = 0
    for dev, dev_snap in snap.items():
        if torch.device(dev).type == HOST_DEVICE:  # the emulated host (offloaded checkpoints)
            host += sum(int(v) for k, v in dev_snap.items() if str(k) == "Total")
            continue
        for key, value in dev_snap.items():
            name = key.value if hasattr(key, "value") else str(key)
            if name == "Total":
                peak += int(value)
            elif name in CATEGORIES:
                by_category[CATEGORIES[name]] += int(value)
    ddp = ddp_bucket_bytes(model) if spec.world_size > 1 else 0
    by_category["ddp_buckets"] = ddp
    return TracedResult(
        peak_bytes=peak + ddp,
        by_category=by_category,
        phase=tracker.peak_phase,
        by_op=_module_breakdown(tracker),
        seconds=time.perf_counter() - t0,
        spec=spec.to_dict(),
        host_peak_bytes=host,
    )


def ddp_bucket_bytes(model: nn.Module) -> int:
    """DDP's gradient buckets: one copy of the trainable parameters' gradients (fp32)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
