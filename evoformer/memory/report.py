"""Memory report of one experiment (Markdown + HTML + stacked bar chart) and the summary table.

The report puts the three estimates side by side, per component:

* **analytical** (:mod:`evoformer.memory.analytical`): closed-form ledgers per op;
* **traced** (:mod:`evoformer.memory.traced`): the real step under FakeTensorMode + MemTracker;
* **measured**: what training recorded in ``performance_summary.json``
  (``peak_memory_bytes``, ``peak_memory_source``): ``cuda.max_memory_allocated`` on GPU, the
  profiler's allocator timeline (``profiler``) on CPU. A process RSS (``rss``) is shown but not
  compared: it counts the Python heap, libraries and allocator caches, not tensors.

Two steps are estimated: the pre-flight's (the target GPU, from ``preflight.json``) and, when
the run went elsewhere (a CPU fallback, another precision or process count, read from the
summary), the step as it actually ran, so that measured/traced compares like with like.

With ``model.offload_checkpoints`` the host memory the step keeps (pinned checkpoint inputs) is
reported on its own line (analytical and traced; ``host_*_bytes`` in the row), as the pre-flight
checks it against ``memory.host_mem_gib``.

The pre-flight's workspace allowance (``memory.workspace_mib``, CUDA targets only) is reported
on its own line and column (``workspace_allowance_bytes``), not added to any of the three
estimates: it is part of the verdict, not of the step's tensors.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from evoformer.errors import InputError
from evoformer.io import atomic_path, write_text_atomic
from evoformer.memory.analytical import GIB, estimate, human_bytes
from evoformer.memory.spec import StepSpec
from evoformer.memory.traced import trace_step
from evoformer.model import ModelConfig

CATEGORIES = (
    "parameters",
    "gradients",
    "optimizer",
    "activations",
    "backward_temporaries",
    "inputs",
    "buffers",
    "ddp_buckets",
)
COMPARABLE_SOURCES = ("cuda.max_memory_allocated", "profiler")


def _read_json(path: str | os.PathLike | None) -> dict[str, Any] | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc


def _spec_from_dict(d: dict[str, Any]) -> StepSpec:
    d = dict(d)
    d.pop("r", None)
    model = ModelConfig.from_dict(d.pop("model"))
    return StepSpec(model=model, **d)


def run_spec(preflight: dict[str, Any], summary: dict[str, Any] | None) -> StepSpec | None:
    """The step as training ran it (device, precision, processes, micro-batch from the summary),
    or None when it is the pre-flight's step or there is no summary."""
    if not summary:
        return None
    spec = _spec_from_dict(preflight["spec"])
    system = summary.get("system") or {}
    device = "cpu" if str(system.get("device", "cuda")).startswith("cpu") else "cuda"
    precision = summary.get("precision", spec.precision)
    world = int(system.get("world_size", spec.world_size))
    train = (summary.get("config") or {}).get("train") or {}
    micro = int(train.get("micro_batch_size", spec.batch_size))
    model = (summary.get("config") or {}).get("model")
    changes: dict[str, Any] = {}
    if model:
        changes["model"] = ModelConfig.from_dict(model)
    run = spec.replace(
        device=device, precision=precision, world_size=world, batch_size=micro, **changes
    )
    return None if run.to_dict() == spec.to_dict() else run


