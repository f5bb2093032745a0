"""Norman-sized Perturb-seq screen through the perturbation chain: time and peak RSS per stage.

One command generates a synthetic screen (``bench_screen.py``'s Norman-sized default: 5000
genes, 276 conditions with control, 99,925 cells) and runs each stage of
``rules/perturbation.smk`` on it, each in its own process, measured as ``bench_hvg.py``
measures its stages (:func:`bench_hvg.run_stage_process`: wall time, the child's VmHWM):

* ``screen``: :func:`evoformer.perturb.screen.write_screen` (``--layout``) -> the .h5ad,
  ``_truth.npz``, ``_conditions.tsv``, ``_network.tsv``;
* ``hvg``: :func:`evoformer.data.hvg.run_hvg` with the dataset's perturbation block (as the
  ``hvg`` rule calls it: ``--n-hvg`` HVGs plus every measured perturbed gene; ``--flavor``,
  ``--min-cells-per-gene`` as config.yaml);
* ``bin``: :func:`evoformer.data.binning.bin_h5ad` (``--n-bins``, include_zero_genes, random
  ties, ``--threads``);
* ``split``: :func:`evoformer.perturb.splits.split_hvg_cells` (GEARS's simulation split);
* ``evaluate``: :func:`evoformer.perturb.evaluate.evaluate_perturbation` with the noise-free
  truth (default evaluation: 20 DE genes, 1000 bootstrap resamples);
* ``tables``: :func:`evoformer.perturb.report.write_perturbation_tables`.

For each stage it prints the rule's memory and time request for that stage's input (the
sum of the rule's input files, as Snakemake's ``input.size_mb``): the rule's own
(:mod:`evoformer.data.resources`) where it declares one, else the Slurm profile's
``default-resources`` (``slurm/config.yaml``); the margin (request / peak); and the size of
every output. ``--json`` keeps the figures, ``--update-benchmarks BENCHMARKS.md`` rewrites
the ``bench_perturb`` section from them, ``--from-json`` renders a saved run. Several
``--cells-per-condition`` run the chain once each (the files of one are removed before the
next); every file goes under ``--workdir`` and is deleted at the end (``--keep`` keeps the
last chain's).

    python benchmarks/bench_perturb.py --workdir /tmp/bench_perturb \\
        --json benchmarks/results/bench_perturb.json --update-benchmarks BENCHMARKS.md
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

from bench_hvg import (  # isort: skip
    _commit,
    _gib,
    _size,
    add_report_options,
    record_peak,
    report,
    run_stage_process,
)
from bench_screen import NORMAN

NAME = "norman"  # the dataset's name (the screen's file stem)
SPLIT = {"kind": "simulation", "seed": 1}
STAGES = ("screen", "hvg", "bin", "split", "evaluate", "tables")
# each stage's rule (rules/preprocess.smk, rules/perturbation.smk): its resource request
RULES = {
    "screen": "screen",
    "hvg": "hvg",
    "bin": "bin",
    "split": "perturb_split",
    "evaluate": "perturb_evaluate",
    "tables": "perturb_tables",
}
# the files a dataset is read with, per layout (the perturbation block leaves the rest to
# the layout's defaults; GEARS files carry no type column)
DATASETS = {
    "gears": {
        "expression": "X",
        "value_type": "log1p",
        "label_key": "cell_type",
        "perturbation": {"layout": "gears", "type": "knockdown"},
    },
    "scperturb": {
        "expression": "X",
        "value_type": "counts",
        "label_key": "celltype",
        "perturbation": {"layout": "scperturb"},
    },
}
PROFILE = Path(__file__).resolve().parent.parent / "slurm" / "config.yaml"


class Paths:
    """Where each stage reads and writes under ``work`` (the pipeline's files, renamed)."""

    def __init__(self, work: Path) -> None:
        from evoformer.perturb.screen import screen_paths

        self.work = work
        self.h5ad, self.truth, self.facts, self.network = screen_paths(
            work / "screen" / f"{NAME}.h5ad"
        )
        self.hvg_dir = work / "hvg"
        self.hvg = self.hvg_dir / "hvg.h5ad"
        self.bins = work / "bins"
        self.split_dir = work / "perturbation" / SPLIT["kind"]
        self.split = self.split_dir / "split.tsv"
        self.split_summary = self.split_dir / "split_conditions.tsv"
        self.eval = self.split_dir / "eval"
        self.tables = work / "tables"

    def inputs(self, name: str) -> list[Path]:
        """A stage's input files (its rule's ``input``)."""
        ev = [self.eval / f for f in ("subgroups.tsv", "per_condition.tsv", "details.json")]
        return {
            "screen": [],
            "hvg": [self.h5ad],
            "bin": [self.hvg],
            "split": [self.hvg],
            "evaluate": [self.hvg, self.split, self.truth],
            "tables": [*ev, self.facts],
        }[name]

    def outputs(self, name: str) -> list[Path]:
        """A stage's output files."""
        if name == "screen":
            return [self.h5ad, self.truth, self.facts, self.network]
        if name == "split":
            return [self.split, self.split_summary]
        folder = {"hvg": self.hvg_dir, "bin": self.bins, "evaluate": self.eval}
        return sorted(folder.get(name, self.tables).iterdir())


# ---------------------------------------------------------------- stages (child processes)
def screen_params(args: argparse.Namespace, cells_per_condition: int) -> dict:
    """The generator's parameters: Norman-sized (:data:`bench_screen.NORMAN`)."""
    return {
        **NORMAN,
        "n_genes": args.genes,
        "cells_per_condition": cells_per_condition,
        "truth_cells": args.truth_cells,
    }


def stage(name: str, args: argparse.Namespace) -> None:
    """Run one stage in this process (the parent measures it); write its peak RSS."""
    logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s", stream=sys.stdout)
    work = Path(args.workdir)
    try:
        _stage(name, args, Paths(work))
    finally:
        record_peak(work / f"{name}.rss")


def _stage(name: str, args: argparse.Namespace, p: Paths) -> None:
    if name == "screen":
        from evoformer.perturb.screen import write_screen

        write_screen(p.h5ad, screen_params(args, args.now), layout=args.layout)
    elif name == "hvg":
        from evoformer.data.hvg import run_hvg

        hvg = {"flavor": args.flavor, "min_cells_per_gene": args.min_cells_per_gene}
        run_hvg(
            p.h5ad,
            NAME,
            DATASETS[args.layout],
            args.n_hvg,
            {**hvg, "min_genes_per_cell": 0},
            p.hvg,
            p.hvg_dir / "genes.tsv",
            p.hvg_dir / "hvg.png",
        )
    elif name == "bin":
        from evoformer.data.binning import bin_h5ad

        bin_h5ad(p.hvg, p.bins, args.n_bins, True, "random", 0, n_threads=args.threads)
    elif name == "split":
        from evoformer.perturb.splits import split_hvg_cells

        split_hvg_cells(p.hvg, dict(SPLIT), p.split, p.split_summary)
    elif name == "evaluate":
        from evoformer.perturb.evaluate import evaluate_perturbation

        evaluate_perturbation(p.hvg, p.split, p.eval, {}, p.truth)
    elif name == "tables":
        from evoformer.perturb.report import write_perturbation_tables

        write_perturbation_tables(
            {SPLIT["kind"]: p.eval},
            {"dataset": NAME, "n_hvg": args.n_hvg, "git_commit": _commit()},
            p.tables / "perturbation.tsv",
            p.tables / "perturbation_summary.md",
            p.tables / "perturbation_de_changes.png",
            p.facts,
        )
    else:
        raise SystemExit(f"unknown stage {name}")


def _passed(args: argparse.Namespace) -> list[str]:
    """The options a stage process needs (everything but the list of screen sizes)."""
    keys = ("genes", "truth_cells", "layout", "n_hvg", "flavor", "min_cells_per_gene")
    keys += ("n_bins", "threads", "workdir")
    return [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys]


def request(name: str, input_mb: float) -> dict:
    """The memory (MB) and run time (minutes) a stage's rule asks for at the first attempt:
    its own (:mod:`evoformer.data.resources`), or the Slurm profile's ``default-resources``
    (its run time is kept as written there, an expression in ``attempt``)."""
    import yaml

    from evoformer.data import resources

    rule = RULES[name]
    if rule in resources.STAGES:
        return {
            "requested_mb": resources.mem_mb(rule, input_mb),
            "requested_min": resources.runtime_min(rule, input_mb),
            "request_from": "rule",
        }
    default = yaml.safe_load(PROFILE.read_text())["default-resources"]
    return {
        "requested_mb": int(default["mem_mb"]),
        "requested_min": default["runtime"],
        "request_from": "profile",
    }


def screen_info(p: Paths) -> dict:
    """The screen as written and as the HVG stage kept it (cells, genes, conditions)."""
    import h5py
    import pandas as pd

    from evoformer.perturb.conditions import CONTROL

    facts = pd.read_csv(p.facts, sep="\t")
    with h5py.File(p.h5ad, "r") as f:
        n_cells, n_genes = (int(v) for v in f["X"].attrs["shape"])
        nnz = int(f["X/data"].shape[0])
    with h5py.File(p.hvg, "r") as f:
        n_hvg_cells, n_hvg_genes = (int(v) for v in f["X"].attrs["shape"])
        added = int(f["uns/hvg/n_perturbed_genes_added"][()])
    split = pd.read_csv(p.split_summary, sep="\t")
    test = split[(split["set"] == "test") & (split["condition"] != CONTROL)]
    return {
        "cells": n_cells,
        "genes": n_genes,
        "density": nnz / (n_cells * n_genes),
        "conditions": len(facts) + 1,
        "singles": int((facts["n_genes"] == 1).sum()),
        "doubles": int((facts["n_genes"] == 2).sum()),
        "cooperative": int(facts["cooperative"].sum()),
        "hvg_cells": n_hvg_cells,
        "hvg_genes": n_hvg_genes,
        "perturbed_genes_added": added,
        "test_conditions": test["subgroup"].value_counts().sort_index().to_dict(),
    }


def run_chain(args: argparse.Namespace, cells_per_condition: int) -> dict:
    """Generate one screen in an empty ``--workdir`` and run the chain on it: each stage
    measured, with its request and its outputs' sizes."""
    work = Path(args.workdir)
    p = Paths(work)
    stages, sizes = [], {}
    for name in STAGES:
        cmd = [sys.executable, __file__, "--stage", name, f"--now={cells_per_condition}"]
        print(f"--- {name}", flush=True)
        r = {"stage": name, "rule": RULES[name]}
        r.update(run_stage_process([*cmd, *_passed(args)], work / f"{name}.rss"))
        r["input_mb"] = sum(f.stat().st_size for f in p.inputs(name)) / 2**20
        r.update(request(name, r["input_mb"]))
        r["margin"] = r["requested_mb"] / (r["peak_rss_gib"] * 1024)
        out = {str(f.relative_to(work)): f.stat().st_size for f in p.outputs(name)}
        r["output_bytes"] = sum(out.values())
        sizes.update(out)
        print(json.dumps(r), flush=True)
        stages.append(r)
    return {
        "cells_per_condition": cells_per_condition,
        "info": screen_info(p),
        "stages": stages,
        "sizes": sizes,
    }


def clear(work: Path) -> None:
    """Remove everything under ``work`` (the previous chain's files)."""
    for child in work.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def run_info(args: argparse.Namespace) -> dict:
    """What the section says about the run: command, settings, commit, machine, versions."""
    from importlib.metadata import version

    return {
        "command": "python benchmarks/bench_perturb.py " + " ".join(sys.argv[1:]),
        "commit": _commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "versions": f"Python {platform.python_version()}, "
        + ", ".join(f"{m} {version(m)}" for m in ("numpy", "scipy", "h5py", "scanpy", "numba")),
        "screen": screen_params(args, args.cells_per_condition[0]),
        "split": SPLIT,
        **{k: getattr(args, k) for k in ("layout", "n_hvg", "flavor", "min_cells_per_gene")},
        **{k: getattr(args, k) for k in ("n_bins", "threads")},
    }


# ---------------------------------------------------------------- BENCHMARKS.md section
def markdown(run: dict) -> str:
    """The BENCHMARKS.md section, written from one run's figures only (:func:`main`'s JSON)."""
    s = run["screen"]
    lines = [
        "<!-- bench_perturb:start -->",
        "### Norman-sized Perturb-seq screen through the perturbation chain (CPU)",
        "",
        "Generated by the command below (`--update-benchmarks` rewrites this section, do not edit",
        "it by hand; its figures are kept in `benchmarks/results/bench_perturb.json`, from which",
        f"`--from-json` renders it again). Commit {run['commit']}; {run['machine']}, "
        f"{run['versions']}.",
        "",
        "```",
        run["command"],
        "```",
        "",
        f"Data: a synthetic screen (`evoformer.perturb.screen`, {run['layout']} layout) about "
        f"Norman et al. 2019's size as GEARS ships it: {s['n_genes']:,} genes, "
        f"{s['n_regulators']} regulators in {s['n_modules']} modules, singles of most "
        f"regulators, {s['n_doubles_within']} within- and {s['n_doubles_across']} across-module "
        f"doubles, {s['n_control']:,} control cells, noise-free truth on {s['truth_cells']:,} "
        "cells. Each stage of `rules/perturbation.smk` runs in its own process; peak RSS is that "
        f"process's `VmHWM`. Stages: `screen` = `write_screen`; `hvg` = `run_hvg` with the "
        f"perturbation block (flavor {run['flavor']}, n_hvg {run['n_hvg']} + every perturbed "
        f"gene, min_cells_per_gene {run['min_cells_per_gene']}); `bin` = `bin_h5ad` "
        f"({run['n_bins']} bins, include_zero_genes, {run['threads']} threads); `split` = "
        f"`split_hvg_cells` ({run['split']['kind']}, seed {run['split']['seed']}); `evaluate` = "
        "`evaluate_perturbation` with the truth (baselines, 20 DE genes, 1000 bootstrap "
        "resamples); `tables` = `write_perturbation_tables`. *Input* is the sum of the rule's "
        "input files; *requested* is the rule's memory request for it (`evoformer.data.resources`,"
        " first attempt), or, marked *, the Slurm profile's `default-resources` for a rule "
        "without one; *margin* = requested / measured peak.",
        "",
    ]
    for c in run["chains"]:
        i = c["info"]
        test = ", ".join(f"{n} {k}" for k, n in i["test_conditions"].items())
        lines += [
            f"**{i['cells']:,} cells** ({c['cells_per_condition']} per perturbed condition) x "
            f"{i['genes']:,} genes ({i['density']:.1%} non-zero), "
            f"{i['conditions']} conditions with control ({i['singles']} singles, {i['doubles']} "
            f"doubles, {i['cooperative']} of them cooperative); HVG stage: {i['hvg_cells']:,} "
            f"cells x {i['hvg_genes']:,} genes ({i['perturbed_genes_added']} perturbed genes "
            f"added to the top {run['n_hvg']:,}); test conditions: {test}.",
            "",
            "| stage | input | wall | peak RSS | requested | margin | time requested | outputs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in c["stages"]:
            mark = "" if r["request_from"] == "rule" else "*"
            t = r["requested_min"]
            minutes = f"{t} min" if isinstance(t, int) else f"`{t}` min*"
            lines.append(
                f"| {r['stage']} | {_size(r['input_mb'] * 2**20) if r['input_mb'] else '-'} "
                f"| {r['wall_s']:.0f} s | {r['peak_rss_gib']:.2f} GiB "
                f"| {r['requested_mb'] / 1024:.2f} GiB{mark} | {r['margin']:.1f}x | {minutes} "
                f"| {_size(r['output_bytes'])} |"
            )
        peak = max(c["stages"], key=lambda r: r["peak_rss_gib"])
        wall = sum(r["wall_s"] for r in c["stages"])
        lines += [
            "",
            f"Whole chain: peak RSS **{_gib(peak['peak_rss_gib'] * 2**30)}** (`{peak['stage']}`), "
            f"{wall:.0f} s.",
            "",
        ]
    names = sorted({n for c in run["chains"] for n in c["sizes"]})
    lines += [
        "Outputs:",
        "",
        "| file | " + " | ".join(f"{c['info']['cells']:,} cells" for c in run["chains"]) + " |",
        "|---|" + "---|" * len(run["chains"]),
    ]
    for name in names:
        row = [_size(c["sizes"][name]) if name in c["sizes"] else "-" for c in run["chains"]]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines.append("<!-- bench_perturb:end -->")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cells-per-condition", type=int, nargs="+", default=[NORMAN["cells_per_condition"]]
    )
    parser.add_argument("--genes", type=int, default=NORMAN["n_genes"])
    parser.add_argument("--truth-cells", type=int, default=4000)
    parser.add_argument("--layout", choices=sorted(DATASETS), default="gears")
    parser.add_argument("--n-hvg", type=int, default=2000)
    parser.add_argument("--flavor", default="seurat")
    parser.add_argument("--min-cells-per-gene", type=int, default=3)
    parser.add_argument("--n-bins", type=int, default=51)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/bench_perturb")
    add_report_options(parser)
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--now", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        stage(args.stage, args)
        return
    if args.from_json:
        run = json.loads(args.from_json.read_text())
    else:
        run = run_info(args)
        work = Path(args.workdir)
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"{work}: not empty (the chain's files are removed from it)")
        work.mkdir(parents=True, exist_ok=True)
        try:
            run["chains"] = []
            for n in args.cells_per_condition:
                clear(work)
                run["chains"].append(run_chain(args, n))
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    report(args, run, markdown, "bench_perturb")


if __name__ == "__main__":
    main()
