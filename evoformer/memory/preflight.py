"""Out-of-memory pre-flight: predict the peak per GPU before a job is queued.

:func:`preflight` traces the experiment's training step (``FakeTensorMode`` + ``MemTracker``,
nothing allocated) at its micro-batch on the target GPU and compares the peak plus a workspace
allowance with the usable memory, ``gpu_mem_gib * (1 - safety_margin)``.

The workspace allowance (``memory.workspace_mib``, :data:`WORKSPACE_MIB` by default; CUDA
targets only) is what ``torch.cuda.max_memory_allocated`` counts but the trace cannot see:
cuBLAS / cuDNN workspaces and the attention kernels' internal buffers, measured on an H200 as
a gap of 84 MiB (pair stack, r = 129, B = 4) to 478 MiB (journal step, r = 501, B = 32; 551 MiB
before the row attention left the math kernel) between the measured and the traced peak
(BENCHMARKS.md, "GPU check"). It is kept apart from the traced peak (``workspace_bytes`` in the
result) so that the traced, analytical and measured estimates stay comparable. The margin covers
what neither contains: the CUDA context (about 0.5 GiB, outside ``max_memory_allocated``), NCCL
buffers, allocator fragmentation (reserved > allocated) and the validation pass.

When the step does not fit it either stops with a one-line message (the predicted peak, the
dominant term, and what would fit: the largest micro-batch, and the switches - bf16, activation
checkpointing, chunking - that bring the configured micro-batch under the budget), or, with
``auto_micro_batch``, lowers the micro-batch to the largest one that fits and divides the global
batch, raising gradient accumulation so the global batch is unchanged.

Host memory. With ``model.offload_checkpoints`` the checkpointed blocks' inputs wait for the
backward in pinned host memory (``host_bytes`` per process, traced on the emulated host; the
analytical model gives the same figure in closed form). All ``n_gpus`` processes of a training
job run on one node, so ``n_gpus * host_bytes`` must fit ``host_mem_gib * (1 - safety_margin)``
as well (``memory.host_mem_gib``, :data:`HOST_MEM_GIB` by default: the host memory the Slurm
profile's train rule asks for). Without offloading there is no host term and no host verdict.

Candidate configurations are screened with the analytical model, scaled by the ratio
traced/analytical of the configured step (the two agree within a few per cent); the micro-batch
the pre-flight picks is traced again before it is accepted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from evoformer.errors import InputError
from evoformer.io import write_text_atomic
from evoformer.memory.analytical import GIB, AnalyticalResult, estimate, human_bytes
from evoformer.memory.spec import StepSpec, spec_from_config
from evoformer.memory.traced import TracedResult, trace_step

log = logging.getLogger(__name__)

#: Default ``memory.workspace_mib``: 1 GiB, over twice the largest gap measured between the
#: GPU's peak and the traced one (478 MiB, the journal step on an H200; 1.9x the 551 MiB of
#: its first run). The gap grew with the step (84 MiB at r = 129, B = 4): a step much larger
#: than the journal's may need more (the GPU check measures it).
WORKSPACE_MIB = 1024

#: Default ``memory.host_mem_gib``: the host memory of a training job, per node, in GiB - the
#: 120000 MB the Slurm profile's train rule asks for (``slurm/config.yaml``, ``mem_mb``).
HOST_MEM_GIB = 111.75

#: Journal-style names of the ledger entries, for the "dominant term" of the message.
COMPONENT_NAMES = {
    "opm_outer": "naive outer product [B, r, r, c_opm, c_opm]",
    "opm_q": "outer product mean Q [B, S*c_opm, r*c_z]",
    "attention_bias": "attention bias/logits [B*rows, H, r, r]",
    "attention_probs": "attention probabilities [B*rows, H, r, r]",
    "qkv": "Q, K, V",
    "tri_projections": "triangle-update projections [B, r, r, c_hidden]",
    "tri_operands": "triangle-update matmul operands",
    "transition_hidden": "transition hidden [*, n*c]",
    "pair_stream": "pair representation z [B, r, r, c_z]",
    "pair_ln_out": "LayerNorm(z) for the pair bias [B, r, r, c_z]",
    "msa_stream": "MSA representation m [B, S, r, c_m]",
}


@dataclass
class PreflightResult:
    """Outcome of the pre-flight (JSON-serialisable with :meth:`to_dict`).

    Attributes:
        fits: whether the (possibly adjusted) step fits the budget.
        predicted_peak_bytes: traced peak per GPU of the step that will run.
        analytical_peak_bytes: analytical peak of the same step.
        budget_bytes: ``gpu_mem_gib * 2^30 * (1 - safety_margin)``.
        workspace_bytes: the workspace allowance (``memory.workspace_mib``; 0 on a CPU
            target): a step fits when its traced peak plus this is at most the budget.
        micro_batch_size, grad_accumulation: what training should use (adjusted when
            ``auto_micro_batch`` lowered the micro-batch).
        requested_micro_batch_size: the configured micro-batch.
        requested_peak_bytes: traced peak at the configured micro-batch.
        dominant: the largest term of the configured step (name and bytes).
        suggestions: configurations of the configured step that fit (screened analytically).
        largest_fitting_micro_batch: the largest micro-batch that fits (traced), or None.
        host_bytes: host memory per process of the configured step (pinned checkpoint inputs
            of ``offload_checkpoints``, traced; 0 without offloading).
        host_mem_gib: host memory of the job's node (``memory.host_mem_gib``).
        host_budget_bytes: ``host_mem_gib * 2^30 * (1 - safety_margin)``; a step fits when
            ``n_gpus * host_bytes`` is at most this, too.
    """

    fits: bool
    predicted_peak_bytes: int
    analytical_peak_bytes: int
    budget_bytes: int
    gpu_mem_gib: float
    n_gpus: int
    safety_margin: float
    micro_batch_size: int
    grad_accumulation: int
    global_batch_size: int
    requested_micro_batch_size: int
    requested_peak_bytes: int
    precision: str
    dominant: dict[str, Any]
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    largest_fitting_micro_batch: int | None = None
    adjusted: bool = False
    traced: dict[str, Any] = field(default_factory=dict)
    analytical: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    workspace_bytes: int = 0  # absent from pre-flights written before it existed
    host_bytes: int = 0
    host_mem_gib: float = HOST_MEM_GIB
    host_budget_bytes: int = 0

    def host_line(self, host_bytes: int | None = None) -> str:
        """The host term of the verdict ('' without offloading)."""
        b = self.host_bytes if host_bytes is None else host_bytes
        if not b:
            return ""
        h = human_bytes
        return (
            f"host memory (pinned checkpoint inputs) {self.n_gpus} x {h(b)} = "
            f"{h(self.n_gpus * b)} per node vs {h(self.host_budget_bytes)} usable "
            f"({self.host_mem_gib:g} GiB x (1 - {self.safety_margin:g}), memory.host_mem_gib)"
            + ("" if self.host_fits(b) else " (too much)")
        )

    def host_fits(self, host_bytes: int | None = None) -> bool:
        b = self.host_bytes if host_bytes is None else host_bytes
        return not b or self.n_gpus * b <= self.host_budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def message(self) -> str:
        """One line: verdict, predicted peak (+ workspace allowance), budget, dominant term,
        what fits."""
        h = human_bytes
        ws = self.workspace_bytes
        allowance = (
            f" + workspace allowance {h(ws)} (memory.workspace_mib) = "
            f"{h(self.requested_peak_bytes + ws)}"
            if ws
            else ""
        )
        head = (
            f"predicted peak {h(self.requested_peak_bytes)} per GPU at micro_batch_size "
            f"{self.requested_micro_batch_size} ({self.precision}){allowance} vs "
            f"{h(self.budget_bytes)} usable ({self.gpu_mem_gib:g} GiB x (1 - {self.safety_margin:g}))"
        )
        dom = f"dominant term: {self.dominant['name']} {h(self.dominant['bytes'])}"
        host = self.host_line()
        if host:
            head = f"{head}; {host}"
        if self.requested_peak_bytes + ws <= self.budget_bytes and self.host_fits():
            return f"fits: {head}; {dom}"
        fit = []
        if self.largest_fitting_micro_batch:
            fit.append(f"micro_batch_size <= {self.largest_fitting_micro_batch}")
        for s in self.suggestions[:3]:
            fit.append(f"{s['change']} (~{h(s['peak_bytes'])})")
        would = (
            "would fit: " + "; or ".join(fit)
            if fit
            else "nothing tried fits (even micro_batch_size 1)"
        )
        if self.adjusted:
            return (
                f"does not fit as configured: {head}; {dom}; using micro_batch_size "
                f"{self.micro_batch_size} x grad_accumulation {self.grad_accumulation} "
                f"({h(self.predicted_peak_bytes)}); {would}"
            )
        return f"does not fit: {head}; {dom}; {would}"


def workspace_bytes(workspace_mib: float, device: str) -> int:
    """The workspace allowance of a ``device`` target in bytes: ``workspace_mib`` MiB on
    ``cuda``, 0 on ``cpu``. Raises InputError naming ``memory.workspace_mib`` unless it is a
    number >= 0."""
    if (
        not isinstance(workspace_mib, int | float)
        or isinstance(workspace_mib, bool)
        or not workspace_mib >= 0
    ):
        raise InputError(
            f"config key 'memory.workspace_mib': got {workspace_mib!r}, expected a number >= 0"
        )
    return int(workspace_mib * 2**20) if device == "cuda" else 0


def dominant_term(traced: TracedResult, analytical: AnalyticalResult) -> dict[str, Any]:
    """The largest term at the peak: a traced category, or (for activations) the largest tensor
    kind of the analytical ledger (not with offloaded checkpoints: the ledger's totals over the
    blocks are then mostly in host memory)."""
    cats = {k: v for k, v in traced.by_category.items() if v > 0}
    cat = max(cats, key=cats.__getitem__) if cats else "activations"
    if analytical.host_bytes:
        return {
            "name": f"{cat} (the checkpoint inputs wait in host memory)",
            "component": cat,
            "bytes": int(cats.get(cat, 0)),
            "category": cat,
            "category_bytes": int(cats.get(cat, 0)),
        }
    if cat in ("activations", "backward_temporaries") and analytical.components:
        comp = max(analytical.components, key=analytical.components.__getitem__)
        return {
            "name": COMPONENT_NAMES.get(comp, comp) + " (activations kept for backward)",
            "component": comp,
            "bytes": int(analytical.components[comp]),
            "category": cat,
            "category_bytes": int(cats.get(cat, 0)),
        }
    return {
        "name": cat,
        "component": cat,
        "bytes": int(cats.get(cat, 0)),
        "category": cat,
        "category_bytes": int(cats.get(cat, 0)),
    }


def _calibrated(spec: StepSpec, ratio: float) -> int:
    return int(estimate(spec).peak_bytes * ratio)


def _host_ok(spec: StepSpec, host_budget: int | None) -> bool:
    """Whether the step's host memory (closed form, exact) fits ``host_budget`` on its node."""
    if host_budget is None:
        return True
    return spec.world_size * estimate(spec).host_bytes <= host_budget


