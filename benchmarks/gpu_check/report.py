"""``gpu_check.md``: the results as Markdown tables, one section per item."""

from __future__ import annotations

from typing import Any

from benchmarks.gpu_check.common import ITEMS, MEMORY_ITEMS, MIB, fmt, human


def render_markdown(data: dict[str, Any]) -> str:
    """The results as Markdown tables (one section per item; missing items are left out)."""
    meta, items = data.get("meta", {}), data.get("items", {})
    lines = ["# GPU check", ""]
    lines.append(f"Command: `{meta.get('command', '')}`  ")
    lines.append(
        f"Mode: {meta.get('mode')}; started {meta.get('started')}; "
        f"device: {meta.get('device')}; torch {meta.get('torch')}; "
        f"budget {meta.get('budget_s')} s."
    )
    lines.append("")

    env = items.get("env")
    if env:
        lines += ["## Environment", ""]
        if env.get("status") == "ok":
            lines += ["| key | value |", "|---|---|"]
            for k, v in (env.get("info") or {}).items():
                if k == "gpu_total_memory_bytes":
                    v = human(v)
                lines.append(f"| {k} | {fmt(v)} |")
            lines.append("")
        lines += _status_line(env)

    mem_rows = [(n, items[n]) for n in MEMORY_ITEMS if n in items]
    if mem_rows:
        lines += [
            "## Peak memory of one training step: measured vs the pre-flight's prediction",
            "",
            "Steady-state step (after one warm-up step): forward through `model.loss`, backward, "
            "`clip_grad_norm_`, AdamW step. Measured: `torch.cuda.max_memory_allocated` (CPU dry "
            "run: the profiler's allocator peak); traced: `evoformer.memory.preflight` "
            "(FakeTensorMode + MemTracker); analytical: `evoformer.memory.analytical.estimate`.",
            "",
            "| configuration | measured | traced | analytical | measured / traced "
            "| measured - traced | traced + allowance >= measured | warm-up step peak "
            "| reserved peak | status |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _, e in mem_rows:
            diff = e.get("measured_minus_traced_bytes")
            lines.append(
                f"| {fmt(e.get('config'))} | {human(e.get('measured_peak_bytes'))} "
                f"| {human(e.get('traced_peak_bytes'))} | {human(e.get('analytical_peak_bytes'))} "
                f"| {fmt(e.get('measured_over_traced'))} "
                f"| {'-' if diff is None else f'{diff / MIB:+.1f} MiB'} "
                f"| {_covers(e)} "
                f"| {human(e.get('warmup_peak_bytes'))} | {human(e.get('reserved_peak_bytes'))} "
                f"| {e.get('status')} |"
            )
        lines.append("")
        for _, e in mem_rows:
            if e.get("traced_host_bytes"):
                lines.append(
                    f"Pinned host memory of {fmt(e.get('config'))}: traced "
                    f"{human(e.get('traced_host_bytes'))}, analytical "
                    f"{human(e.get('analytical_host_bytes'))}, measured (active peak of the "
                    f"pinned allocator) {human(e.get('measured_host_bytes'))}."
                )
                lines.append("")
        for name, e in mem_rows:
            lines += _status_line(e, name)

    thr = items.get("throughput")
    if thr:
        lines += [
            "## Training throughput (journal configuration)",
            "",
            f"{fmt(thr.get('config'))}; timed loop of full training steps between "
            "`torch.cuda.synchronize` calls, after two warm-up steps.",
            "",
            "| precision | samples/s | step ms | steps timed | peak allocated | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in thr.get("rows") or []:
            lines.append(
                f"| {r.get('precision')} | {fmt(r.get('samples_per_s'), 4)} "
                f"| {fmt(r.get('step_ms'), 4)} | {fmt(r.get('steps_timed'))} "
                f"| {human(r.get('peak_bytes'))} | {fmt(r.get('note') or r.get('status'))} |"
            )
        if thr.get("bf16_speedup"):
            lines.append("")
            lines.append(f"bf16 / fp32 samples/s: {thr['bf16_speedup']:.2f}x")
        lines.append("")
        counted = [r for r in thr.get("rows") or [] if r.get("model_flops_per_sample")]
        if counted:
            lines += _efficiency_table(counted)
        lines += _status_line(thr)

    cp = items.get("compile")
    if cp:
        lines += [
            "## Eager vs fused vs compiled step (`train.compile`, journal configuration)",
            "",
            f"{fmt(cp.get('config'))}; each mode (`evoformer.model.fused`) timed as the "
            "throughput item times a precision; *first step* includes compilation; speedup = "
            "samples/s over eager's (the step before issue 19; target >= 3x).",
            "",
            "| mode | samples/s | step ms | first step s | model TFLOP/s | of peak | speedup "
            "| peak allocated | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in cp.get("rows") or []:
            lines.append(
                f"| {r.get('mode')} | {fmt(r.get('samples_per_s'), 4)} "
                f"| {fmt(r.get('step_ms'), 4)} | {fmt(r.get('first_step_s'), 3)} "
                f"| {fmt(r.get('model_tflops_per_s'), 4)} "
                f"| {pct(r.get('model_flops_utilization'))} | {fmt(r.get('speedup'), 3)} "
                f"| {human(r.get('peak_bytes'))} | {fmt(r.get('note') or r.get('status'))} |"
            )
        lines.append("")
        if cp.get("auto"):
            lines += [
                f"Fastest: {fmt(cp.get('fastest'))}; `train.compile: auto` runs {cp['auto']} on "
                "this device type (`evoformer.model.fused.AUTO_COMPILE`).",
                "",
            ]
        lines += _status_line(cp)

    sd = items.get("sdpa")
    if sd:
        lines += ["## SDPA backends for the MSA row attention", ""]
        if sd.get("shapes"):
            lines += [f"Inputs: {sd['shapes']}; forward + backward, each backend alone.", ""]
        probes = sd.get("probes") or {}
        dtypes = list(probes)
        if dtypes:
            lines += [
                "| backend | " + " | ".join(dtypes) + " |",
                "|---|" + "---|" * len(dtypes),
            ]
            names = sorted({b for p in probes.values() for b in p})
            for b in names:
                lines.append(
                    f"| {b} | " + " | ".join(fmt(probes[dt].get(b))[:200] for dt in dtypes) + " |"
                )
            lines.append("")
        for dt, dflt in (sd.get("default") or {}).items():
            lines.append(
                f"- default choice, {dt}: {', '.join(dflt.get('backends') or []) or 'none seen'}"
            )
        for name, st in (sd.get("training_step") or {}).items():
            lines.append(
                f"- one training step, {name} ({st.get('config')}): "
                f"{', '.join(st.get('backends') or []) or 'none seen'}"
            )
        lines.append("")
        lines += _status_line(sd)

    sm = items.get("ddp_smoke")
    if sm:
        lines += [
            "## Training entry point smoke run (`python -m evoformer.launch -- ...`)",
            "",
            "| passed | world size | backend | device | precision | steps | samples/s "
            "| model TFLOP/s | of peak | peak memory | peak source | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {fmt(sm.get('passed'))} | {fmt(sm.get('world_size'))} | {fmt(sm.get('backend'))} "
            f"| {fmt(sm.get('device'))} | {fmt(sm.get('precision'))} "
            f"| {fmt(sm.get('total_steps'))} | {fmt(sm.get('samples_per_s'), 4)} "
            f"| {fmt(sm.get('model_tflops_per_s'), 4)} | {pct(sm.get('model_flops_utilization'))} "
            f"| {human(sm.get('peak_memory_bytes'))} | {fmt(sm.get('peak_memory_source'))} "
            f"| {fmt(sm.get('seconds'))} |",
            "",
        ]
        if sm.get("launcher_line"):
            lines.append(f"Launcher: {sm['launcher_line']}  ")
        if sm.get("training_line"):
            lines.append(f"Trainer: training on {sm['training_line']}")
        lines.append("")
        lines += _status_line(sm)

    nc = items.get("nccl_ddp")
    if nc:
        lines += [
            "## Process group + DDP under torchrun (one rank per GPU)",
            "",
            "| passed | backend | world size | all-reduce | params in sync | losses | NCCL "
            "| init s | seconds |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {fmt(nc.get('passed'))} | {fmt(nc.get('backend'))} | {fmt(nc.get('world_size'))} "
            f"| {fmt(nc.get('all_reduce_ok'))} | {fmt(nc.get('params_in_sync'))} "
            f"| {', '.join(f'{x:.3f}' for x in nc.get('losses') or [])} "
            f"| {fmt(nc.get('nccl_version'))} | {fmt(nc.get('init_s'))} "
            f"| {fmt(nc.get('seconds'))} |",
            "",
        ]
        lines += _status_line(nc)

    ld = items.get("loader")
    if ld:
        lines += [
            f"## Data loader at the journal shape ({ld.get('shape', '')})",
            "",
            "| workers | cells | seconds | cells/s |",
            "|---|---|---|---|",
        ]
        for r in ld.get("rows") or []:
            lines.append(
                f"| {r['workers']} | {r['cells']} | {fmt(r['seconds'])} | {fmt(r['cells_per_s'], 4)} |"
            )
        if ld.get("model_samples_per_s"):
            lines.append(
                f"\nModel consumption (journal config, bf16): {fmt(ld['model_samples_per_s'], 4)} "
                f"samples/s; best loader / model: {fmt(ld.get('headroom'))}x"
            )
        lines.append("")
        lines += _status_line(ld)

    missing = [n for n in ITEMS if n not in items]
    if missing:
        lines += [f"Not run: {', '.join(missing)}", ""]
    return "\n".join(lines).rstrip() + "\n"


def pct(x: Any) -> str:
    """A share as a percentage; '-' for None."""
    return "-" if x is None else f"{100 * x:.2f}%"


def _efficiency_table(rows: list[dict[str, Any]]) -> list[str]:
    """The timed rows' FLOPs, TFLOP/s, share of the peak and memory traffic."""
    sources = sorted({r["peak_tflops_source"] for r in rows if r.get("peak_tflops_source")})
    lines = [
        "FLOPs per sample, counted on fake tensors (`evoformer.flops.count`, FlopCounterMode: "
        "matrix products and attention kernels): *model* = forward + backward, *executed* = + "
        "the activation-checkpoint recompute. Share of the device's dense peak for the "
        f"precision: {'; '.join(sources) or 'no peak for this device'}. Memory traffic: an "
        "eager estimate (every ATen operator reads its inputs once and writes its outputs; "
        "views move nothing) of forward + backward + recompute; *pair* = the part over "
        "`r x r` tensors (z, pair bias, logits); TB/s = traffic / step time.",
        "",
        "| precision | model GFLOP/sample | executed GFLOP/sample | model TFLOP/s | of peak "
        "| executed TFLOP/s | of peak | traffic/step | pair share | FLOP/byte | TB/s | of HBM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('precision')} | {fmt(r['model_flops_per_sample'] / 1e9, 4)} "
            f"| {fmt(r['hardware_flops_per_sample'] / 1e9, 4)} "
            f"| {fmt(r.get('model_tflops_per_s'), 4)} | {pct(r.get('model_flops_utilization'))} "
            f"| {fmt(r.get('hardware_tflops_per_s'), 4)} "
            f"| {pct(r.get('hardware_flops_utilization'))} "
            f"| {human(r.get('traffic_bytes_per_step'))} | {pct(r.get('pair_traffic_share'))} "
            f"| {fmt(r.get('arithmetic_intensity'), 3)} | {fmt(r.get('achieved_tb_per_s'), 3)} "
            f"| {pct(r.get('hbm_utilization'))} |"
        )
    lines.append("")
    return lines


def _covers(e: dict[str, Any]) -> str:
    """``yes (+1.00 GiB)`` / ``NO``: does the pre-flight's traced peak plus its workspace
    allowance (shown) cover the measured peak?"""
    if e.get("predicted_covers_measured") is None:
        return "-"
    verdict = "yes" if e["predicted_covers_measured"] else "NO"
    return f"{verdict} (+{human(e.get('workspace_allowance_bytes'))})"


def _status_line(entry: dict[str, Any], name: str | None = None) -> list[str]:
    out = []
    prefix = f"{name}: " if name else ""
    status = entry.get("status")
    if status not in ("ok", None):
        out.append(f"**{prefix}{status}**: {fmt(entry.get('note') or entry.get('error'))}")
    for err in entry.get("errors") or []:
        out.append(f"- {prefix}error: {fmt(err)}")
    if out:
        out.append("")
    return out
