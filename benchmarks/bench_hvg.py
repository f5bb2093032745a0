"""Atlas-scale preprocessing benchmark: streamed HVG selection -> binning -> split.

Writes a synthetic counts .h5ad of ``--cells`` x ``--genes`` in chunks of cells (never
held whole: CSR appended to h5py datasets), about ``--density`` non-zero, then runs the
pipeline's stages on it, each in its own process, and measures wall time and peak RSS
(``ru_maxrss`` of that process, from ``os.wait4``):

* ``hvg``: :func:`evoformer.data.hvg.run_hvg` (streamed; ``--flavor``, ``--n-hvg``,
  min_cells_per_gene 3) -> hvg.h5ad, genes.tsv, hvg.png;
* ``bin``: :func:`evoformer.data.binning.bin_h5ad` (``--n-bins``, include_zero_genes,
  2 threads) -> memory-mapped .npy arrays;
* ``split``: :func:`evoformer.data.split.run_split` (stratified, 5 folds) -> split.tsv.

With ``--reference-cells M`` it also writes an M-cell file of the same genes and runs
scanpy in memory on it (:func:`select_hvg_in_memory` after ``load_expression``, the old
``hvg`` rule) and the streamed ``hvg`` on the same file, for the memory ratio. Every
file is written under ``--workdir`` and deleted at the end (``--keep`` keeps them).

    python benchmarks/bench_hvg.py --cells 10000 100000 1000000 --genes 20000 \\
        --flavor seurat_v3 --reference-cells 200000 --workdir /tmp/bench_hvg \\
        --update-benchmarks BENCHMARKS.md

Several ``--cells`` run the chain once each (the files of one are removed before the next).
For each stage it prints the rule's memory request for that input
(:mod:`evoformer.data.resources`) beside the measured peak, and the size of every output
file; ``--update-benchmarks`` regenerates BENCHMARKS.md's atlas section from the run.

Synthetic data: 8 cell types, each with its own gene-usage profile (log-normal gene
weights, 10% of genes re-weighted per type); a cell's expressed genes are drawn from its
type's profile (with repetition, then de-duplicated), its number of draws is
``density * genes`` times a log-normal factor; a value is ``1 + Poisson(mu_gene * s_cell)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

N_TYPES = 8


def _write_elem(group: h5py.Group, key: str, value: object) -> None:
    from anndata.io import write_elem

    write_elem(group, key, value)


def write_counts_h5ad(
    path: Path, n_cells: int, n_genes: int, density: float, seed: int = 0, chunk_cells: int = 5000
) -> dict:
    """Synthetic counts [n_cells, n_genes] float32 CSR written chunk by chunk (see module doc).

    Memory: one chunk of cells plus the [n_cells] cell ids and indptr.
    Returns {"nnz", "density", "bytes"}.
    """
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.5, n_genes)
    profiles = np.tile(weights, (N_TYPES, 1))
    for t in range(N_TYPES):
        genes = rng.choice(n_genes, size=n_genes // 10, replace=False)
        profiles[t, genes] *= rng.lognormal(0.0, 1.5, len(genes))
    profiles /= profiles.sum(axis=1, keepdims=True)
    # one flat, increasing CDF: type t's CDF shifted by t, so a uniform u + t finds a gene of t
    flat_cdf = (np.cumsum(profiles, axis=1) + np.arange(N_TYPES)[:, None]).ravel()
    gene_mu = rng.lognormal(-0.5, 0.8, n_genes)
    types = rng.integers(0, N_TYPES, n_cells)
    width = len(str(n_cells - 1))
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    nnz = 0
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        x = f.create_group("X")
        x.attrs["encoding-type"] = "csr_matrix"
        x.attrs["encoding-version"] = "0.1.0"
        x.attrs["shape"] = np.array([n_cells, n_genes])
        step = 1 << 20
        data = x.create_dataset("data", (0,), maxshape=(None,), dtype="f4", chunks=(step,))
        # int32 indices (and indptr, below), as anndata writes a matrix under 2**31 non-zeros
        indices = x.create_dataset("indices", (0,), maxshape=(None,), dtype="i4", chunks=(step,))
        for start in range(0, n_cells, chunk_cells):
            stop = min(n_cells, start + chunk_cells)
            n = stop - start
            draws = np.clip(
                np.round(density * n_genes * 1.08 * rng.lognormal(0.0, 0.3, n)), 1, n_genes
            ).astype(np.int64)
            rows = np.repeat(np.arange(n, dtype=np.int64), draws)
            u = rng.random(len(rows)) + types[start:stop][rows]
            genes = np.minimum(np.searchsorted(flat_cdf, u), flat_cdf.size - 1) % n_genes
            keys = np.sort(rows * n_genes + genes)  # de-duplicated below (np.unique hashes: slow)
            keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
            rows, genes = keys // n_genes, keys % n_genes
            scale = rng.lognormal(0.0, 0.4, n)
            values = (1 + rng.poisson(gene_mu[genes] * scale[rows])).astype(np.float32)
            data.resize((nnz + len(keys),))
            indices.resize((nnz + len(keys),))
            data[nnz:] = values
            indices[nnz:] = genes.astype(np.int32)
            indptr[start + 1 : stop + 1] = nnz + np.cumsum(np.bincount(rows, minlength=n))
            nnz += len(keys)
        # anndata's (scipy's) index dtype: int32 for indices and indptr while they fit
        x.create_dataset("indptr", data=indptr.astype(np.int32 if nnz < 2**31 else np.int64))
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical.from_codes(types, [f"type_{t}" for t in range(N_TYPES)])},
            index=pd.Index([f"cell_{i:0{width}d}" for i in range(n_cells)]),
        )
        _write_elem(f, "obs", obs)
        gwidth = len(str(n_genes - 1))
        _write_elem(f, "var", pd.DataFrame(index=[f"gene_{g:0{gwidth}d}" for g in range(n_genes)]))
        for key in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            _write_elem(f, key, {})
    return {"nnz": nnz, "density": nnz / (n_cells * n_genes), "bytes": path.stat().st_size}


# ---------------------------------------------------------------- stages (child processes)
DATASET = {"expression": "X", "value_type": "counts", "label_key": "cell_type"}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM of /proc/self/status; ru_maxrss as fallback).

    VmHWM belongs to the process image: it starts afresh at exec, whereas ru_maxrss keeps
    the high-water mark of the forked parent copy (a child of a large parent reports at
    least the parent's size)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def record_peak(path: Path) -> None:
    """Write this process's peak RSS (bytes) to ``path``, for :func:`run_stage_process`."""
    path.write_text(str(peak_rss_bytes()))