def _estimates(spec: StepSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    return estimate(spec).to_dict(), trace_step(spec).to_dict()


def _gib(b: float | int | None) -> str:
    return human_bytes(b)


def _ratio(a: float | int | None, b: float | int | None) -> str:
    return "—" if not a or not b else f"{a / b:.3f}"


def _category_table(
    analytical: dict[str, Any], traced: dict[str, Any], measured: int | None, source: str | None
) -> list[str]:
    lines = [
        "| component | analytical | traced | measured |",
        "|---|---:|---:|---:|",
    ]
    for cat in CATEGORIES:
        a = analytical["by_category"].get(cat, 0)
        t = traced["by_category"].get(cat, 0)
        if a or t:
            lines.append(f"| {cat.replace('_', ' ')} | {_gib(a)} | {_gib(t)} | — |")
    lines.append(
        f"| **peak** | **{_gib(analytical['peak_bytes'])}** | **{_gib(traced['peak_bytes'])}** "
        f"| **{_gib(measured)}**{f' ({source})' if measured is not None else ''} |"
    )
    return lines


def _op_table(analytical: dict[str, Any], traced: dict[str, Any]) -> list[str]:
    lines = [
        "| op (all blocks) | kept for backward, analytical | traced | traced/analytical |",
        "|---|---:|---:|---:|",
    ]
    for name, row in analytical["by_op"].items():
        t = traced["by_op"].get(name, {}).get("kept")
        if name in ("embeddings", "heads"):
            continue
        lines.append(f"| {name} | {_gib(row['kept'])} | {_gib(t)} | {_ratio(t, row['kept'])} |")
    return lines


def _component_table(analytical: dict[str, Any], top: int = 12) -> list[str]:
    comps = sorted(analytical["components"].items(), key=lambda kv: -kv[1])[:top]
    lines = ["| tensor kind (analytical, all blocks) | bytes |", "|---|---:|"]
    lines += [f"| {k} | {_gib(v)} |" for k, v in comps]
    return lines


def plot_breakdown(
    bars: dict[str, dict[str, int]], measured: dict[str, int], path: str | os.PathLike, title: str
) -> None:
    """Stacked bars of the categories per estimate (GiB or MiB); measured peaks as single bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(bars) + list(measured)
    top = max([sum(v.values()) for v in bars.values()] + list(measured.values()) + [1])
    unit, size = ("GiB", GIB) if top >= GIB else ("MiB", 2**20)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(labels) + 2), 4.2))
    colors = plt.get_cmap("tab10")
    for i, label in enumerate(bars):
        bottom = 0.0
        for j, cat in enumerate(CATEGORIES):
            v = bars[label].get(cat, 0) / size
            if v <= 0:
                continue
            ax.bar(
                i,
                v,
                bottom=bottom,
                color=colors(j),
                label=cat.replace("_", " ") if i == 0 else None,
            )
            bottom += v
    for k, label in enumerate(measured):
        ax.bar(
            len(bars) + k,
            measured[label] / size,
            color="0.35",
            label="measured peak" if k == 0 else None,
        )
    ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right")
    ax.set_ylabel(f"{unit} per device")
    ax.set_title(title, fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, n in zip(handles, names, strict=True):
        seen.setdefault(n, h)
    ax.legend(seen.values(), seen.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def report(
    preflight_json: str | os.PathLike,
    performance_summary_json: str | os.PathLike | None,
    out_md: str | os.PathLike,
    out_png: str | os.PathLike,
    out_html: str | os.PathLike | None = None,
    out_json: str | os.PathLike | None = None,
    experiment: str = "",
) -> dict[str, Any]:
    """Write the memory report of one experiment.

    Args:
        preflight_json: ``results/{exp}/preflight.json`` (``PreflightResult.to_dict``).
        performance_summary_json: the training's ``performance_summary.json`` (may be missing:
            the measured column is then empty).
        out_md, out_png, out_html, out_json: outputs (HTML and JSON optional).
        experiment: name shown in the report and the summary table.

    Returns:
        the summary row (also written to ``out_json``): peaks and ratios.
    """
    pf = _read_json(preflight_json)
    if pf is None:
        raise InputError(f"{preflight_json}: pre-flight result not found")
    summary = _read_json(performance_summary_json)
    measured = summary.get("peak_memory_bytes") if summary else None
    source = summary.get("peak_memory_source") if summary else None
    comparable = measured is not None and source in COMPARABLE_SOURCES

    target_spec = _spec_from_dict(pf["spec"])
    target_a, target_t = pf["analytical"], pf["traced"]
    if (
        pf.get("adjusted")
        or not target_a
        or target_t.get("spec", {}).get("batch_size") != target_spec.batch_size
    ):
        target_a, target_t = _estimates(target_spec)
    run = run_spec(pf, summary)
    run_a, run_t = _estimates(run) if run is not None else (target_a, target_t)

    row = {
        "experiment": experiment,
        "device": (run or target_spec).device,
        "precision": (run or target_spec).precision,
        "micro_batch_size": (run or target_spec).batch_size,
        "n_gpus": pf["n_gpus"],
        "gpu_mem_gib": pf["gpu_mem_gib"],
        "fits": pf["fits"],
        "workspace_allowance_bytes": pf.get("workspace_bytes", 0),
        "target_analytical_peak_bytes": target_a["peak_bytes"],
        "target_traced_peak_bytes": target_t["peak_bytes"],
        "analytical_peak_bytes": run_a["peak_bytes"],
        "traced_peak_bytes": run_t["peak_bytes"],
        "measured_peak_bytes": measured,
        "measured_source": source,
        "measured_over_traced": (measured / run_t["peak_bytes"]) if comparable else None,
        "traced_over_analytical": run_t["peak_bytes"] / run_a["peak_bytes"],
        "dominant": pf["dominant"]["name"],
        "host_analytical_bytes": run_a.get("host_bytes", 0),
        "host_traced_bytes": run_t.get("host_peak_bytes", 0),
    }

    title = f"Memory report{': ' + experiment if experiment else ''}"
    md = [f"# {title}", ""]
    workspace = pf.get("workspace_bytes", 0)
    md += [
        f"Pre-flight target: {pf['n_gpus']} x GPU of {pf['gpu_mem_gib']:g} GiB, safety margin "
        f"{pf['safety_margin']:g} -> {_gib(pf['budget_bytes'])} usable per GPU. "
        f"Step: {target_spec.label()}.",
        "",
        f"Workspace allowance: "
        f"{'none (CPU target)' if target_spec.device == 'cpu' else _gib(workspace)} "
        "(`memory.workspace_mib`: cuBLAS/cuDNN workspaces the trace does not see). The verdict "
        "compares the traced peak plus the allowance with the usable memory; the estimates "
        "below leave it out.",
        "",
        f"**Verdict**: {verdict(pf)}",
        "",
        *_host_lines(target_a, target_t, pf),
        "## Pre-flight step (target GPU)",
        "",
        *_category_table(
            target_a, target_t, measured if run is None else None, source if run is None else None
        ),
        "",
        f"traced/analytical = {_ratio(target_t['peak_bytes'], target_a['peak_bytes'])}; "
        f"peak in {target_t['phase']} (analytical: {target_a.get('peak_at', '')}).",
        "",
    ]
    if run is not None:
        md += [
            "## The step as training ran it",
            "",
            f"Step: {run.label()} ({run.device}, {run.world_size} process(es)).",
            "",
            *_category_table(run_a, run_t, measured, source),
            "",
        ]
    if measured is None:
        md += ["No `performance_summary.json` yet: the measured column is empty.", ""]
    elif not comparable:
        md += [
            f"Measured source `{source}` (process RSS) counts more than tensors: not compared.",
            "",
        ]
    md += [
        f"Ratios: measured/traced = {_ratio(measured if comparable else None, run_t['peak_bytes'])}, "
        f"traced/analytical = {_ratio(run_t['peak_bytes'], run_a['peak_bytes'])}.",
        "",
        "## Kept for backward, per op",
        "",
        *_op_table(run_a, run_t),
        "",
        "## Largest tensor kinds (analytical ledger)",
        "",
        *_component_table(run_a),
        "",
        f"![breakdown]({Path(out_png).name})",
        "",
    ]
    bars = {
        "analytical (target)": target_a["by_category"],
        "traced (target)": target_t["by_category"],
    }
    meas: dict[str, int] = {}
    if run is not None:
        bars["analytical (run)"] = run_a["by_category"]
        bars["traced (run)"] = run_t["by_category"]
    if comparable:
        meas[f"measured ({source})"] = int(measured)
    plot_breakdown(bars, meas, out_png, title)
    text = "\n".join(md)
    write_text_atomic(out_md, text)
    if out_html is not None:
        write_text_atomic(out_html, _markdown_to_html(text, title))
    if out_json is not None:
        write_text_atomic(out_json, json.dumps(row, indent=2) + "\n")
    return row


def _host_lines(
    analytical: dict[str, Any], traced: dict[str, Any], pf: dict[str, Any]
) -> list[str]:
    """The host memory of offloaded checkpoints (nothing without offloading)."""
    a, t = analytical.get("host_bytes", 0), traced.get("host_peak_bytes", 0)
    if not a and not t:
        return []
    n = pf["n_gpus"]
    return [
        f"Host memory (pinned checkpoint inputs, `model.offload_checkpoints`): analytical "
        f"{_gib(a)}, traced {_gib(t)} per process; {n} process(es) per node: {_gib(n * t)} vs "
        f"{_gib(pf.get('host_budget_bytes'))} usable (`memory.host_mem_gib` "
        f"{pf.get('host_mem_gib', 0):g} GiB). Not part of the GPU peaks below.",
        "",
    ]


def verdict(pf: dict[str, Any]) -> str:
    """The one-line verdict of a serialised pre-flight result."""
    from evoformer.memory.preflight import PreflightResult

    fields = {k: v for k, v in pf.items() if k in PreflightResult.__dataclass_fields__}
    return PreflightResult(**fields).message()


def _markdown_to_html(text: str, title: str) -> str:
    """Minimal Markdown (headings, tables, images, paragraphs) to a standalone HTML page."""
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}</style></head><body>",
    ]
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>")
            for r in body:
                out.append("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
            out.append("</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("**", "") for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                table.append([html.escape(c) for c in cells])
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1 : line.rindex(")")]
            out.append(f"<img src='{html.escape(src)}' alt='breakdown'>")
        elif line.strip():
            out.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    flush()
    out.append("</body></html>")
    return "\n".join(out)


def memory_table(rows: list[dict[str, Any]], out_tsv: str | os.PathLike) -> pd.DataFrame:
    """``results/tables/memory.tsv``: one row per experiment (the dicts :func:`report` returns),
    peaks in GiB."""
    df = pd.DataFrame(rows)
    for col in list(df.columns):
        if col.endswith("_bytes"):
            df[col.replace("_bytes", "_gib")] = df[col].map(
                lambda b: None if b is None or pd.isna(b) else b / GIB
            )
            df = df.drop(columns=col)
    with atomic_path(out_tsv) as tmp:
        df.to_csv(tmp, sep="\t", index=False, float_format="%.4g")
    return df


def memory_table_from_json(
    paths: list[str | os.PathLike], out_tsv: str | os.PathLike
) -> pd.DataFrame:
    """:func:`memory_table` from the per-experiment report JSONs."""
    rows = []
    for p in paths:
        d = _read_json(p)
        if d is None:
            raise InputError(f"{p}: memory report JSON not found")
        rows.append(d)
    return memory_table(rows, out_tsv)