def largest_micro_batch(
    spec: StepSpec,
    budget: int,
    ratio: float,
    verify: bool = True,
    host_budget: int | None = None,
) -> tuple[int | None, int]:
    """Largest ``B <= spec.batch_size`` whose peak fits ``budget`` (and whose host memory, all
    processes of the node together, fits ``host_budget`` when given).

    Screened with the analytical model scaled by ``ratio`` (traced/analytical), then traced
    (``verify``) and lowered until the traced peak fits. Returns ``(B, traced peak)`` or
    ``(None, 0)``.
    """
    # a smaller micro-batch means gradient accumulation (gradients live through backward)
    spec = spec.replace(grad_accumulation=max(2, spec.grad_accumulation))
    lo, hi = 0, spec.batch_size
    while lo < hi:  # analytical peak is monotone in B
        mid = (lo + hi + 1) // 2
        cand = spec.replace(batch_size=mid)
        if _calibrated(cand, ratio) <= budget and _host_ok(cand, host_budget):
            lo = mid
        else:
            hi = mid - 1
    b = lo
    while verify and b >= 1:
        peak = trace_step(spec.replace(batch_size=b)).peak_bytes
        if peak <= budget:
            # the screen may be a little pessimistic: step up while the next one fits
            while b < spec.batch_size and _host_ok(spec.replace(batch_size=b + 1), host_budget):
                nxt = trace_step(spec.replace(batch_size=b + 1)).peak_bytes
                if nxt > budget:
                    break
                b, peak = b + 1, nxt
            return b, peak
        b -= 1
    if b >= 1:
        return b, _calibrated(spec.replace(batch_size=b), ratio)
    return None, 0