def run_stage_process(cmd: list[str], peak_path: Path) -> dict:
    """Run one stage's command ``cmd`` in a child process (which calls :func:`record_peak`
    on ``peak_path`` before it exits) and measure it: ``wall_s``, ``peak_rss_gib`` (the
    child's VmHWM) and ``ru_maxrss_gib`` (includes the parent's size at fork). A stage that
    fails stops the benchmark."""
    peak_path.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[1:])}: failed ({os.waitstatus_to_exitcode(status)})")
    return {
        "wall_s": round(wall, 1),
        "peak_rss_gib": int(peak_path.read_text()) / 2**30,
        "ru_maxrss_gib": usage.ru_maxrss / 2**20,
    }


def stage(name: str, args: argparse.Namespace) -> None:
    """Run one stage in this process (the parent measures it); write its peak RSS."""
    work = Path(args.workdir)
    try:
        _stage(name, args, work)
    finally:
        record_peak(work / f"{name}.rss")


def _stage(name: str, args: argparse.Namespace, work: Path) -> None:
    if name in ("write", "write_reference"):
        reference = name == "write_reference"
        cells = args.cells_now
        path = work / ("reference.h5ad" if reference else "counts.h5ad")
        info = write_counts_h5ad(path, cells, args.genes, args.density, seed=int(reference))
        (work / f"{name}.json").write_text(json.dumps(info))
    elif name == "hvg" or name == "hvg_ref_streamed":
        from evoformer.data.hvg import run_hvg

        source = work / ("counts.h5ad" if name == "hvg" else "reference.h5ad")
        out = work / ("hvg" if name == "hvg" else "hvg_ref")
        run_hvg(
            source,
            "bench",
            DATASET,
            args.n_hvg,
            {"flavor": args.flavor, "min_cells_per_gene": 3, "min_genes_per_cell": 0},
            out / "hvg.h5ad",
            out / "genes.tsv",
            out / "hvg.png",
        )
    elif name == "bin":
        from evoformer.data.binning import bin_h5ad

        bin_h5ad(work / "hvg/hvg.h5ad", work / "bins", args.n_bins, True, "random", 0, n_threads=2)
    elif name == "split":
        from evoformer.data.split import run_split

        fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
        split = {"fractions": fractions, "stratify": True, "n_folds": 5, "seed": 0}
        run_split(work / "counts.h5ad", "bench", "cell_type", split, work / "split.tsv")
    elif name == "hvg_ref_in_memory":
        from evoformer.data.datasets import DatasetSpec, load_expression
        from evoformer.data.hvg import select_hvg_in_memory

        spec = DatasetSpec.expression_only("bench", DATASET)
        adata = load_expression(work / "reference.h5ad", spec)
        _, genes = select_hvg_in_memory(adata, spec, args.n_hvg, args.flavor, 3, 0)
        genes.to_csv(work / "genes_in_memory.tsv", sep="\t")
    else:
        raise SystemExit(f"unknown stage {name}")


