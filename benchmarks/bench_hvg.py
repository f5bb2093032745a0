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

    python benchmarks/bench_hvg.py --cells 1000000 --genes 20000 --reference-cells 100000 \\
        --workdir /tmp/bench_hvg

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


def stage(name: str, args: argparse.Namespace) -> None:
    """Run one stage in this process (the parent measures it); write its peak RSS."""
    work = Path(args.workdir)
    try:
        _stage(name, args, work)
    finally:
        (work / f"{name}.rss").write_text(str(peak_rss_bytes()))


def _stage(name: str, args: argparse.Namespace, work: Path) -> None:
    if name in ("write", "write_reference"):
        reference = name == "write_reference"
        cells = args.reference_cells if reference else args.cells
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


def measure(name: str, args: argparse.Namespace) -> dict:
    """Run ``stage(name)`` in a child process: wall time (s) and its peak RSS (GiB)."""
    cmd = [sys.executable, __file__, "--stage", name, *sys.argv[1:]]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stage {name} failed ({os.waitstatus_to_exitcode(status)})")
    rss = int((Path(args.workdir) / f"{name}.rss").read_text())
    result = {
        "stage": name,
        "wall_s": round(wall, 1),
        "peak_rss_gib": rss / 2**30,
        "ru_maxrss_gib": usage.ru_maxrss / 2**20,  # includes the parent's size at fork
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--density", type=float, default=0.07)
    parser.add_argument("--n-hvg", type=int, default=2000)
    parser.add_argument("--n-bins", type=int, default=51)
    parser.add_argument("--flavor", default="seurat")
    parser.add_argument("--reference-cells", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/bench_hvg")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        stage(args.stage, args)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        written = measure("write", args)
        info = json.loads((work / "write.json").read_text())
        print(
            f"wrote {args.cells} x {args.genes}: {info['density']:.2%} non-zero, "
            f"{info['bytes'] / 2**30:.2f} GiB in {written['wall_s']:.0f} s",
            flush=True,
        )
        chain = [measure(name, args) for name in ("hvg", "bin", "split")]
        rows.append((args.cells, info, chain))
        sizes = {
            "hvg.h5ad": (work / "hvg/hvg.h5ad").stat().st_size,
            "bins/": sum(p.stat().st_size for p in (work / "bins").iterdir()),
        }
        print(json.dumps({"output_bytes": sizes}), flush=True)
        if args.reference_cells:
            measure("write_reference", args)
            ref = json.loads((work / "write_reference.json").read_text())
            pair = [measure(name, args) for name in ("hvg_ref_streamed", "hvg_ref_in_memory")]
            streamed = pd.read_csv(work / "hvg_ref/genes.tsv", sep="\t", index_col=0)
            in_memory = pd.read_csv(work / "genes_in_memory.tsv", sep="\t", index_col=0)
            same = streamed.highly_variable.equals(in_memory.highly_variable) and (
                streamed.hvg_rank.equals(in_memory.hvg_rank)
            )
            rows.append((args.reference_cells, ref, pair, same))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print("\n| data | non-zero | file | stage | wall | peak RSS |")
    print("|---|---|---|---|---|---|")
    for cells, info, results, *same in rows:
        for r in results:
            print(
                f"| {cells:,} x {args.genes:,} | {info['density']:.1%} | "
                f"{info['bytes'] / 2**30:.1f} GiB | {r['stage']} | {r['wall_s']:.0f} s | "
                f"{r['peak_rss_gib']:.2f} GiB |"
            )
        if same:
            print(f"\nstreamed vs in-memory at {cells:,} cells: same genes and ranks: {same[0]}")
    print("outputs: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in sizes.items()))
    chain = rows[0][2]
    print(
        f"\nwhole chain: {sum(r['wall_s'] for r in chain):.0f} s, peak RSS {max(r['peak_rss_gib'] for r in chain):.2f} GiB"
    )


if __name__ == "__main__":
    main()
