"""The driver: ``python -m benchmarks.gpu_check [--out DIR] [--cpu-dry-run] [--only ITEM,...]``.

Runs the items in order within the global budget (see the package docstring), each in its own
try/except, recording each as soon as it is done; ``--ddp-worker`` is one torchrun rank of the
``nccl_ddp`` item.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # ``python benchmarks/gpu_check`` runs this file directly
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.gpu_check.common import (  # noqa: E402
    GIB,
    GROUPS,
    ITEMS,
    NO_CUDA_MESSAGE,
    T0,
    Context,
    Recorder,
    first_line,
    fmt,
    free_memory,
    human,
    progress,
)
from benchmarks.gpu_check.compile import item_compile  # noqa: E402
from benchmarks.gpu_check.ddp_smoke import item_ddp_smoke  # noqa: E402
from benchmarks.gpu_check.env import item_env  # noqa: E402
from benchmarks.gpu_check.loader import item_loader  # noqa: E402
from benchmarks.gpu_check.memory import item_memory  # noqa: E402
from benchmarks.gpu_check.nccl_ddp import ddp_worker, item_nccl_ddp  # noqa: E402
from benchmarks.gpu_check.sdpa import item_sdpa  # noqa: E402
from benchmarks.gpu_check.sizes import cpu_sizes, gpu_sizes  # noqa: E402
from benchmarks.gpu_check.throughput import item_throughput  # noqa: E402

ITEM_FUNCS: dict[str, Callable[[Context, Callable[[dict], None]], dict[str, Any]]] = {
    "env": item_env,
    "memory_journal": lambda c, p: item_memory(c, p, c.sizes.journal),
    "memory_pair_stack": lambda c, p: item_memory(c, p, c.sizes.pair_stack),
    "memory_r2001": lambda c, p: item_memory(c, p, c.sizes.r2001),
    "throughput": item_throughput,
    "compile": item_compile,
    "sdpa": item_sdpa,
    "ddp_smoke": item_ddp_smoke,
    "nccl_ddp": item_nccl_ddp,
    "loader": item_loader,
}


def run_item(ctx: Context, name: str) -> dict[str, Any]:
    """Run one item within the global budget; record its result, its error, or the skip."""
    rec = ctx.recorder
    left = ctx.remaining()
    if left <= 0:
        entry = {
            "status": "skipped",
            "note": f"global budget spent ({time.perf_counter() - T0:.0f} s elapsed); "
            f"rerun with --only {name}",
        }
        rec.record(name, entry)
        progress(f"{name}: skipped (budget spent)")
        return entry
    progress(f"{name}: start ({left:.0f} s of budget left)")
    t0 = time.perf_counter()

    def partial(res: dict[str, Any]) -> None:
        rec.record(name, {**res, "status": "running", "seconds": time.perf_counter() - t0})

    try:
        res = ITEM_FUNCS[name](ctx, partial)
        status = "ok" if not res.get("errors") and res.get("passed", True) else "failed"
        entry = {**res, "status": status}
    except Exception as exc:  # noqa: BLE001 - one item's failure must not lose the others
        entry = {
            "status": "error",
            "error": f"{type(exc).__name__}: {first_line(str(exc))}",
            "traceback": traceback.format_exc()[-3000:],
        }
    free_memory()
    entry["seconds"] = time.perf_counter() - t0
    rec.record(name, entry)
    extra = entry.get("error") or "; ".join(entry.get("errors") or [])
    progress(
        f"{name}: {entry['status']} in {entry['seconds']:.1f} s" + (f" - {extra}" if extra else "")
    )
    return entry


def summary_lines(data: dict[str, Any]) -> list[str]:
    items = data["items"]
    out = []
    for name in ITEMS:
        e = items.get(name)
        if e is None:
            continue
        bits = [f"{name:18s} {e.get('status', '?'):8s}"]
        if name.startswith("memory") and e.get("measured_peak_bytes"):
            bits.append(
                f"measured {human(e.get('measured_peak_bytes'))}, traced "
                f"{human(e.get('traced_peak_bytes'))}, analytical "
                f"{human(e.get('analytical_peak_bytes'))}, measured/traced "
                f"{fmt(e.get('measured_over_traced'))}"
            )
        if name == "throughput":
            bits.append(
                ", ".join(
                    f"{r['precision']} {fmt(r.get('samples_per_s'), 4)} samples/s "
                    f"{fmt(r.get('model_tflops_per_s'), 3)} TFLOP/s"
                    + (
                        f" ({100 * r['model_flops_utilization']:.2f}% of peak)"
                        if r.get("model_flops_utilization") is not None
                        else ""
                    )
                    if r.get("status") == "ok"
                    else f"{r['precision']} {r.get('status')}"
                    for r in e.get("rows") or []
                )
            )
        if name == "compile":
            bits.append(
                ", ".join(
                    f"{r['mode']} {fmt(r.get('samples_per_s'), 4)} samples/s "
                    f"({fmt(r.get('speedup'), 3)}x)"
                    if r.get("status") == "ok"
                    else f"{r['mode']} {r.get('status')}"
                    for r in e.get("rows") or []
                )
            )
        if name == "sdpa":
            bits.append(
                "; ".join(
                    f"{k}: {','.join(v.get('backends') or [])}"
                    for k, v in (e.get("training_step") or {}).items()
                )
            )
        if name == "ddp_smoke":
            bits.append(
                f"passed={e.get('passed')} world={e.get('world_size')} "
                f"{fmt(e.get('samples_per_s'), 4)} samples/s peak {human(e.get('peak_memory_bytes'))}"
            )
        if name == "nccl_ddp":
            bits.append(f"passed={e.get('passed')} backend={e.get('backend')}")
        if name == "env" and e.get("info"):
            info = e["info"]
            bits.append(f"{info.get('gpu_name', 'cpu')} torch {info.get('torch')}")
        if e.get("error"):
            bits.append(e["error"])
        out.append("  " + " ".join(b for b in bits if b))
    return out


def parse_only(value: str | None) -> list[str]:
    from evoformer.errors import InputError

    if not value:
        return list(ITEMS)
    chosen: list[str] = []
    for part in value.split(","):
        part = part.strip()
        names = GROUPS.get(part, (part,))
        for n in names:
            if n not in ITEMS:
                raise InputError(
                    f"--only {part!r}: unknown item (known: {', '.join(ITEMS)}, memory, all)"
                )
            if n not in chosen:
                chosen.append(n)
    return [n for n in ITEMS if n in chosen]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="One-shot GPU check: memory (measured vs traced vs analytical), bf16 "
        "throughput with TFLOP/s and share of the peak, SDPA backends, a training smoke run, "
        "NCCL + DDP; writes gpu_check.md/json.",
    )
    p.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu_check", help="output folder"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="global time budget in seconds; items not started by then are skipped (default 420)",
    )
    p.add_argument(
        "--only",
        help=f"comma-separated items to (re)run, merged into existing results: {', '.join(ITEMS)}, "
        "memory (both memory items)",
    )
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run every item at tiny sizes on the CPU (fp32, gloo) to exercise the code path",
    )
    p.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.ddp_worker is not None:
        return ddp_worker(args.ddp_worker, args.cpu_dry_run)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, flush=True)
        return 0
    from evoformer.errors import InputError

    try:
        if not args.budget_s > 0:
            raise InputError(f"--budget-s: got {args.budget_s}, expected a positive number")
        only = parse_only(args.only)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dry = bool(args.cpu_dry_run)
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        gpu_mem_gib = torch.cuda.get_device_properties(device).total_memory / GIB
        device_name = torch.cuda.get_device_name(device)
    else:
        gpu_mem_gib = 64.0
        device_name = f"cpu ({os.cpu_count()} cores)"
    out = args.out.resolve()
    meta = {
        "command": " ".join(["python3 -m benchmarks.gpu_check", *(argv or sys.argv[1:])]),
        "mode": "cpu-dry-run" if dry else "gpu",
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name,
        "torch": torch.__version__,
        "budget_s": args.budget_s,
        "items_requested": only,
    }
    rec = Recorder(out, meta, merge=args.only is not None)
    sizes = cpu_sizes() if dry else gpu_sizes()
    ctx = Context(
        dry=dry,
        device=device,
        sizes=sizes,
        out=out,
        deadline=T0 + args.budget_s,
        recorder=rec,
        gpu_mem_gib=gpu_mem_gib,
        device_name=device_name,
    )
    progress(f"mode {meta['mode']}, device {device_name}, torch {torch.__version__}, out {out}")
    rec.flush()
    for name in only:
        run_item(ctx, name)
    total = time.perf_counter() - T0
    rec.data["meta"]["seconds"] = total
    rec.flush()
    print(f"\ngpu_check summary ({total:.0f} s, mode {meta['mode']}):", flush=True)
    for line in summary_lines(rec.data):
        print(line, flush=True)
    print(f"  results: {rec.md_path}\n           {rec.json_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
