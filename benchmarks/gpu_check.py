"""One-shot GPU check: memory, throughput, attention kernels and the training entry point.

Run once on a CUDA machine, from the repository root (the package is used from the working
tree, not installed)::

    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py --out $OUT/gpu

Without a CUDA device it prints that it needs one and exits 0. ``--cpu-dry-run`` runs every
item at tiny sizes on the CPU (fp32 and bf16 autocast on CPU, gloo for the training run) so the
whole code path can be exercised anywhere; ``--only ITEM[,ITEM]`` reruns some items and merges
them into the existing results in ``--out``.

Items (each in its own try/except; each writes its row, or its error, as soon as it is done, so
a run cut short keeps what it measured; a global ``--budget-s`` skips what is left with a note):

``env``
    GPU name / memory / driver (``nvidia-smi`` if present), torch / CUDA / cuDNN / NCCL
    versions, the SDPA backend switches, the fp32 matmul precision.
``memory_journal``, ``memory_pair_stack``
    Peak memory of one steady-state training step (forward through ``model.loss``, backward,
    gradient clipping, AdamW step; after one warm-up step): measured
    ``torch.cuda.max_memory_allocated`` (CPU: the profiler's allocator peak) vs the pre-flight's
    traced prediction (``evoformer.memory.preflight``, ``FakeTensorMode`` + ``MemTracker``) and
    the analytical estimate, for (a) the journal configuration (BioFormer, n_hvg 500 -> r = 501,
    c_m 128, 4 heads of 32, c_z 128, c_opm 32, 8 blocks, micro-batch 32, bf16 autocast,
    ``blocks_per_ckpt`` 1, 51 bins) and (b) the full pair stack (preset ``evoformer``, r = 129,
    c_z 64, micro-batch 4, ``chunk_size`` 32, ``blocks_per_ckpt`` 1, 4 blocks).
``throughput``
    Samples/s of training steps of the journal configuration (warm-up, then a timed loop between
    ``torch.cuda.synchronize`` calls), bf16 autocast vs fp32 (a note when fp32 does not fit).
``ddp_smoke``
    The real training entry point, ``python -m evoformer.launch -- ...`` (torchrun, one process
    per visible GPU), on a small binned dataset written here with numpy; passes if it exits 0
    and writes ``model.pt``; samples/s and peak memory from ``performance_summary.json``, world
    size from ``run_info.json``, backend from its log.
``nccl_ddp``
    An NCCL process group (gloo on CPU) under torchrun with one rank per GPU: an all-reduce and
    three DDP training steps of a tiny BioFormer (the trainer itself creates no process group
    when it runs as a single process, so ``ddp_smoke`` on one GPU does not touch NCCL).
``loader``
    The training data path at the journal shape: masked micro-batches of 32 cells x 500 genes
    from memory-mapped binned arrays (``evoformer.train.TrainBatches`` through a
    ``DataLoader``) with 0, 2 and 4 worker processes (pinned memory on CUDA), in cells/s, next
    to the model's consumption from ``throughput``: the loader is not the bottleneck when its
    cells/s is well above the model's samples/s.
``sdpa``
    Which ``scaled_dot_product_attention`` backends run in one training step of each
    configuration (profiler op / kernel names), which one runs by default for the row-attention
    shapes ``[B*S, H, r, d]`` with the float bias the model passes, and which backends accept
    those inputs when forced alone (``torch.nn.attention.sdpa_kernel``, forward + backward). Runs
    last, so a forced backend that crashes the process costs no other item.

Outputs in ``--out`` (default ``benchmarks/out/gpu_check``): ``gpu_check.md`` (Markdown tables
for BENCHMARKS.md), ``gpu_check.json`` (raw figures), ``ddp_smoke/`` (the training run's data,
outputs and log), ``nccl_ddp/``. Uses only numpy, pandas, torch and the ``evoformer`` modules that
import nothing else (no scanpy / anndata / jsonschema).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30
MIB = 2**20
ITEMS = (
    "env",
    "memory_journal",
    "memory_pair_stack",
    "throughput",
    "ddp_smoke",
    "nccl_ddp",
    "loader",
    "sdpa",  # last: forcing a backend that crashes must not cost the other items
)
GROUPS = {"memory": ("memory_journal", "memory_pair_stack"), "all": ITEMS}
NO_CUDA_MESSAGE = (
    "gpu_check: needs a CUDA device (torch.cuda.is_available() is False); nothing measured. "
    "Use --cpu-dry-run to exercise the code path on the CPU."
)


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class StepConfig:
    """One training step's configuration: model keys (``ModelConfig``), data and batch.

    ``n_hvg`` genes per cell (every gene a token: ``L = n_hvg``, ``r = L + 1``), ``n_bins`` bins,
    ``micro_batch`` MSAs of ``S = n_cells_per_msa`` cells per step, ``precision`` bf16 / fp32.
    """

    name: str
    model: dict[str, Any]
    n_hvg: int
    n_bins: int
    micro_batch: int
    precision: str

    def describe(self) -> str:
        m = self.model
        extra = []
        if m.get("chunk_size"):
            extra.append(f"chunk {m['chunk_size']}")
        if m.get("blocks_per_ckpt"):
            extra.append(f"ckpt {m['blocks_per_ckpt']}")
        return (
            f"{m['preset']} r={self.n_hvg + 1} c_m={m['c_m']} c_z={m['c_z']} c_opm={m['c_opm']} "
            f"blocks={m['n_blocks']} B={self.micro_batch} {self.precision}"
            + (" " + " ".join(extra) if extra else "")
        )


@dataclass(frozen=True)
class Sizes:
    """Everything whose size differs between the GPU run and the CPU dry run."""

    journal: StepConfig
    pair_stack: StepConfig
    smoke_model: dict[str, Any]
    smoke_cells: int
    smoke_genes: int
    smoke_micro: int
    smoke_global: int
    smoke_steps: int
    throughput_steps: int
    throughput_target_s: float
    ddp_timeout_s: int


def gpu_sizes() -> Sizes:
    journal = StepConfig(
        name="journal",
        model={
            "preset": "bioformer",
            "c_m": 128,
            "n_heads_msa": 4,
            "c_hidden_msa": 32,
            "c_z": 128,
            "c_opm": 32,
            "n_blocks": 8,
            "blocks_per_ckpt": 1,
        },
        n_hvg=500,
        n_bins=51,
        micro_batch=32,
        precision="bf16",
    )
    pair = StepConfig(
        name="pair_stack",
        model={
            "preset": "evoformer",
            "c_m": 64,
            "c_z": 64,
            "c_opm": 32,
            "n_heads_msa": 4,
            "c_hidden_msa": 16,
            "n_heads_pair": 4,
            "c_hidden_pair": 16,
            "c_hidden_tri_mul": 64,
            "n_blocks": 4,
            "chunk_size": 32,
            "blocks_per_ckpt": 1,
        },
        n_hvg=128,
        n_bins=51,
        micro_batch=4,
        precision="bf16",
    )
    smoke = {"preset": "bioformer", "c_m": 64, "c_z": 32, "c_opm": 16, "n_blocks": 2}
    return Sizes(journal, pair, smoke, 512, 127, 16, 16, 20, 10, 15.0, 300)


def cpu_sizes() -> Sizes:
    journal = StepConfig(
        name="journal",
        model={
            "preset": "bioformer",
            "c_m": 32,
            "n_heads_msa": 2,
            "c_hidden_msa": 16,
            "c_z": 16,
            "c_opm": 8,
            "n_blocks": 2,
            "blocks_per_ckpt": 1,
        },
        n_hvg=31,
        n_bins=11,
        micro_batch=4,
        precision="fp32",
    )
    pair = StepConfig(
        name="pair_stack",
        model={
            "preset": "evoformer",
            "c_m": 16,
            "c_z": 16,
            "c_opm": 8,
            "n_heads_msa": 2,
            "c_hidden_msa": 8,
            "n_heads_pair": 2,
            "c_hidden_pair": 8,
            "c_hidden_tri_mul": 16,
            "n_blocks": 2,
            "chunk_size": 8,
            "blocks_per_ckpt": 1,
        },
        n_hvg=15,
        n_bins=11,
        micro_batch=2,
        precision="fp32",
    )
    smoke = {"preset": "bioformer", "c_m": 16, "c_z": 8, "c_opm": 4, "n_blocks": 1}
    return Sizes(journal, pair, smoke, 96, 15, 4, 8, 3, 3, 2.0, 240)


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
        from evoformer.io import write_text_atomic

        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.json_path, json.dumps(clean(self.data), indent=2) + "\n")
        write_text_atomic(self.md_path, render_markdown(self.data))


@dataclass
class Context:
    """What every item needs: mode, device, sizes, output folder, the global deadline."""

    dry: bool
    device: torch.device
    sizes: Sizes
    out: Path
    deadline: float
    recorder: Recorder
    gpu_mem_gib: float

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    @property
    def trace_device(self) -> str:
        return "cpu" if self.dry else "cuda"


# ----------------------------------------------------------------------------- training step
def build(
    cfg: StepConfig, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    """BioFormer, AdamW (the trainer's settings) and one masked batch ``[B, S, L]`` on ``device``."""
    from evoformer.model import BioFormer, ModelConfig, apply_value_mask

    mcfg = ModelConfig.from_dict(cfg.model)
    torch.manual_seed(0)
    model = BioFormer(mcfg, n_genes=cfg.n_hvg, n_bins=cfg.n_bins, n_labels=0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    b, s, length = cfg.micro_batch, mcfg.n_cells_per_msa, cfg.n_hvg
    gen = torch.Generator().manual_seed(1)
    values = torch.randint(0, cfg.n_bins, (b, s, length), generator=gen)
    pad_mask = torch.ones(b, s, length, dtype=torch.bool)
    masked, loss_mask = apply_value_mask(values, pad_mask, 0.15, cfg.n_bins, gen)
    batch = {
        "gene_ids": torch.arange(length).expand(b, s, length).contiguous(),
        "values": masked,
        "pad_mask": pad_mask,
        "target": values,
        "loss_mask": loss_mask,
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    return model, optimizer, batch


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    precision: str,
    device: torch.device,
) -> float:
    """The trainer's step: forward through ``model.loss`` (bf16 autocast or fp32), backward,
    ``clip_grad_norm_(1.0)``, AdamW step, ``zero_grad(set_to_none=True)``."""
    model.train()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    with autocast:
        loss, _ = model.loss(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ----------------------------------------------------------------------------- items
def item_env(ctx: Context, partial: Callable[[dict], None]) -> dict[str, Any]:
    import pandas as pd
    import torch.distributed as dist

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_version": None,
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "nccl_available": dist.is_available() and dist.is_nccl_available(),
        "gloo_available": dist.is_available() and dist.is_gloo_available(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    with contextlib.suppress(Exception):
        info["cudnn_version"] = torch.backends.cudnn.version()
    for name in (
        "flash_sdp_enabled",
        "mem_efficient_sdp_enabled",
        "math_sdp_enabled",
        "cudnn_sdp_enabled",
    ):
        fn = getattr(torch.backends.cuda, name, None)
        try:
            info[name] = bool(fn()) if fn is not None else None
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            info[name] = f"error: {first_line(str(exc))}"
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(
            gpu_name=props.name,
            gpu_total_memory_bytes=int(props.total_memory),
            gpu_compute_capability=f"{props.major}.{props.minor}",
            gpu_multiprocessors=props.multi_processor_count,
            bf16_supported=bool(torch.cuda.is_bf16_supported()),
        )
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()
            info["nccl_version"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,memory.total,driver_version,compute_cap,power.limit,pstate"
        try:
            res = subprocess.run(
                [smi, f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if res.returncode != 0:  # an older driver without one of the fields
                query = "name,memory.total,driver_version"
                res = subprocess.run(
                    [smi, f"--query-gpu={query}", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            info["nvidia_smi_query"] = query
            info["nvidia_smi"] = res.stdout.strip() or first_line(res.stderr)
            ver = subprocess.run([smi], capture_output=True, text=True, timeout=30)
            m = re.search(r"CUDA Version:\s*([\d.]+)", ver.stdout)
            info["driver_cuda_version"] = m.group(1) if m else None
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"error: {first_line(str(exc))}"
    else:
        info["nvidia_smi"] = "not found"
    return {"info": info}


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
        t0 = time.perf_counter()
        m = measure_cuda_peak(step, dev)
        res["step_s"] = time.perf_counter() - t0
        res["reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved(dev))
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
        )
    except Exception as exc:  # noqa: BLE001
        res["errors"].append(f"traced: {type(exc).__name__}: {first_line(str(exc))}")
        res["traced_traceback"] = traceback.format_exc()[-2000:]
    meas, tr = res.get("measured_peak_bytes"), res.get("traced_peak_bytes")
    if meas and tr:
        res["measured_over_traced"] = meas / tr
        res["measured_minus_traced_bytes"] = meas - tr
        # the pre-flight's verdict counts traced + the workspace allowance (0 on a CPU trace)
        predicted = tr + res["workspace_allowance_bytes"]
        res["predicted_peak_bytes"] = predicted
        res["predicted_covers_measured"] = predicted >= meas
    an = res.get("analytical_peak_bytes")
    if tr and an:
        res["traced_over_analytical"] = tr / an
    return res


def _timed_steps(ctx: Context, cfg: StepConfig, precision: str) -> dict[str, Any]:
    dev = ctx.device
    model, optimizer, batch = build(cfg, dev)
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
    for precision in ("bf16", "fp32"):
        progress(f"  throughput {precision}")
        try:
            rows.append(_timed_steps(ctx, cfg, precision))
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
    if any(r.get("status") == "error" for r in rows):
        res["errors"] = [f"{r['precision']}: {r['note']}" for r in rows if r["status"] == "error"]
    return res


_SDPA_OP = re.compile(r"scaled_dot_product|attention|flash|fmha|cudnn|cutlass|mem_eff", re.I)


def _attention_events(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Profiler event names (ops and kernels) that look like attention, with their counts."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    try:
        with profile(activities=acts) as prof:
            fn()
            sync(device)
    except Exception:  # noqa: BLE001 - no CUPTI: the CPU-side aten op names still tell
        if len(acts) == 1:
            raise
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
            sync(device)
    names: dict[str, int] = {}
    for ev in prof.key_averages():
        if _SDPA_OP.search(ev.key):
            names[ev.key[:160]] = names.get(ev.key[:160], 0) + int(ev.count)
    return dict(sorted(names.items(), key=lambda kv: -kv[1])[:25])


def _backends_seen(names: dict[str, int]) -> list[str]:
    """SDPA backends that ran, from the ATen op names (kernel names are ambiguous: cuDNN's
    attention kernels are called ``...flash...`` too)."""
    ops = " ".join(n for n in names if n.startswith("aten::")).lower()
    seen = []
    for label, pattern in (
        ("flash", r"aten::_scaled_dot_product_flash_attention|aten::_flash_attention_forward"),
        (
            "efficient",
            r"aten::_scaled_dot_product_efficient_attention|aten::_efficient_attention_forward",
        ),
        ("cudnn", r"aten::_scaled_dot_product_cudnn_attention|aten::_cudnn_attention"),
        ("math", r"aten::_scaled_dot_product_attention_math"),
        ("overrideable", r"aten::_scaled_dot_product_fused_attention_overrideable"),
    ):
        if re.search(pattern, ops):
            seen.append(label)
    return seen


def _reasons(caught: list[warnings.WarningMessage], exc: BaseException, limit: int = 400) -> str:
    """Why SDPA refused a backend: its warnings (without the source location) and the error."""
    why: list[str] = []
    for w in caught:
        text = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message)).strip()
        text = " ".join(text.split())
        if text and text not in why:
            why.append(text)
    err = first_line(str(exc))
    if err and err not in why:
        why.append(err)
    return " / ".join(why)[:limit]


def _step_events(ctx: Context, cfg: StepConfig) -> dict[str, Any]:
    """Attention ops / kernels the profiler sees in one training step of ``cfg`` (after a
    warm-up step)."""
    dev = ctx.device
    model, optimizer, batch = build(cfg, dev)

    def step() -> float:
        return train_step(model, optimizer, batch, cfg.precision, dev)

    step()
    names = _attention_events(step, dev)
    return {"config": cfg.describe(), "backends": _backends_seen(names), "events": names}


def item_sdpa(ctx: Context, partial: Callable[[dict], None]) -> dict[str, Any]:
    """SDPA backends: what the training steps run, the default choice for the row-attention
    shapes, then each backend forced alone (last: a backend that crashes poisons the context)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = ctx.sizes.journal
    dev = ctx.device
    n = cfg.micro_batch * int(cfg.model.get("n_cells_per_msa", 1))
    h, d, r = int(cfg.model["n_heads_msa"]), int(cfg.model["c_hidden_msa"]), cfg.n_hvg + 1
    res: dict[str, Any] = {
        "shapes": f"q/k/v [{n}, {h}, {r}, {d}], float bias [{n}, {h}, {r}, {r}] (requires grad)",
        "training_step": {},
        "default": {},
        "probes": {},
        "errors": [],
    }
    dtypes = (torch.bfloat16, torch.float32)

    def run(dtype: torch.dtype) -> None:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (
            torch.randn(n, h, r, d, device=dev, dtype=dtype, generator=g).requires_grad_()
            for _ in range(3)
        )
        bias = torch.randn(n, h, r, r, device=dev, dtype=dtype, generator=g).requires_grad_()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out.float().sum().backward()
        sync(dev)

    for step_cfg in (ctx.sizes.journal, ctx.sizes.pair_stack):
        try:
            res["training_step"][step_cfg.name] = _step_events(ctx, step_cfg)
        except Exception as exc:  # noqa: BLE001
            res["errors"].append(
                f"training step {step_cfg.name}: {type(exc).__name__}: {first_line(str(exc))}"
            )
        free_memory()
        partial(res)
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        try:
            names = _attention_events(lambda dt=dtype: run(dt), dev)
            res["default"][dname] = {"backends": _backends_seen(names), "events": names}
        except Exception as exc:  # noqa: BLE001
            res["errors"].append(f"default {dname}: {type(exc).__name__}: {first_line(str(exc))}")
        free_memory()
    partial(res)
    preferred = ["MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"]
    members = [b for b in SDPBackend.__members__ if b not in ("ERROR", "OVERRIDEABLE")]
    backends = [b for b in preferred if b in members] + [b for b in members if b not in preferred]
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        probe: dict[str, str] = {}
        res["probes"][dname] = probe
        for name in backends:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([getattr(SDPBackend, name)]):
                        run(dtype)
                    probe[name] = "ok"
                except Exception as exc:  # noqa: BLE001 - a rejected backend is a result
                    probe[name] = "rejected: " + _reasons(caught, exc)
            free_memory()
            partial(res)
    if not res["errors"]:
        del res["errors"]
    return res


def write_binned(folder: Path, n_cells: int, n_genes: int, n_bins: int, seed: int = 0) -> None:
    """A binned folder as ``evoformer.data.binning.bin_h5ad`` writes it (include_zero_genes):
    values.npy [N, G] bins, gene_index.npy [1, G], edges.npy [N, n_bins-1] float32,
    the token expression (evoformer.data.arrays.write_token_expression), cells.tsv (cell_id, label), genes.tsv (gene_id), meta.json."""
    import pandas as pd

    from evoformer.data.arrays import write_token_expression
    from evoformer.io import atomic_path, write_text_atomic

    rng = np.random.default_rng(seed)
    vdtype = np.uint8 if n_bins <= 256 else np.uint16
    gdtype = np.int8 if n_genes <= 128 else np.int16
    values = rng.integers(1, n_bins, size=(n_cells, n_genes)).astype(vdtype)
    values[rng.random((n_cells, n_genes)) < 0.5] = 0  # zeros are bin 0
    edges = np.sort(rng.random((n_cells, n_bins - 1)).astype(np.float32) * 5, axis=1)
    # each token's value: its bin's lower edge (0 for zeros), as the metrics read it
    lower = np.concatenate([np.zeros((n_cells, 1), np.float32), edges], axis=1)
    expression = np.take_along_axis(lower, values.astype(np.int64), axis=1)
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (
        ("values.npy", values),
        ("gene_index.npy", np.arange(n_genes, dtype=gdtype)[None, :]),
        ("edges.npy", edges),
    ):
        with atomic_path(folder / name) as tmp:
            np.save(tmp, arr)
    write_token_expression(folder, expression)
    cells = pd.DataFrame(
        {
            "cell_id": [f"cell{i:05d}" for i in range(n_cells)],
            "label": [f"type{i % 3}" for i in range(n_cells)],
        }
    )
    with atomic_path(folder / "cells.tsv") as tmp:
        cells.to_csv(tmp, sep="\t", index=False)
    with atomic_path(folder / "genes.tsv") as tmp:
        pd.DataFrame({"gene_id": [f"gene{g:04d}" for g in range(n_genes)]}).to_csv(
            tmp, sep="\t", index=False
        )
    nnz = (values > 0).sum(axis=1)
    meta = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_bins": n_bins,
        "include_zero_genes": True,
        "max_len": n_genes,
        "dtype": np.dtype(vdtype).name,
        "gene_index_dtype": np.dtype(gdtype).name,
        "tie_mode": "random",
        "seed": seed,
        "n_empty_cells": int((nnz == 0).sum()),
        "mean_nonzeros_per_cell": round(float(nnz.mean()), 3),
        "source": {"hvg": "benchmarks/gpu_check.py (synthetic)", "dataset": None},
    }
    write_text_atomic(folder / "meta.json", json.dumps(meta, indent=2) + "\n")


def write_split(path: Path, n_cells: int, seed: int = 0) -> None:
    """split.tsv as ``evoformer.data.split`` writes it (cell_id, label, split, fold; no CV)."""
    import pandas as pd

    from evoformer.io import atomic_path

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_cells)
    split = np.empty(n_cells, dtype=object)
    n_test, n_val = round(0.15 * n_cells), round(0.15 * n_cells)
    split[order[:n_test]] = "test"
    split[order[n_test : n_test + n_val]] = "val"
    split[order[n_test + n_val :]] = "train"
    table = pd.DataFrame(
        {
            "cell_id": [f"cell{i:05d}" for i in range(n_cells)],
            "label": [f"type{i % 3}" for i in range(n_cells)],
            "split": split.astype(str),
            "fold": np.full(n_cells, -1, dtype=np.int64),
        }
    )
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False)


def child_env(ctx: Context) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if ctx.dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on the CPU even on a GPU machine
    return env


def run_group(
    cmd: list[str], log_path: Path, env: dict[str, str], timeout: float
) -> tuple[int, float]:
    """Run ``cmd`` in its own process group with output to ``log_path``; on timeout end that
    group (torchrun and its workers). Returns (exit code, seconds); exit code 124 on timeout."""
    t0 = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = 124
    return rc, time.perf_counter() - t0


def _log_tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def item_ddp_smoke(ctx: Context, partial: Callable[[dict], None]) -> dict[str, Any]:
    sz = ctx.sizes
    folder = ctx.out / "ddp_smoke"
    if folder.exists():
        shutil.rmtree(folder)  # a fresh run: no checkpoint to resume from
    n_bins = 51
    write_binned(folder / "binned", sz.smoke_cells, sz.smoke_genes, n_bins)
    write_split(folder / "split.tsv", sz.smoke_cells)
    spec = {
        "model": sz.smoke_model,
        "train": {
            "micro_batch_size": sz.smoke_micro,
            "global_batch_size": sz.smoke_global,
            "epochs": 1,
            "max_steps": sz.smoke_steps,
            "warmup_steps": 2,
            "log_every": max(1, sz.smoke_steps // 4),
            "ckpt_every": max(1, sz.smoke_steps // 2),
            "precision": "auto",
            "cpu_processes": 2,
        },
        "fold": -1,
        "final": False,
    }
    cmd = [
        sys.executable,
        "-m",
        "evoformer.launch",
        "--cpu-processes",
        "2",
        "--",
        "--binned",
        str(folder / "binned"),
        "--split",
        str(folder / "split.tsv"),
        "--spec",
        json.dumps(spec),
        "--out",
        str(folder / "train"),
        "--ckpt-dir",
        str(folder / "checkpoints"),
    ]
    timeout = max(30.0, min(float(sz.ddp_timeout_s), ctx.remaining()))
    res: dict[str, Any] = {
        "command": "python -m evoformer.launch --cpu-processes 2 -- --binned ... --spec '"
        + json.dumps(spec)
        + "' ...",
        "data": f"{sz.smoke_cells} cells x {sz.smoke_genes} genes, {n_bins} bins (synthetic)",
        "timeout_s": timeout,
    }
    partial(res)
    log_path = folder / "train.log"
    rc, secs = run_group(cmd, log_path, child_env(ctx), timeout)
    out = folder / "train"
    res.update(exit_code=rc, seconds=secs, log=str(log_path), timed_out=rc == 124)
    res["model_pt"] = (out / "model.pt").is_file()
    res["passed"] = rc == 0 and res["model_pt"]
    log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    launch = re.search(r"launching torchrun: (.*)", log_text)
    training = re.search(r"training on (.*)", log_text)
    res["launcher_line"] = launch.group(1).strip() if launch else None
    res["training_line"] = training.group(1).strip() if training else None
    res["step_log_lines"] = len(re.findall(r"Step \d+/\d+", log_text))
    with contextlib.suppress(OSError, json.JSONDecodeError):
        perf = json.loads((out / "performance_summary.json").read_text())
        res.update(
            samples_per_s=perf.get("average_speed_samples_per_s"),
            peak_memory_bytes=perf.get("peak_memory_bytes"),
            peak_memory_source=perf.get("peak_memory_source"),
            precision=perf.get("precision"),
            total_steps=perf.get("total_steps"),
            final_loss=perf.get("final_loss"),
        )
    with contextlib.suppress(OSError, json.JSONDecodeError):
        info = json.loads((out / "run_info.json").read_text())
        res.update(world_size=info.get("world_size"), device=info.get("device"))
    world = res.get("world_size")
    on_cuda = bool(training and "cuda" in training.group(1))
    if world is None:
        res["backend"] = None
    elif int(world) > 1:
        res["backend"] = "nccl" if on_cuda else "gloo"
    else:
        res["backend"] = "none (world size 1: the trainer creates no process group)"
    if not res["passed"]:
        res["log_tail"] = _log_tail(log_path)
        res["errors"] = [
            f"training run {'timed out' if rc == 124 else f'exited {rc}'}"
            + ("" if res["model_pt"] else ", no model.pt")
            + f"; log: {log_path}"
        ]
    return res


def item_loader(ctx: Context, partial: Callable[[dict], None]) -> dict[str, Any]:
    """Cells/s of the training DataLoader at the journal shape (see the module docstring)."""
    from evoformer.data.arrays import BinnedData
    from evoformer.train import CellBatches, TrainBatches
    from evoformer.train_config import TrainConfig

    cfg = ctx.sizes.journal
    n_cells = 4096 if ctx.device.type == "cuda" else 256
    folder = ctx.out / "loader_data"
    write_binned(folder, n_cells, cfg.n_hvg, cfg.n_bins)
    data = BinnedData.open(folder)
    cells = CellBatches(data, np.arange(n_cells), np.full(n_cells, -1), 1)
    order = np.random.default_rng(0).permutation(n_cells)
    mb = cfg.micro_batch
    plan = [(order[i : i + mb], i // mb, 0) for i in range(0, n_cells - mb + 1, mb)]
    train = TrainConfig(micro_batch_size=mb, global_batch_size=mb)
    res: dict[str, Any] = {"shape": f"{mb} cells x {cfg.n_hvg} genes per batch", "rows": []}
    for workers in (0, 2, 4):
        loader = torch.utils.data.DataLoader(
            TrainBatches(cells, plan, train, cfg.n_bins, 0, 0, False),
            batch_size=None,
            num_workers=workers,
            pin_memory=ctx.device.type == "cuda",
            prefetch_factor=4 if workers else None,
            generator=torch.Generator().manual_seed(0),
        )
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            n += batch["values"].shape[0]
        sync(ctx.device)
        dt = time.perf_counter() - t0
        res["rows"].append({"workers": workers, "cells": n, "seconds": dt, "cells_per_s": n / dt})
        partial(res)
    model = (ctx.recorder.data.get("items", {}).get("throughput") or {}).get("rows") or []
    ok = [r for r in model if r.get("status") == "ok" and r.get("precision") == "bf16"]
    if ok:
        res["model_samples_per_s"] = ok[0]["samples_per_s"]
        res["headroom"] = max(r["cells_per_s"] for r in res["rows"]) / ok[0]["samples_per_s"]
    return res


def item_nccl_ddp(ctx: Context, partial: Callable[[dict], None]) -> dict[str, Any]:
    folder = ctx.out / "nccl_ddp"
    folder.mkdir(parents=True, exist_ok=True)
    result_path = folder / "result.json"
    result_path.unlink(missing_ok=True)
    nproc = 1 if ctx.dry else max(1, torch.cuda.device_count())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(Path(__file__).resolve()),
        "--ddp-worker",
        str(result_path),
    ]
    if ctx.dry:
        cmd.append("--cpu-dry-run")
    timeout = max(30.0, min(180.0, ctx.remaining()))
    log_path = folder / "worker.log"
    env = {**child_env(ctx), "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "INFO")}
    rc, secs = run_group(cmd, log_path, env, timeout)
    res: dict[str, Any] = {"nproc": nproc, "exit_code": rc, "seconds": secs, "log": str(log_path)}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        res.update(json.loads(result_path.read_text()))
    res["passed"] = rc == 0 and bool(res.get("all_reduce_ok")) and bool(res.get("steps_ok"))
    if not res["passed"]:
        res["log_tail"] = _log_tail(log_path)
        res["errors"] = [f"worker {'timed out' if rc == 124 else f'exited {rc}'}; log: {log_path}"]
    return res


class _LossForward(torch.nn.Module):
    """``forward(batch) = model.loss(batch)`` so DDP all-reduces the whole loss graph."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.loss(batch)


def ddp_worker(result_path: Path, dry: bool) -> int:
    """One torchrun rank: NCCL (gloo on CPU) process group, all-reduce, 3 DDP training steps."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    t0 = time.perf_counter()
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    out: dict[str, Any] = {"backend": dist.get_backend(), "world_size": dist.get_world_size()}
    out["init_s"] = time.perf_counter() - t0
    t = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(t)
    expected = world * (world + 1) / 2
    out["all_reduce_ok"] = bool(torch.allclose(t.cpu(), torch.full((4,), expected)))
    cfg = StepConfig(
        name="ddp",
        model={"preset": "bioformer", "c_m": 32, "c_z": 16, "c_opm": 8, "n_blocks": 2},
        n_hvg=31,
        n_bins=11,
        micro_batch=4,
        precision="bf16" if cuda else "fp32",
    )
    model, _, batch = build(cfg, device)
    ddp = DDP(_LossForward(model), device_ids=[local] if cuda else None)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.01)
    losses = []
    for _ in range(3):
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            loss, _ = ddp(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    # parameters identical on every rank after the synchronised steps
    digest = torch.stack([p.detach().float().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(digest) for _ in range(world)]
    dist.all_gather(gathered, digest)
    out["params_in_sync"] = bool(all(torch.allclose(g, gathered[0]) for g in gathered))
    out["losses"] = losses
    out["steps_ok"] = all(math.isfinite(x) for x in losses) and out["params_in_sync"]
    out["precision"] = cfg.precision
    out["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
    if cuda:
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()
            out["nccl_version"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    out["seconds"] = time.perf_counter() - t0
    dist.barrier()
    del ddp
    gc.collect()
    dist.destroy_process_group()
    if rank == 0:
        from evoformer.io import write_text_atomic

        write_text_atomic(result_path, json.dumps(clean(out), indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------- markdown
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

    mem_rows = [(n, items[n]) for n in ("memory_journal", "memory_pair_stack") if n in items]
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
        lines += _status_line(thr)

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
            "| peak memory | peak source | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| {fmt(sm.get('passed'))} | {fmt(sm.get('world_size'))} | {fmt(sm.get('backend'))} "
            f"| {fmt(sm.get('device'))} | {fmt(sm.get('precision'))} "
            f"| {fmt(sm.get('total_steps'))} | {fmt(sm.get('samples_per_s'), 4)} "
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


# ----------------------------------------------------------------------------- driver
ITEM_FUNCS: dict[str, Callable[[Context, Callable[[dict], None]], dict[str, Any]]] = {
    "env": item_env,
    "memory_journal": lambda c, p: item_memory(c, p, c.sizes.journal),
    "memory_pair_stack": lambda c, p: item_memory(c, p, c.sizes.pair_stack),
    "throughput": item_throughput,
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
                    f"{r['precision']} {fmt(r.get('samples_per_s'), 4)} samples/s"
                    if r.get("status") == "ok"
                    else f"{r['precision']} {r.get('status')}"
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
        prog="benchmarks/gpu_check.py",
        description="One-shot GPU check: memory (measured vs traced vs analytical), bf16 "
        "throughput, SDPA backends, a training smoke run, NCCL + DDP; writes gpu_check.md/json.",
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
        "command": " ".join(["python3", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
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