def measure(name: str, args: argparse.Namespace, cells: int) -> dict:
    """Run ``stage(name)`` in a child process: wall time (s) and its peak RSS (GiB)."""
    cmd = [sys.executable, __file__, "--stage", name, "--cells-now", str(cells), *_passed(args)]
    measured = run_stage_process(cmd, Path(args.workdir) / f"{name}.rss")
    result = {"cells": cells, "stage": name, **measured}
    print(json.dumps(result), flush=True)
    return result


def _passed(args: argparse.Namespace) -> list[str]:
    """The options a stage process needs (everything but the list of cell counts)."""
    return [
        f"--genes={args.genes}",
        f"--density={args.density}",
        f"--n-hvg={args.n_hvg}",
        f"--n-bins={args.n_bins}",
        f"--flavor={args.flavor}",
        f"--reference-cells={args.reference_cells}",
        f"--workdir={args.workdir}",
    ]


# Each stage's input, for its resource request (evoformer.data.resources): what the rule
# hands Snakemake as input.
STAGE_INPUT = {"hvg": "counts.h5ad", "bin": "hvg/hvg.h5ad", "split": "counts.h5ad"}


def output_sizes(work: Path) -> dict[str, int]:
    """Bytes of every file the chain wrote (hvg/, bins/, split.tsv), by relative path."""
    files = [*sorted((work / "hvg").iterdir()), *sorted((work / "bins").iterdir())]
    files.append(work / "split.tsv")
    return {str(p.relative_to(work)): p.stat().st_size for p in files}


def run_chain(args: argparse.Namespace, cells: int) -> dict:
    """Write a ``cells`` x genes file, run hvg -> bin -> split on it, measure each stage, its
    resource request and every output's size; the stage outputs are removed afterwards."""
    from evoformer.data import resources

    work = Path(args.workdir)
    written = measure("write", args, cells)
    info = json.loads((work / "write.json").read_text())
    print(
        f"wrote {cells} x {args.genes}: {info['density']:.2%} non-zero, "
        f"{info['bytes'] / 2**30:.2f} GiB in {written['wall_s']:.0f} s",
        flush=True,
    )
    stages = []
    for name in ("hvg", "bin", "split"):
        r = measure(name, args, cells)
        input_mb = (work / STAGE_INPUT[name]).stat().st_size / 2**20
        r["input_mb"] = input_mb
        r["requested_mb"] = resources.mem_mb(name, input_mb)
        r["requested_min"] = resources.runtime_min(name, input_mb)
        r["margin"] = r["requested_mb"] / (r["peak_rss_gib"] * 1024)
        stages.append(r)
    sizes = output_sizes(work)
    meta = json.loads((work / "bins/meta.json").read_text())
    print(json.dumps({"cells": cells, "output_bytes": sizes}), flush=True)
    for path in ("hvg", "bins", "split.tsv", "counts.h5ad"):
        target = work / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return {"cells": cells, "info": info, "stages": stages, "sizes": sizes, "meta": meta}


