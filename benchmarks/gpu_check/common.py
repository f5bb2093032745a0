"""What every item shares: constants, formatting, the device helpers, the results and the context."""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_check.sizes import Sizes

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
MIB = 2**20
ITEMS = (
    "env",
    "memory_journal",
    "memory_pair_stack",
    "memory_r2001",
    "throughput",
    "compile",
    "ddp_smoke",
    "nccl_ddp",
    "loader",
    "sdpa",  # last: forcing a backend that crashes must not cost the other items
)
MEMORY_ITEMS = ("memory_journal", "memory_pair_stack", "memory_r2001")
GROUPS = {"memory": MEMORY_ITEMS, "all": ITEMS}
NO_CUDA_MESSAGE = (
    "gpu_check: needs a CUDA device (torch.cuda.is_available() is False); nothing measured. "
    "Use --cpu-dry-run to exercise the code path on the CPU."
)


# ----------------------------------------------------------------------------- helpers
T0 = time.perf_counter()


def progress(msg: str) -> None:
    """One progress line with the elapsed time, flushed."""
    print(f"[gpu_check {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def human(n: float | None) -> str:
    """Bytes as GiB (>= 1 GiB) or MiB; '-' for None."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else "-"
    return str(x).replace("|", "/")


def first_line(text: str, limit: int = 240) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


def clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------- results
class Recorder:
    """Holds the results and rewrites ``gpu_check.json`` and ``gpu_check.md`` after every item."""

    def __init__(self, out: Path, meta: dict[str, Any], merge: bool) -> None:
        self.out = out
        self.json_path = out / "gpu_check.json"
        self.md_path = out / "gpu_check.md"
        items: dict[str, Any] = {}
        if merge and self.json_path.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                old = json.loads(self.json_path.read_text())
                if old.get("meta", {}).get("mode") == meta.get("mode"):
                    items = dict(old.get("items") or {})
        self.data: dict[str, Any] = {"meta": meta, "items": items}

    def record(self, name: str, entry: dict[str, Any]) -> None:
        entry = {**entry, "recorded_at": datetime.datetime.now().isoformat(timespec="seconds")}
        self.data["items"][name] = clean(entry)
        self.flush()

    def flush(self) -> None:
        from benchmarks.gpu_check.report import render_markdown
        from evoformer.io import write_text_atomic

        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.json_path, json.dumps(clean(self.data), indent=2) + "\n")
        write_text_atomic(self.md_path, render_markdown(self.data))


@dataclass
class Context:
    """What every item needs: mode, device (and its name, for the peak table), sizes, output
    folder, the global deadline, the step counts made so far."""

    dry: bool
    device: torch.device
    sizes: Sizes
    out: Path
    deadline: float
    recorder: Recorder
    gpu_mem_gib: float
    device_name: str = "cpu"
    #: step counts of :func:`benchmarks.gpu_check.step.step_cost`, by (configuration, precision)
    costs: dict[tuple[str, str], Any] = field(default_factory=dict)

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    @property
    def trace_device(self) -> str:
        return "cpu" if self.dry else "cuda"
