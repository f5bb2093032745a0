"""Cluster resources of the data stages (``hvg``, ``bin``, ``split``, and the perturbation
chain's), sized from their input.

A Slurm job that asks for too little memory is killed (and retried with more, ``attempt``);
one that asks for far too much waits longer in the queue. Each stage's request is a base
plus a slope per GiB of its input (all files of a multi-file dataset), times the attempt,
with a floor, and the same for its run time. The slopes come from
``benchmarks/bench_hvg.py`` (hvg, bin, split at 10k, 100k and 1M cells) and
``benchmarks/bench_perturb.py`` (the perturbation chain at 40k-280k cells), which print each
stage's request next to its measured peak RSS (BENCHMARKS.md states the margins). The rules in
``rules/preprocess.smk`` call :func:`mem_mb` and :func:`runtime_min`; nothing else holds
these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageResources:
    """``mem_mb = max(min_mb, base_mb + mb_per_gib * input GiB) * attempt``;
    ``runtime = max(min_minutes, minutes_per_gib * input GiB) * attempt``."""

    base_mb: float
    mb_per_gib: float
    minutes_per_gib: float
    min_mb: int = 2000
    min_minutes: int = 10


# Inputs: hvg and split read the dataset's .h5ad file(s) (counts or log1p, any layout);
# bin reads the hvg stage's hvg.h5ad (float32 CSR of the selected genes). The streamed hvg
# and the split hold per-cell arrays and one row chunk; bin holds one chunk and writes its
# outputs through file handles (its outputs are not memory-mapped by the job).
STAGES: dict[str, StageResources] = {
    "hvg": StageResources(base_mb=1500, mb_per_gib=100, minutes_per_gib=2),
    "bin": StageResources(base_mb=1500, mb_per_gib=600, minutes_per_gib=2),
    "split": StageResources(base_mb=1000, mb_per_gib=20, minutes_per_gib=0.5),
    # the perturbation evaluation streams hvg.h5ad once: [conditions, genes] statistics; the
    # perturbation split reads hvg.h5ad's obs; the tables read the evaluations' small files;
    # the synthetic screen generator holds one block of cells and the [conditions, genes] truth
    # (its input is its config: the floor; a 280k-cell screen took 0.41 GiB and 6 minutes)
    "perturb_evaluate": StageResources(base_mb=1500, mb_per_gib=300, minutes_per_gib=5),
    "perturb_split": StageResources(base_mb=1000, mb_per_gib=100, minutes_per_gib=1),
    "perturb_tables": StageResources(base_mb=1000, mb_per_gib=0, minutes_per_gib=0),
    "screen": StageResources(base_mb=1000, mb_per_gib=0, minutes_per_gib=0, min_minutes=60),
}


def mem_mb(stage: str, input_mb: float, attempt: int = 1) -> int:
    """Memory to request (MB) for ``stage`` on ``input_mb`` MB of input at try ``attempt``."""
    r = STAGES[stage]
    return int(max(r.min_mb, r.base_mb + r.mb_per_gib * input_mb / 1024) * attempt)


def runtime_min(stage: str, input_mb: float, attempt: int = 1) -> int:
    """Run time to request (minutes) for ``stage`` on ``input_mb`` MB of input."""
    r = STAGES[stage]
    return int(max(r.min_minutes, r.minutes_per_gib * input_mb / 1024) * attempt)
