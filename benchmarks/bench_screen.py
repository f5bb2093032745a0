"""Norman-sized synthetic Perturb-seq screen: time and peak memory of the generator.

Runs :func:`evoformer.perturb.screen.write_screen` in a child process per layout (GEARS,
then scPerturb) and measures its wall time and peak RSS (VmHWM of the child, as
``bench_hvg.py``); the generator's own log gives the time of the truth and of the cells.
Default screen (about Norman et al. 2019 as GEARS ships it): 5000 genes, 150 regulators in
10 modules, 135 singles + 70 within- and 70 across-module doubles (276 conditions with
control), 10,000 control cells and 327 per condition (99,925 cells), truth on 4000 cells.
Files go under ``--workdir`` and are deleted at the end (``--keep`` keeps them).

    python benchmarks/bench_screen.py --workdir /tmp/bench_screen
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

from bench_hvg import record_peak, run_stage_process  # isort: skip

NORMAN = {
    "n_genes": 5000,
    "n_regulators": 150,
    "n_modules": 10,
    "n_doubles_within": 70,
    "n_doubles_across": 70,
    "n_control": 10000,
    "cells_per_condition": 327,
}


def _params(args: argparse.Namespace) -> dict:
    return {
        **NORMAN,
        "n_genes": args.genes,
        "cells_per_condition": args.cells_per_condition,
        "truth_cells": args.truth_cells,
    }


def stage(layout: str, args: argparse.Namespace) -> None:
    """Write the screen in ``layout`` in this process; record peak RSS and sizes."""
    from evoformer.perturb.screen import screen_paths, write_screen

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    work = Path(args.workdir)
    out = work / layout / "screen.h5ad"
    try:
        write_screen(out, _params(args), layout=layout)
    finally:
        sizes = {p.name: p.stat().st_size for p in screen_paths(out) if p.exists()}
        (work / f"{layout}.json").write_text(json.dumps(sizes))
        record_peak(work / f"{layout}.rss")


def measure(layout: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--stage", layout, *sys.argv[1:]]
    work = Path(args.workdir)
    result = {"layout": layout, **run_stage_process(cmd, work / f"{layout}.rss")}
    sizes = json.loads((work / f"{layout}.json").read_text())
    result["sizes_mib"] = {k: round(v / 2**20, 1) for k, v in sizes.items()}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genes", type=int, default=NORMAN["n_genes"])
    parser.add_argument("--cells-per-condition", type=int, default=NORMAN["cells_per_condition"])
    parser.add_argument("--truth-cells", type=int, default=4000)
    parser.add_argument("--layouts", default="gears,scperturb")
    parser.add_argument("--workdir", default="/tmp/bench_screen")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        stage(args.stage, args)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = [measure(layout, args) for layout in args.layouts.split(",")]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    print(f"params: {json.dumps(_params(args))}")
    print("\n| layout | wall | peak RSS | h5ad |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layout']} | {r['wall_s']:.0f} s | {r['peak_rss_gib']:.2f} GiB | "
            f"{r['sizes_mib'].get('screen.h5ad', 0):.0f} MiB |"
        )


if __name__ == "__main__":
    main()
