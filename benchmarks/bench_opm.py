"""Outer product mean: ours (factorised projection) vs the naive einsum ``[B, r, r, c, c]``, CPU.

Usage: python benchmarks/bench_opm.py [--reps 5]

For each setting both implementations run on the same weights and inputs (fp32, all tokens
real, S = 1 as in the journal): maximum absolute difference of the output and of the input
gradient, peak tensor memory of forward and of forward + backward (MemTracker, bytes added on
top of parameters/inputs/upstream gradient), and best-of-reps wall time of forward + backward.
Writes a markdown table into benchmarks/results/model.md (section bench_opm). The measuring
helpers here (peak_bytes, best_seconds, write_section) are shared with bench_block.py.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed._tools.mem_tracker import MemTracker

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # for tests.reference_ops (the naive references)
    sys.path.insert(0, str(ROOT))

from evoformer.io import atomic_path  # noqa: E402
from evoformer.model.outer_product_mean import OuterProductMean  # noqa: E402
from tests.reference_ops import randomize_parameters_, ref_outer_product_mean  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "model.md"


def peak_bytes(fn: Callable[[], object], *live: object) -> int:
    """Peak tensor bytes that ``fn()`` adds on CPU, measured with PyTorch's MemTracker.

    MemTracker (torch.distributed._tools.mem_tracker) hooks every tensor storage created and
    freed (activations, temporaries, gradients). The bytes alive before the call (parameters,
    inputs, upstream gradient: the tensors/modules in ``live``) are subtracted, so the figure is
    what the operation itself needs on top of its inputs.
    """
    tracker = MemTracker()
    tracker.track_external(*live)
    with tracker:
        before = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
        fn()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return peak - before


def best_seconds(fn: Callable[[], object], reps: int = 5) -> float:
    """Fastest wall time of ``reps`` calls after one warm-up call (the minimum is the figure least
    disturbed by other processes on a shared machine)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def write_section(name: str, text: str) -> None:
    """Replace this script's section (between HTML markers) of benchmarks/results/model.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    old = RESULTS.read_text() if RESULTS.exists() else "## Model benchmarks (evoformer.model)\n\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = (
        pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    )
    with atomic_path(RESULTS) as tmp:
        tmp.write_text(new)


# ----------------------------------------------------------------------------- the benchmark

# (B, S, r, c_m, c_opm, c_z, chunk_size)
SETTINGS = [
    (4, 1, 128, 64, 64, 64, None),  # the size in the journal's notation: c = 64 everywhere
    (4, 1, 128, 64, 64, 128, None),  # c_z = 128 (the model default)
    (4, 1, 128, 64, 64, 128, 32),  # ... chunked over rows
]


def run(setting: tuple, reps: int) -> list[str]:
    b, s, r, c_m, c_opm, c_z, chunk = setting
    torch.manual_seed(0)
    op = randomize_parameters_(OuterProductMean(c_m, c_z, c_opm))
    m = torch.randn(b, s, r, c_m, requires_grad=True)
    mask = torch.ones(b, s, r)
    g = torch.randn(b, r, r, c_z)
    ours = lambda: op(m, mask, chunk_size=chunk)  # noqa: E731
    naive = lambda: ref_outer_product_mean(m, mask, op)  # noqa: E731

    def fwd_bwd(f):
        def call():
            m.grad = None
            f().backward(g)

        return call

    with torch.no_grad():
        diff = (ours() - naive()).abs().max().item()
    fwd_bwd(ours)()
    g_ours = m.grad.clone()
    fwd_bwd(naive)()
    gdiff = (g_ours - m.grad).abs().max().item()

    mem = {}
    for name, f in (("ours", ours), ("naive", naive)):
        with torch.no_grad():
            mem[name, "fwd"] = peak_bytes(f, op, m, mask, g)
        mem[name, "fb"] = peak_bytes(fwd_bwd(f), op, m, mask, g)
        m.grad = None
    t_ours = best_seconds(fwd_bwd(ours), reps)
    t_naive = best_seconds(fwd_bwd(naive), reps)
    return [
        f"| {b} | {r} | {c_m}/{c_opm}/{c_z} | {chunk or '-'} | {diff:.1e} / {gdiff:.1e} "
        f"| {mib(mem['naive', 'fwd'])} / {mib(mem['ours', 'fwd'])} | "
        f"**{mem['naive', 'fwd'] / mem['ours', 'fwd']:.0f}x** "
        f"| {mib(mem['naive', 'fb'])} / {mib(mem['ours', 'fb'])} | "
        f"**{mem['naive', 'fb'] / mem['ours', 'fb']:.0f}x** "
        f"| {t_naive * 1e3:.0f} / {t_ours * 1e3:.0f} | **{t_naive / t_ours:.1f}x** |"
    ]


def journal_scale(b: int = 32, s: int = 1, r: int = 501, c_opm: int = 32, c_z: int = 128) -> str:
    """Sizes (not measured) of the OPM tensors at the journal's configuration, bf16."""
    gib = 2 / 2**30
    naive = b * r * r * c_opm * c_opm * gib
    q = b * s * c_opm * r * c_z * gib
    out = b * r * r * c_z * gib
    return (
        f"At the journal's size (B={b}, S={s}, r={r}, c_opm={c_opm}, c_z={c_z}, bf16; sizes from "
        f"the shapes, not measured) the naive `[B, r, r, c_opm, c_opm]` tensor is {naive:.1f} GiB "
        f"(with the journal's c = d_model = 128 instead of c_opm: {naive * 16:.0f} GiB); ours "
        f"never forms it: its largest intermediate `Q [B, S*c_opm, r*c_z]` is {q:.2f} GiB next to "
        f"the `[B, r, r, c_z]` output ({out:.1f} GiB), which any implementation must produce."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    lines = [
        "### Outer product mean: ours vs naive einsum (CPU, fp32)",
        "",
        f"Command: `python benchmarks/bench_opm.py --reps {args.reps}` "
        f"(torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, S = 1, all tokens real).",
        "Memory: peak tensor bytes added on top of parameters, input and upstream gradient, "
        "tracked with `torch.distributed._tools.mem_tracker.MemTracker` (every storage created/"
        "freed, CPU). Time: best of `--reps` forward + backward.",
        "",
        "| B | r | c_m/c_opm/c_z | chunk | max abs diff out / grad | fwd peak MiB naive / ours "
        "| ratio | fwd+bwd peak MiB naive / ours | ratio | fwd+bwd ms naive / ours | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        lines += run(setting, args.reps)
        print(lines[-1], file=sys.stderr)
    lines += ["", journal_scale()]
    text = "\n".join(lines)
    print(text)
    write_section("bench_opm", text)


if __name__ == "__main__":
    main()
