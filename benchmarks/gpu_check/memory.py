"""Items ``memory_journal``, ``memory_pair_stack``, ``memory_r2001``: a step's measured peak vs
the pre-flight's (``memory_r2001``: also the pinned host memory of its offloaded checkpoints)."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.gpu_check.common import Context, first_line, free_memory, is_oom, sync
from benchmarks.gpu_check.sizes import StepConfig
from benchmarks.gpu_check.step import build, train_step


def _measure(ctx: Context, cfg: StepConfig) -> dict[str, Any]:
    """Peak of the steady-state training step of ``cfg`` on ``ctx.device`` (after one warm-up
    step): ``torch.cuda.max_memory_allocated`` on CUDA, the profiler's allocator peak on CPU."""
    from evoformer.memory.measured import measure_cpu_peak, measure_cuda_peak

    dev = ctx.device
    model, optimizer, batch = build(cfg, dev)

    def step() -> float:
        return train_step(model, optimizer, batch, cfg.precision, dev)

    res: dict[str, Any] = {}
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        step()
        sync(dev)
        res["warmup_step_s"] = time.perf_counter() - t0
        res["warmup_peak_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        _reset_pinned_peak()
        t0 = time.perf_counter()
        m = measure_cuda_peak(step, dev)
        res["step_s"] = time.perf_counter() - t0
        res["reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved(dev))
        res["measured_host_bytes"] = _pinned_peak()
    else:
        t0 = time.perf_counter()
        step()
        res["warmup_step_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = measure_cpu_peak(step, model, optimizer, batch)
        res["step_s"] = time.perf_counter() - t0
    res.update(
        measured_peak_bytes=int(m.peak_bytes),
        measured_baseline_bytes=int(m.baseline_bytes),
        measured_source=m.source,
    )
    return res


def _reset_pinned_peak() -> None:
    try:
        torch.cuda.reset_peak_host_memory_stats()
    except (AttributeError, RuntimeError):
        pass


def _pinned_peak() -> int | None:
    """Peak bytes in use in the pinned host allocator since :func:`_reset_pinned_peak` (the
    offloaded checkpoints' copies; None without the statistics or without pinned memory)."""
    try:
        return int(torch.cuda.host_memory_stats().get("active_bytes.peak", 0)) or None
    except (AttributeError, RuntimeError):
        return None


def item_memory(ctx: Context, partial: Callable[[dict], None], cfg: StepConfig) -> dict[str, Any]:
    from evoformer.memory.preflight import preflight
    from evoformer.memory.spec import data_shape

    res: dict[str, Any] = {
        "config": cfg.describe(),
        "model": cfg.model,
        "n_hvg": cfg.n_hvg,
        "n_bins": cfg.n_bins,
        "micro_batch_size": cfg.micro_batch,
        "precision": cfg.precision,
        "errors": [],
    }
    # measured: one warm-up step, then the steady-state step (AdamW moments exist)
    try:
        res.update(_measure(ctx, cfg))
    except Exception as exc:  # noqa: BLE001 - recorded; the trace still runs
        kind = "OOM" if is_oom(exc) else type(exc).__name__
        res["errors"].append(f"measured: {kind}: {first_line(str(exc))}")
        res["measured_traceback"] = traceback.format_exc()[-2000:]
    free_memory()
    partial(res)
    # predicted: the pre-flight's trace of the same step, and the analytical estimate
    try:
        train_cfg = {
            "micro_batch_size": cfg.micro_batch,
            "global_batch_size": cfg.micro_batch,
            "precision": cfg.precision,
        }
        pf = preflight(
            cfg.model,
            train_cfg,
            data_shape(cfg.n_hvg, cfg.n_bins),
            gpu_mem_gib=ctx.gpu_mem_gib,
            n_gpus=1,
            safety_margin=0.1,
            auto_micro_batch=False,
            raise_on_oom=False,
            device=ctx.trace_device,
        )
        res.update(
            traced_peak_bytes=int(pf.predicted_peak_bytes),
            analytical_peak_bytes=int(pf.analytical_peak_bytes),
            traced_phase=(pf.traced or {}).get("phase"),
            traced_by_category=(pf.traced or {}).get("by_category"),
            analytical_by_category=(pf.analytical or {}).get("by_category"),
            preflight_fits=pf.fits,
            preflight_message=pf.message(),
            preflight_gpu_mem_gib=ctx.gpu_mem_gib,
            preflight_seconds=pf.seconds,
            workspace_allowance_bytes=int(pf.workspace_bytes),
            traced_host_bytes=int(pf.host_bytes),
            analytical_host_bytes=int((pf.analytical or {}).get("host_bytes", 0)),
        )
    except Exception as exc:  # noqa: BLE001
        res["errors"].append(f"traced: {type(exc).__name__}: {first_line(str(exc))}")
        res["traced_traceback"] = traceback.format_exc()[-2000:]
    res.update(compare(res))
    return res


def compare(res: dict[str, Any]) -> dict[str, Any]:
    """Predicted vs measured peak: ``measured_over_traced``, ``measured_minus_traced_bytes``,
    ``predicted_peak_bytes`` (traced + the pre-flight's workspace allowance, 0 on a CPU trace:
    what its verdict counts), ``predicted_covers_measured`` and ``traced_over_analytical``, from
    the entry's ``measured_peak_bytes``, ``traced_peak_bytes``, ``workspace_allowance_bytes``
    and ``analytical_peak_bytes`` (what is missing is left out)."""
    out: dict[str, Any] = {}
    meas, tr = res.get("measured_peak_bytes"), res.get("traced_peak_bytes")
    if meas and tr:
        out["measured_over_traced"] = meas / tr
        out["measured_minus_traced_bytes"] = meas - tr
        predicted = tr + res.get("workspace_allowance_bytes", 0)
        out["predicted_peak_bytes"] = predicted
        out["predicted_covers_measured"] = predicted >= meas
    an = res.get("analytical_peak_bytes")
    if tr and an:
        out["traced_over_analytical"] = tr / an
    return out
