"""Item ``env``: GPU, driver, library versions and the attention / matmul switches."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_check.common import Context, first_line


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
