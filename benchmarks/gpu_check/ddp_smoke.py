"""Item ``ddp_smoke``: the real training entry point under torchrun on a small dataset."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.gpu_check.common import Context
from benchmarks.gpu_check.data import write_binned, write_split
from benchmarks.gpu_check.processes import child_env, log_tail, run_group
from evoformer.flops.peaks import THROUGHPUT_FIELDS


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
            **{k: perf.get(k) for k in THROUGHPUT_FIELDS},
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
        res["log_tail"] = log_tail(log_path)
        res["errors"] = [
            f"training run {'timed out' if rc == 124 else f'exited {rc}'}"
            + ("" if res["model_pt"] else ", no model.pt")
            + f"; log: {log_path}"
        ]
    return res