def suggestions(
    spec: StepSpec, budget: int, ratio: float, host_budget: int | None = None
) -> list[dict[str, Any]]:
    """Switches that bring ``spec`` (same micro-batch) under ``budget``, cheapest first.

    Tried: bf16 autocast, activation checkpointing of every block, chunk sizes 256 ... 8 for the
    pair ops, and their combinations; then, with checkpointing, the checkpoint inputs offloaded
    to host memory with per-op checkpoints (when the host memory fits ``host_budget``);
    screened analytically (scaled by ``ratio``).
    """
    m = spec.model
    options: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    base_model: dict[str, Any] = {}
    if spec.precision != "bf16":
        options.append(("precision bf16", {}, {"precision": "bf16"}))
    if m.blocks_per_ckpt is None:
        options.append(("blocks_per_ckpt 1", {"blocks_per_ckpt": 1}, {}))
    chunks = [
        c
        for c in (256, 128, 64, 32, 16, 8)
        if c < spec.r and (m.chunk_size is None or c < m.chunk_size)
    ]
    for c in chunks:
        options.append((f"chunk_size {c}", {"chunk_size": c}, {}))
    combos = []
    bf = {"precision": "bf16"} if spec.precision != "bf16" else {}
    ck = {"blocks_per_ckpt": 1} if m.blocks_per_ckpt is None else {}
    if bf and ck:
        combos.append(("precision bf16 + blocks_per_ckpt 1", ck, bf))
    for c in chunks:
        label = " + ".join(
            x
            for x in (
                "precision bf16" if bf else "",
                "blocks_per_ckpt 1" if ck else "",
                f"chunk_size {c}",
            )
            if x
        )
        combos.append((label, {**ck, "chunk_size": c}, bf))
    if not m.offload_checkpoints:
        off = {"offload_checkpoints": True, "checkpoint_ops": True}
        label = "offload_checkpoints + checkpoint_ops"
        parts = ("precision bf16" if bf else "", "blocks_per_ckpt 1" if ck else "", label)
        combos.append((" + ".join(x for x in parts if x), {**ck, **off}, bf))
    out = []
    seen = set()
    for change, model_changes, step_changes in options + combos:
        if change in seen:
            continue
        seen.add(change)
        cand = spec.replace(model={**base_model, **model_changes}, **step_changes)
        peak = _calibrated(cand, ratio)
        if peak <= budget and _host_ok(cand, host_budget):
            out.append(
                {
                    "change": change,
                    "peak_bytes": peak,
                    "model": model_changes,
                    "train": step_changes,
                }
            )
    # fewest switches first, then the largest chunk (least recomputation), then lowest peak
    out.sort(
        key=lambda s: (
            s["change"].count("+"),
            -int(s["model"].get("chunk_size") or 10**9),
            s["peak_bytes"],
        )
    )
    # one suggestion per switch combination (the largest chunk that fits), and only when it
    # needs all its switches (chunking does not help the naive outer product, for example)
    kept: list[dict[str, Any]] = []
    kinds: set[frozenset[str]] = set()
    for s in out:
        kind = frozenset((*s["model"], *s["train"]))
        if kind in kinds or any(k < kind for k in kinds):
            continue
        kinds.add(kind)
        kept.append(s)
    return kept


