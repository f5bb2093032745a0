"""Item ``compile``: the journal step in every ``train.compile`` mode (eager, fused, blocks,
model; :mod:`evoformer.model.fused`), side by side: samples/s, the first step (compilation
included), model TFLOP/s and share of the device's peak (:func:`benchmarks.gpu_check.step.
efficiency`) and the speedup over eager, the step before issue 19 (its target: >= 3x); then
the fastest mode next to the one ``train.compile: auto`` runs on this device type
(:data:`evoformer.model.fused.AUTO_COMPILE`, which lists a mode only where it was measured to
win)."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from benchmarks.gpu_check.common import Context, first_line, free_memory, is_oom, progress
from benchmarks.gpu_check.step import efficiency
from benchmarks.gpu_check.throughput import timed_steps
from evoformer.model.fused import AUTO, compile_mode


def item_compile(ctx: Context, partial: Callable[[dict], None]) -> dict[str, Any]:
    cfg = ctx.sizes.journal
    precision = cfg.precision
    res: dict[str, Any] = {"config": cfg.describe(), "precision": precision}
    rows: list[dict[str, Any]] = []
    res["rows"] = rows
    errors: list[str] = []
    for mode in ctx.sizes.compile_modes:
        progress(f"  compile {mode}")
        try:
            row = {"mode": mode, **timed_steps(ctx, cfg, precision, mode)}
            try:
                step_s = row["seconds"] / row["steps_timed"]
                row.update(efficiency(ctx, cfg, precision, row["samples_per_s"], step_s))
            except Exception as exc:  # noqa: BLE001 - the timing stands without it
                row["flops_error"] = f"{type(exc).__name__}: {first_line(str(exc))}"
                errors.append(f"{mode} FLOP accounting: {row['flops_error']}")
        except Exception as exc:  # noqa: BLE001 - one mode's failure must not lose the others
            free_memory()
            status = "oom" if is_oom(exc) else "error"
            row = {"mode": mode, "status": status, "note": first_line(str(exc), 160)}
            if status == "error":
                row["traceback"] = traceback.format_exc()[-2000:]
                errors.append(f"{mode}: {type(exc).__name__}: {row['note']}")
        rows.append(row)
        partial(res)
    base = next((r for r in rows if r["mode"] == ctx.sizes.compile_modes[0]), None)
    if base is not None and base.get("status") == "ok":
        for r in rows:
            if r.get("status") == "ok":
                r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
        ok = [r for r in rows if r.get("status") == "ok"]
        res["fastest"] = max(ok, key=lambda r: r["samples_per_s"])["mode"]
    res["auto"] = compile_mode(AUTO, ctx.device.type)
    if errors:
        res["errors"] = errors
    return res
