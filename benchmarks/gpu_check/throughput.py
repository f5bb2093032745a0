"""Item ``throughput``: samples/s of the journal step, bf16 vs fp32, with its TFLOP/s, share of
the device's peak and estimated memory traffic (:func:`benchmarks.gpu_check.step.efficiency`)."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.gpu_check.common import Context, first_line, free_memory, is_oom, progress, sync
from benchmarks.gpu_check.sizes import StepConfig
from benchmarks.gpu_check.step import build, efficiency, train_step


def timed_steps(
    ctx: Context, cfg: StepConfig, precision: str, compile: str = "eager"
) -> dict[str, Any]:
    """Samples/s of a timed loop of ``cfg``'s training step in ``precision`` after two warm-up
    steps (the first, ``first_step_s``, includes any compilation of the ``train.compile`` mode
    ``compile``)."""
    dev = ctx.device
    model, optimizer, batch = build(cfg, dev, compile)
    try:
        t0 = time.perf_counter()
        train_step(model, optimizer, batch, precision, dev)  # allocations, AdamW state
        sync(dev)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        train_step(model, optimizer, batch, precision, dev)
        sync(dev)
        one = time.perf_counter() - t0
        target = max(1.0, min(ctx.sizes.throughput_target_s, ctx.remaining() / 4))
        n = int(max(3, min(ctx.sizes.throughput_steps, target // max(one, 1e-6))))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        t0 = time.perf_counter()
        losses = [train_step(model, optimizer, batch, precision, dev) for _ in range(n)]
        sync(dev)
        dt = time.perf_counter() - t0
        row: dict[str, Any] = {
            "precision": precision,
            "status": "ok",
            "steps_timed": n,
            "seconds": dt,
            "samples_per_s": n * cfg.micro_batch / dt,
            "step_ms": 1000 * dt / n,
            "first_step_s": first,
            "last_loss": losses[-1],
        }
        if dev.type == "cuda":
            row["peak_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        return row
    finally:
        del model, optimizer, batch
        free_memory()


def item_throughput(ctx: Context, partial: Callable[[dict], None]) -> dict[str, Any]:
    cfg = ctx.sizes.journal
    res: dict[str, Any] = {"config": cfg.describe(), "micro_batch_size": cfg.micro_batch}
    rows: list[dict[str, Any]] = []
    res["rows"] = rows
    flops_errors: list[str] = []
    for precision in ("bf16", "fp32"):
        progress(f"  throughput {precision}")
        try:
            row = timed_steps(ctx, cfg, precision)
            rows.append(row)
            try:  # after the timing: the fake-tensor count runs on the CPU alone
                row.update(
                    efficiency(
                        ctx,
                        cfg,
                        precision,
                        row["samples_per_s"],
                        row["seconds"] / row["steps_timed"],
                    )
                )
            except Exception as exc:  # noqa: BLE001 - the timing stands without it
                row["flops_error"] = f"{type(exc).__name__}: {first_line(str(exc))}"
                flops_errors.append(f"{precision} FLOP accounting: {row['flops_error']}")
        except Exception as exc:  # noqa: BLE001 - fp32 may not fit
            free_memory()
            if is_oom(exc):
                rows.append(
                    {
                        "precision": precision,
                        "status": "oom",
                        "note": f"{precision} does not fit at micro-batch {cfg.micro_batch}: "
                        + first_line(str(exc), 160),
                    }
                )
            else:
                rows.append(
                    {
                        "precision": precision,
                        "status": "error",
                        "note": f"{type(exc).__name__}: {first_line(str(exc))}",
                        "traceback": traceback.format_exc()[-2000:],
                    }
                )
        partial(res)
    ok = {r["precision"]: r for r in rows if r.get("status") == "ok"}
    if "bf16" in ok and "fp32" in ok:
        res["bf16_speedup"] = ok["bf16"]["samples_per_s"] / ok["fp32"]["samples_per_s"]
    errors = [f"{r['precision']}: {r['note']}" for r in rows if r["status"] == "error"]
    if errors or flops_errors:
        res["errors"] = errors + flops_errors
    return res
