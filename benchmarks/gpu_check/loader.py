"""Item ``loader``: cells/s of the training DataLoader at the journal shape."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_check.common import Context, sync
from benchmarks.gpu_check.data import write_binned


def item_loader(ctx: Context, partial: Callable[[dict], None]) -> dict[str, Any]:
    """Cells/s of the training DataLoader at the journal shape (see the module docstring)."""
    from evoformer.data.arrays import BinnedData
    from evoformer.tasks.masked import CellBatches, TrainBatches
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
