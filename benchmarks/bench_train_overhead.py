"""Training-loop overhead: the pipeline's step next to a bare forward + backward + AdamW step.

    python benchmarks/bench_train_overhead.py [--steps 60] [--out benchmarks/out/overhead]

Same data (the bundled PBMC, 64 HVGs, 11 bins), same model (config.yaml's demo model: BioFormer,
c_m 32, c_z 16, c_opm 8, 2 blocks), same step (``train.compile``'s default, :data:`COMPILE`,
applied to both sides as the trainer applies it), micro-batches of 8 cells, one CPU thread per
process:

* **bare**: a Python loop of ``model.loss(batch)``, ``backward``, grad clipping, ``AdamW.step``
  on micro-batches masked as training masks them (nothing else);
* **trainer, 1 process**: ``python -m evoformer.train`` (no torchrun): the DataLoader, masking,
  timers, validation-free steps, logging;
* **pipeline, 2 processes**: what the ``train`` rule runs on a 2-core machine:
  ``python -m evoformer.launch --cpu-processes 2`` (torchrun, DDP over gloo, one thread each).

Reported per micro-batch of 8 cells: the median over logged steps (``metrics.tsv``'s
``step_time_ms`` with ``log_every 1``, divided by the micro-batches per step and process),
skipping the first 5 steps. Writes a Markdown table to stdout and ``--out``/overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

MODEL = {
    "preset": "bioformer",
    "c_m": 32,
    "c_z": 16,
    "c_opm": 8,
    "n_heads_msa": 2,
    "c_hidden_msa": 16,
    "n_blocks": 2,
}
MICRO = 8
#: ``train.compile`` of both sides (the default: on a CPU, ``auto`` runs ``fused``)
COMPILE = "auto"


def prepare(d: Path) -> dict[str, Path]:
    from evoformer.data import binning, datasets, hvg, split

    h5ad = d / "pbmc68k.h5ad"
    datasets.materialise_pbmc68k(h5ad)
    ds = {"expression": "raw", "value_type": "log1p", "label_key": "bulk_labels"}
    hvg.run_hvg(
        h5ad, "pbmc68k", ds, 64, {"flavor": "seurat"}, d / "h.h5ad", d / "g.tsv", d / "h.png"
    )
    binning.bin_h5ad(d / "h.h5ad", d / "binned", n_bins=11, seed=0)
    sp = {"fractions": {"train": 0.8, "val": 0.1, "test": 0.1}, "n_folds": 0, "seed": 0}
    split.run_split(h5ad, "pbmc68k", "bulk_labels", sp, d / "split.tsv")
    return {"binned": d / "binned", "split": d / "split.tsv"}


def bare_step_ms(binned: Path, steps: int) -> float:
    """Median ms of a bare training step on one micro-batch (one thread)."""
    from evoformer.data.arrays import BinnedData
    from evoformer.model import BioFormer, ModelConfig, apply_value_mask, mask_generator
    from evoformer.model.fused import adamw_options, compile_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = BinnedData.open(binned)
    model = BioFormer(ModelConfig.from_dict(MODEL), n_genes=data.n_genes, n_bins=data.n_bins)
    compile_model(model, COMPILE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **adamw_options(COMPILE, "cpu"))
    values = torch.as_tensor(np.asarray(data.values[: MICRO * 8], np.int64)).view(
        -1, 1, data.n_genes
    )
    genes = torch.arange(data.n_genes).expand_as(values)
    pad = torch.ones_like(values, dtype=torch.bool)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        sl = slice((i % 8) * MICRO, (i % 8 + 1) * MICRO)
        v, lm = apply_value_mask(values[sl], pad[sl], 0.15, data.n_bins, mask_generator(0, i))
        loss, _ = model.loss_terms(
            {
                "gene_ids": genes[sl],
                "values": v,
                "pad_mask": pad[sl],
                "target": values[sl],
                "loss_mask": lm,
            }
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[5:])


def pipeline_ms(files: dict[str, Path], out: Path, processes: int | None, steps: int) -> float:
    """Median ms per micro-batch of the trainer (``processes`` None: one process, no torchrun)."""
    world = processes or 1
    train = {
        "micro_batch_size": MICRO,
        "global_batch_size": MICRO * world * 2,  # 2 micro-batches per process and step
        "epochs": 50,
        "max_steps": steps,
        "log_every": 1,
        "ckpt_every": 10_000,
        "cpu_processes": world,
        "warmup_steps": 3,
        "compile": COMPILE,
    }
    spec = json.dumps({"model": MODEL, "train": train, "fold": -1, "final": False})
    args = ["--binned", str(files["binned"]), "--split", str(files["split"]), "--spec", spec]
    args += ["--out", str(out / "train"), "--ckpt-dir", str(out / "ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if processes is None:
        cmd = [sys.executable, "-m", "evoformer.train", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "evoformer.launch",
            "--cpu-processes",
            str(processes),
            "--",
            *args,
        ]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    m = pd.read_csv(out / "train" / "metrics.tsv", sep="\t")
    tr = m[(m["kind"] == "train") & (m["step"] > 5)]
    return float(tr["step_time_ms"].median()) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/overhead"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        files = prepare(d)
        bare = bare_step_ms(files["binned"], a.steps)
        one = pipeline_ms(files, d / "one", None, a.steps)
        two = pipeline_ms(files, d / "two", 2, a.steps)
        bare_after = bare_step_ms(files["binned"], a.steps)  # the machine's load may drift
    ref = (bare + bare_after) / 2
    rows = [
        ("bare forward + backward + AdamW (1 thread)", ref, "-"),
        ("trainer, 1 process (python -m evoformer.train)", one, f"{one / ref:.2f}x"),
        ("pipeline, 2 processes (torchrun + DDP/gloo)", two, f"{two / ref:.2f}x"),
    ]
    lines = [
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {a.steps} steps each; "
        f"bare measured before and after: {bare:.1f} / {bare_after:.1f} ms",
        "",
        "| what | ms per micro-batch of 8 cells | vs bare |",
        "|---|---:|---:|",
        *(f"| {name} | {ms:.1f} | {ratio} |" for name, ms, ratio in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "overhead.md").write_text(text)


if __name__ == "__main__":
    main()