def reference(args: argparse.Namespace) -> dict:
    """Streamed vs scanpy in memory on a ``--reference-cells`` file."""
    work = Path(args.workdir)
    measure("write_reference", args, args.reference_cells)
    info = json.loads((work / "write_reference.json").read_text())
    pair = [
        measure(name, args, args.reference_cells)
        for name in ("hvg_ref_streamed", "hvg_ref_in_memory")
    ]
    streamed = pd.read_csv(work / "hvg_ref/genes.tsv", sep="\t", index_col=0)
    in_memory = pd.read_csv(work / "genes_in_memory.tsv", sep="\t", index_col=0)
    same = streamed.highly_variable.equals(in_memory.highly_variable) and (
        streamed.hvg_rank.equals(in_memory.hvg_rank)
    )
    return {"cells": args.reference_cells, "info": info, "stages": pair, "same": same}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _size(n: float) -> str:
    """Bytes in the largest unit that keeps at least one whole digit."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def run_info(args: argparse.Namespace) -> dict:
    """What the section says about the run: command, settings, commit, machine, versions."""
    import numba
    import scanpy

    return {
        "command": "python benchmarks/bench_hvg.py " + " ".join(sys.argv[1:]),
        "commit": _commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs",
        "versions": f"Python {platform.python_version()}, scanpy {scanpy.__version__}, "
        f"numba {numba.__version__}",
        **{k: getattr(args, k) for k in ("genes", "flavor", "n_hvg", "n_bins")},
    }


def markdown(run: dict) -> str:
    """The BENCHMARKS.md section, written from one run's figures only (:func:`main`'s JSON)."""
    chains, ref = run["chains"], run["reference"]
    args = argparse.Namespace(**{k: run[k] for k in ("genes", "flavor", "n_hvg", "n_bins")})
    lines = [
        "<!-- bench_hvg:start -->",
        "### Atlas-scale preprocessing: streamed HVG selection -> binning -> split (CPU)",
        "",
        "Generated by the command below (`--update-benchmarks` rewrites this section, do not edit",
        "it by hand; its figures are kept in `benchmarks/results/bench_hvg_atlas.json`, from which",
        f"`--from-json` renders it again). Commit {run['commit']}; {run['machine']}, {run['versions']}.",
        "",
        "```",
        run["command"],
        "```",
        "",
        "Data: synthetic counts written chunk by chunk (never held whole), 8 cell types with "
        f"their own gene profiles, {args.genes:,} genes. Each stage runs in its own process; peak "
        "RSS is that process's `VmHWM`. Stages: `hvg` = `run_hvg` (streamed; flavor "
        f"{args.flavor}, n_hvg {args.n_hvg}, min_cells_per_gene 3), `bin` = `bin_h5ad` "
        f"({args.n_bins} bins, include_zero_genes, 2 threads), `split` = `run_split` "
        "(stratified, 5 folds). *Requested* is the rule's memory request for that input "
        "(`evoformer.data.resources`, first attempt); *margin* = requested / measured peak.",
        "",
        "| cells | non-zero | input | stage | wall | peak RSS | requested | margin |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in chains:
        for r in c["stages"]:
            lines.append(
                f"| {c['cells']:,} | {c['info']['density']:.1%} | {_gib(c['info']['bytes'])} "
                f"| {r['stage']} | {r['wall_s']:.0f} s | {r['peak_rss_gib']:.2f} GiB "
                f"| {r['requested_mb'] / 1024:.2f} GiB | {r['margin']:.1f}x |"
            )
    lines += ["", "Whole chain (largest stage peak, summed wall time):", ""]
    for c in chains:
        peak = max(r["peak_rss_gib"] for r in c["stages"])
        wall = sum(r["wall_s"] for r in c["stages"])
        lines.append(f"- {c['cells']:,} cells: peak RSS **{peak:.2f} GiB**, {wall:.0f} s")
    names = sorted({name for c in chains for name in c["sizes"]})
    lines += [
        "",
        "Outputs (bytes are deterministic for a given input; `values.npy` = the bins [N, L]):",
        "",
        "| file | " + " | ".join(f"{c['cells']:,} cells" for c in chains) + " |",
        "|---|" + "---|" * len(chains),
    ]
    for name in names:
        row = [_size(c["sizes"][name]) if name in c["sizes"] else "-" for c in chains]
        lines.append(f"| {name} | " + " | ".join(row) + " |")

    def ratio(c: dict, expression: bool) -> float:
        """Binned outputs (the token expression, or everything else) over values.npy."""
        part = [
            v
            for k, v in c["sizes"].items()
            if k.startswith("bins/") and k.startswith("bins/expression_") == expression
        ]
        return sum(part) / c["sizes"]["bins/values.npy"]

    def per_nonzero(c: dict) -> float:
        expr = sum(v for k, v in c["sizes"].items() if k.startswith("bins/expression_"))
        return expr / (c["meta"]["mean_nonzeros_per_cell"] * c["meta"]["n_cells"])

    def row(label: str, values: list[str]) -> str:
        return f"| {label} | " + " | ".join(values) + " |"

    lines += [
        row(
            "binned outputs but the expression / values.npy",
            [f"{ratio(c, False):.2f}x" for c in chains],
        ),
        row("token expression (3 files) / values.npy", [f"{ratio(c, True):.2f}x" for c in chains]),
        row("token expression, bytes per HVG non-zero", [f"{per_nonzero(c):.2f}" for c in chains]),
    ]
    if ref is not None:
        lines += [
            "",
            f"Streamed vs scanpy in memory (`load_expression` + `select_hvg_in_memory`, the old "
            f"`hvg` rule; same settings) on a {ref['cells']:,} x {args.genes:,} file "
            f"({ref['info']['density']:.1%} non-zero, {_gib(ref['info']['bytes'])}); same genes "
            f"and ranks: {'yes' if ref['same'] else '**no**'}.",
            "",
            "| stage | wall | peak RSS |",
            "|---|---|---|",
        ]
        for r in ref["stages"]:
            lines.append(f"| {r['stage']} | {r['wall_s']:.0f} s | {r['peak_rss_gib']:.2f} GiB |")
    lines.append("<!-- bench_hvg:end -->")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def update_section(path: Path, section: str, name: str = "bench_hvg") -> None:
    """Replace the ``<!-- name:start -->`` ... ``<!-- name:end -->`` block of ``path``
    (BENCHMARKS.md) with ``section``."""
    from evoformer.io import write_text_atomic

    text = path.read_text()
    begin, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->\n"
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: no {begin} ... {end.strip()} block to replace")
    head, rest = text.split(begin, 1)
    write_text_atomic(path, head + section + rest.split(end, 1)[1])


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark with a generated BENCHMARKS.md section shares."""
    parser.add_argument("--update-benchmarks", type=Path, default=None, metavar="BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None, help="write all figures as JSON")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="render a saved run (--json) instead"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")


def report(args: argparse.Namespace, run: dict, markdown: Callable[[dict], str], name: str) -> None:
    """Keep a fresh run's figures (``--json``), print its section and, with
    ``--update-benchmarks``, put it into BENCHMARKS.md between the ``name`` markers."""
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(run, indent=1) + "\n")
    section = markdown(run)
    print("\n" + section)
    if args.update_benchmarks:
        update_section(args.update_benchmarks, section, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000])
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--density", type=float, default=0.07)
    parser.add_argument("--n-hvg", type=int, default=2000)
    parser.add_argument("--n-bins", type=int, default=51)
    parser.add_argument("--flavor", default="seurat")
    parser.add_argument("--reference-cells", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/bench_hvg")
    add_report_options(parser)
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cells-now", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        stage(args.stage, args)
        return
    if args.from_json:
        run = json.loads(args.from_json.read_text())
    else:
        run = run_info(args)
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        try:
            run["chains"] = [run_chain(args, cells) for cells in args.cells]
            run["reference"] = reference(args) if args.reference_cells else None
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    report(args, run, markdown, "bench_hvg")


if __name__ == "__main__":
    main()
