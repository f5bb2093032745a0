"""FLOPs and estimated memory traffic of one training step: the journal's, r = 2001, the demo's.

Usage: python benchmarks/bench_flops.py

Counts one micro-batch's forward + backward with ``evoformer.flops.count.count_step`` (fake
tensors, FlopCounterMode; the GPU's attention kernels emulated for the GPU rows, the CPU's
explicit softmax for the demo row) and prints a Markdown table per sample: forward, model
(forward + backward) and executed (+ the activation-checkpoint recompute) GFLOP, the eager
memory-traffic estimate with its share over ``r x r`` tensors, and FLOPs per byte. Nothing is
allocated; each row takes seconds on one CPU core. Writes benchmarks/results/flops.md.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evoformer.flops.count import count_step  # noqa: E402
from evoformer.io import write_text_atomic  # noqa: E402
from evoformer.memory.spec import JOURNAL, data_shape, spec_from_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "flops.md"


def rows() -> list[tuple[str, dict, dict, dict, str]]:
    """(label, model, train, data shape, device) of every configuration counted."""
    demo = yaml.safe_load((ROOT / "config.yaml").read_text())["experiment"]
    journal_shape = data_shape(**JOURNAL["data"])
    return [
        (
            "journal (configs/journal_a100.yaml)",
            JOURNAL["model"],
            JOURNAL["train"],
            journal_shape,
            "cuda",
        ),
        (
            "journal, fp32",
            JOURNAL["model"],
            {**JOURNAL["train"], "precision": "fp32"},
            journal_shape,
            "cuda",
        ),
        (
            "journal at 2,000 HVGs (r = 2001), B = 16",
            JOURNAL["model"],
            {**JOURNAL["train"], "micro_batch_size": 16},
            data_shape(2000, JOURNAL["data"]["n_bins"]),
            "cuda",
        ),
        (
            "demo (config.yaml, CPU)",
            demo["model"],
            {**demo["train"], "precision": "fp32"},
            data_shape(demo["n_hvg"], demo["n_bins"]),
            "cpu",
        ),
    ]


def main() -> None:
    env = f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        "## FLOPs and memory traffic of a training step (evoformer.flops)",
        "",
        f"Command: `python benchmarks/bench_flops.py` ({env}). Per sample (cell), one "
        "micro-batch's forward + backward counted on fake tensors with FlopCounterMode (matrix "
        "products and attention kernels); *executed* adds the activation-checkpoint recompute. "
        "Traffic: the eager estimate of `evoformer/flops/count.py` (every ATen operator reads "
        "its inputs once and writes its outputs), forward + backward + recompute; *pair*: the "
        "part over `r x r` tensors. GB = 10^9 bytes. Kernels: `cuda` = the GPU's attention "
        "kernels (emulated; their backward recomputes `q k^T`), `cpu` = the explicit softmax.",
        "",
        "| configuration | B | precision | kernels | forward GFLOP | model GFLOP | executed GFLOP "
        "| traffic GB | pair share | FLOP/byte | count s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, model, train, shape, device in rows():
        spec = spec_from_config(model, train, shape, device=device)
        c = count_step(spec)
        traffic = c.traffic_bytes or 0
        lines.append(
            f"| {label} | {spec.batch_size} | {spec.precision} | {device} "
            f"| {c.forward_flops / spec.batch_size / 1e9:.4g} "
            f"| {c.model_flops_per_sample / 1e9:.4g} | {c.hardware_flops_per_sample / 1e9:.4g} "
            f"| {traffic / spec.batch_size / 1e9:.4g} "
            f"| {100 * (c.pair_traffic_bytes or 0) / max(traffic, 1):.1f}% "
            f"| {c.arithmetic_intensity:.3g} | {c.seconds:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    write_text_atomic(RESULTS, text)


if __name__ == "__main__":
    main()