def preflight(
    model_cfg: dict[str, Any],
    train_cfg: dict[str, Any],
    data_shape: dict[str, Any],
    gpu_mem_gib: float,
    n_gpus: int = 1,
    safety_margin: float = 0.1,
    auto_micro_batch: bool = False,
    opm: str = "ours",
    raise_on_oom: bool = True,
    device: str = "cuda",
    workspace_mib: float = WORKSPACE_MIB,
    host_mem_gib: float | None = None,
) -> PreflightResult:
    """Does the experiment's training step fit on ``n_gpus`` GPUs of ``gpu_mem_gib`` each?

    Args:
        model_cfg: ``experiment.model`` (ModelConfig keys).
        train_cfg: ``experiment.train`` (``micro_batch_size``, ``global_batch_size``,
            ``precision``, ...).
        data_shape: ``seq_len``, ``n_genes``, ``n_bins`` (``n_labels``, ``prior``); see
            :func:`evoformer.memory.spec.data_shape`.
        gpu_mem_gib: memory of one GPU (80 for an A100-80GB).
        n_gpus: GPUs (DDP processes) of the job.
        safety_margin: fraction of the GPU memory kept free, in [0, 1).
        auto_micro_batch: lower the micro-batch (raising gradient accumulation) instead of
            failing when the configured one does not fit.
        opm: ``ours`` or ``naive`` (for comparisons).
        raise_on_oom: raise :class:`InputError` when nothing usable fits (the pipeline's
            behaviour); False returns the result with ``fits = False``.
        device: ``cuda`` (the target GPU, emulated) or ``cpu`` (a CPU-only run: ``n_gpus`` is
            then the process count and ``gpu_mem_gib`` the memory per process).
        workspace_mib: the workspace allowance added to the traced peak of a ``cuda`` target
            (see the module docstring; ignored for ``cpu``).
        host_mem_gib: host memory of the node the ``n_gpus`` processes share (``None``:
            :data:`HOST_MEM_GIB`); checked only when the step offloads to the host.

    Raises:
        InputError: a bad argument, or the step does not fit (one line: predicted peak,
            dominant term, what would fit).
    """
    t0 = time.perf_counter()
    if not 0 <= safety_margin < 1:
        raise InputError(
            f"config key 'memory.safety_margin': got {safety_margin!r}, expected a number in [0, 1)"
        )
    if not gpu_mem_gib or gpu_mem_gib <= 0:
        raise InputError(
            f"config key 'memory.gpu_mem_gib': got {gpu_mem_gib!r}, expected a positive number"
        )
    if int(n_gpus) < 1:
        raise InputError(f"preflight: n_gpus must be >= 1, got {n_gpus!r}")
    spec = spec_from_config(
        model_cfg, train_cfg, data_shape, n_gpus=int(n_gpus), device=device, opm=opm
    )
    global_batch = int(train_cfg.get("global_batch_size", spec.batch_size * n_gpus))
    budget = int(gpu_mem_gib * GIB * (1 - safety_margin))
    workspace = workspace_bytes(workspace_mib, spec.device)
    room = budget - workspace  # what the traced peak may take
    host_gib = HOST_MEM_GIB if host_mem_gib is None else host_mem_gib
    if isinstance(host_gib, bool) or not isinstance(host_gib, int | float) or not host_gib > 0:
        raise InputError(
            f"config key 'memory.host_mem_gib': got {host_mem_gib!r}, expected a positive number"
        )
    host_budget = int(host_gib * GIB * (1 - safety_margin))

    traced = trace_step(spec)
    analytical = estimate(spec)
    ratio = traced.peak_bytes / max(1, analytical.peak_bytes)
    dom = dominant_term(traced, analytical)
    host_fits = spec.world_size * traced.host_peak_bytes <= host_budget
    fits = traced.peak_bytes <= room and host_fits
    micro, peak, adjusted = spec.batch_size, traced.peak_bytes, False
    largest, sugg = None, []
    if not fits:
        largest, largest_peak = largest_micro_batch(spec, room, ratio, host_budget=host_budget)
        sugg = suggestions(spec, room, ratio, host_budget)
        if auto_micro_batch and largest:
            per_gpu = global_batch // n_gpus
            b = max((d for d in range(1, largest + 1) if per_gpu % d == 0), default=0)
            if b >= 1 and global_batch % n_gpus == 0:
                micro, adjusted, fits = b, True, True
                peak = (
                    largest_peak
                    if b == largest
                    else trace_step(
                        spec.replace(batch_size=b, grad_accumulation=global_batch // (b * n_gpus))
                    ).peak_bytes
                )
    accum = max(1, global_batch // max(1, micro * n_gpus))
    final = spec.replace(batch_size=micro, grad_accumulation=accum)
    result = PreflightResult(
        fits=fits,
        predicted_peak_bytes=int(peak),
        analytical_peak_bytes=int(
            analytical.peak_bytes if not adjusted else estimate(final).peak_bytes
        ),
        budget_bytes=budget,
        gpu_mem_gib=float(gpu_mem_gib),
        n_gpus=int(n_gpus),
        safety_margin=float(safety_margin),
        micro_batch_size=micro,
        grad_accumulation=accum,
        global_batch_size=global_batch,
        requested_micro_batch_size=spec.batch_size,
        requested_peak_bytes=int(traced.peak_bytes),
        precision=spec.precision,
        dominant=dom,
        suggestions=sugg,
        largest_fitting_micro_batch=largest,
        adjusted=adjusted,
        traced=traced.to_dict(),
        analytical=analytical.to_dict(),
        spec=final.to_dict(),
        seconds=time.perf_counter() - t0,
        workspace_bytes=workspace,
        host_bytes=int(traced.host_peak_bytes),
        host_mem_gib=float(host_gib),
        host_budget_bytes=host_budget,
    )
    if not result.fits and raise_on_oom:
        raise InputError("config 'experiment.train.micro_batch_size': " + result.message())
    return result


def write_preflight(
    out_json: str | os.PathLike,
    model_cfg: dict[str, Any],
    train_cfg: dict[str, Any],
    data_shape: dict[str, Any],
    gpu_mem_gib: float,
    n_gpus: int = 1,
    safety_margin: float = 0.1,
    auto_micro_batch: bool = False,
    device: str = "cuda",
    workspace_mib: float = WORKSPACE_MIB,
    host_mem_gib: float | None = None,
) -> PreflightResult:
    """:func:`preflight` for the workflow: logs the verdict and writes ``preflight.json``
    atomically; raises :class:`InputError` (nothing written) when the step does not fit."""
    result = preflight(
        model_cfg,
        train_cfg,
        data_shape,
        gpu_mem_gib,
        n_gpus,
        safety_margin,
        auto_micro_batch,
        device=device,
        workspace_mib=workspace_mib,
        host_mem_gib=host_mem_gib,
    )
    log.info("%s", result.message())
    log.info(
        "traced %s, analytical %s, workspace allowance %s, %.1f s",
        human_bytes(result.predicted_peak_bytes),
        human_bytes(result.analytical_peak_bytes),
        human_bytes(result.workspace_bytes),
        result.seconds,
    )
    write_text_atomic(out_json, json.dumps(result.to_dict(), indent=2) + "\n")
    return result
