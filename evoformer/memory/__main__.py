"""``python -m evoformer.memory``: does a configuration fit on N x GPU of M GiB? No GPU needed.

Examples::

    python -m evoformer.memory --journal --gpus 2 --gpu-mem-gib 80            # our OPM: fits
    python -m evoformer.memory --journal --opm naive --gpu-mem-gib 80 --json  # the journal's OOM
    python -m evoformer.memory --af2 --precision bf16 --ckpt 1 --gpu-mem-gib 80
    python -m evoformer.memory --config config.yaml --gpus 4 --gpu-mem-gib 80  # every grid point
    python -m evoformer.memory --config configs/norman_a100.yaml --gpus 2 --L 1105  # perturbation
    python -m evoformer.memory --journal-table                                # the journal's table
    python -m evoformer.memory --L 2000 --B 16 --precision bf16 --ckpt 1 --chunk 64 \
        --offload --checkpoint-ops --gpus 1 --gpu-mem-gib 80 --host-mem-gib 256  # r = 2001

Exit status: 0 every configuration fits, 1 one does not, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from evoformer.errors import InputError
from evoformer.memory.analytical import GIB, estimate, journal_table_markdown
from evoformer.memory.preflight import (
    HOST_MEM_GIB,
    WORKSPACE_MIB,
    PreflightResult,
    preflight,
    workspace_bytes,
)
from evoformer.memory.report import CATEGORIES
from evoformer.memory.spec import JOURNAL, data_shape, spec_from_config

#: ``--journal``: the journal's configuration (:data:`evoformer.memory.spec.JOURNAL`) with the
#: journal's own settings, fp32 without activation checkpointing (``--precision bf16 --ckpt 1``
#: gives ``configs/journal_a100.yaml``'s step).
JOURNAL_AS_RUN = {
    "model": {**JOURNAL["model"], "blocks_per_ckpt": None},
    "train": {**JOURNAL["train"], "precision": "fp32"},
    "data": data_shape(**JOURNAL["data"]),
}
#: AlphaFold 2's Evoformer (48 blocks, r=256, c_m=256, c_z=128, c_opm=32, 8 MSA heads of 32,
#: triangle attention 4 heads of 32, triangle multiplication 128), batch 1 per device, S=1.
AF2 = {
    "model": {
        "preset": "evoformer",
        "c_m": 256,
        "c_z": 128,
        "c_opm": 32,
        "n_heads_msa": 8,
        "c_hidden_msa": 32,
        "n_heads_pair": 4,
        "c_hidden_pair": 32,
        "c_hidden_tri_mul": 128,
        "n_blocks": 48,
    },
    "train": {"micro_batch_size": 1, "precision": "fp32"},
    "data": {"seq_len": 255, "n_genes": 1000, "n_bins": 51},
}

_MODEL_FLAGS = {
    "preset": "preset",
    "c_m": "c_m",
    "c_z": "c_z",
    "c_opm": "c_opm",
    "heads": "n_heads_msa",
    "c_hidden": "c_hidden_msa",
    "heads_pair": "n_heads_pair",
    "c_hidden_pair": "c_hidden_pair",
    "c_hidden_tri_mul": "c_hidden_tri_mul",
    "blocks": "n_blocks",
    "S": "n_cells_per_msa",
    "ckpt": "blocks_per_ckpt",
    "chunk": "chunk_size",
    "ln_order": "ln_order",
}


#: Memory switches of the model (on/off flags).
_SWITCHES = {
    "offload": "offload_checkpoints",
    "checkpoint-ops": "checkpoint_ops",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evoformer.memory",
        description="Predict the peak GPU memory of a training step (analytical and traced under "
        "FakeTensorMode) and say whether it fits.",
    )
    src = p.add_argument_group("what to estimate")
    src.add_argument(
        "--config", type=Path, help="config.yaml: estimate its experiments (grid points)"
    )
    src.add_argument(
        "--experiment", default="all", help="grid point index (0-based) or 'all' (with --config)"
    )
    src.add_argument(
        "--binned-meta",
        type=Path,
        help="binned meta.json: the gene count (n_hvg, plus the perturbed genes of a "
        "Perturb-seq dataset) and max_len (when zero genes are dropped)",
    )
    src.add_argument(
        "--journal",
        action="store_true",
        help="the journal's configuration as the journal ran it (fp32, no checkpointing)",
    )
    src.add_argument("--af2", action="store_true", help="AlphaFold 2's Evoformer configuration")
    src.add_argument(
        "--journal-table", action="store_true", help="print the journal's table, recomputed"
    )
    sz = p.add_argument_group("explicit sizes (override a preset)")
    sz.add_argument("--preset", choices=("bioformer", "evoformer"))
    sz.add_argument("--B", type=int, help="micro-batch per GPU")
    sz.add_argument("--L", type=int, help="genes per cell (r = L + 1)")
    sz.add_argument("--S", type=int, help="cells per MSA")
    for flag in (
        "c_m",
        "c_z",
        "c_opm",
        "heads",
        "c_hidden",
        "heads_pair",
        "c_hidden_pair",
        "c_hidden_tri_mul",
        "blocks",
    ):
        sz.add_argument("--" + flag.replace("_", "-"), dest=flag, type=int)
    sz.add_argument("--ckpt", type=int, help="blocks per activation checkpoint (0 = off)")
    sz.add_argument("--chunk", type=int, help="chunk size (0 = off)")
    sz.add_argument("--ln-order", dest="ln_order", choices=("pre", "post"))
    for flag, key in _SWITCHES.items():
        sz.add_argument(
            "--" + flag, dest=key, action="store_true", default=None, help=f"model.{key}: on"
        )
    sz.add_argument("--n-genes", type=int)
    sz.add_argument("--n-bins", type=int)
    sz.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    sz.add_argument("--opm", choices=("ours", "naive"), default="ours")
    tgt = p.add_argument_group("target")
    tgt.add_argument("--gpus", type=int, default=None, help="GPUs (DDP processes); default 1")
    tgt.add_argument(
        "--gpu-mem-gib",
        type=float,
        default=None,
        help="memory per GPU (default: config memory.gpu_mem_gib or 80)",
    )
    tgt.add_argument(
        "--safety-margin", type=float, default=None, help="fraction kept free (default 0.1)"
    )
    tgt.add_argument(
        "--workspace-mib",
        type=float,
        default=None,
        help="workspace allowance added to the GPU peak: cuBLAS/cuDNN workspaces the trace "
        f"does not see (default: config memory.workspace_mib or {WORKSPACE_MIB})",
    )
    tgt.add_argument(
        "--host-mem-gib",
        type=float,
        default=None,
        help="host memory of the node (all --gpus processes), checked when checkpoints are "
        f"offloaded (default: config memory.host_mem_gib or {HOST_MEM_GIB:g})",
    )
    tgt.add_argument(
        "--auto-micro-batch", action="store_true", help="pick the largest micro-batch that fits"
    )
    tgt.add_argument(
        "--method",
        choices=("traced", "analytical"),
        default="traced",
        help="traced (default; also prints analytical) or analytical only (instant)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _explicit(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    base = (
        JOURNAL_AS_RUN
        if args.journal
        else AF2
        if args.af2
        else {"model": {}, "train": {"micro_batch_size": 1, "precision": "auto"}, "data": {}}
    )
    model, train, data = dict(base["model"]), dict(base["train"]), dict(base["data"])
    for flag, key in _MODEL_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            model[key] = None if key in ("blocks_per_ckpt", "chunk_size") and value == 0 else value
    for key in _SWITCHES.values():
        if getattr(args, key, None):
            model[key] = True
    if args.B is not None:
        train["micro_batch_size"] = args.B
    if args.precision is not None:
        train["precision"] = args.precision
    if args.L is not None:
        data["seq_len"] = args.L
    if args.n_genes is not None:
        data["n_genes"] = args.n_genes
    if args.n_bins is not None:
        data["n_bins"] = args.n_bins
    data.setdefault("seq_len", 63)
    data.setdefault("n_genes", data["seq_len"])
    data.setdefault("n_bins", 51)
    train.setdefault("global_batch_size", train["micro_batch_size"] * (args.gpus or 1))
    return model, train, data


def _from_config(
    args: argparse.Namespace,
) -> tuple[list[tuple[str, dict, dict, dict]], dict[str, Any]]:
    from evoformer.experiments import grid, spec

    if not args.config.is_file():
        raise InputError(f"{args.config}: config file not found")
    config = yaml.safe_load(args.config.read_text()) or {}
    if "experiment" not in config and (config.get("perturbation") or {}).get("model"):
        return _from_perturbation_config(args, config)
    if "experiment" not in config:
        raise InputError(f"{args.config}: no 'experiment' section (nor perturbation.model)")
    points = grid(config)
    idx = range(len(points)) if args.experiment == "all" else [int(args.experiment)]
    include_zero = bool((config.get("binning") or {}).get("include_zero_genes", True))
    max_len = n_genes = None
    if args.binned_meta is not None:
        meta = json.loads(args.binned_meta.read_text())
        max_len, n_genes = meta.get("max_len"), meta.get("n_genes")
    out = []
    for i in idx:
        if not 0 <= i < len(points):
            raise InputError(f"--experiment {i}: the grid has {len(points)} point(s)")
        point = {
            k: (v.item() if hasattr(v, "item") else v) for k, v in points.iloc[i].to_dict().items()
        }
        s = spec(config, point, "holdout")
        shape = data_shape(
            int(n_genes if n_genes is not None else point["n_hvg"]),
            int(point["n_bins"]),
            include_zero,
            max_len,
            prior=bool(s.get("prior")),
            prior_mode=(s.get("prior") or {}).get("mode", "init"),
        )
        name = "/".join(f"{k}~{v}" for k, v in point.items())
        out.append((name, s["model"], s["train"], shape))
    return out, config.get("memory") or {}


def _from_perturbation_config(
    args: argparse.Namespace, config: dict[str, Any]
) -> tuple[list[tuple[str, dict, dict, dict]], dict[str, Any]]:
    """The perturbation models' grid points (the perturbation step, :mod:`evoformer.tasks`).
    Tokens: ``--binned-meta``'s, else ``--L``, else ``perturbation.n_hvg`` (a lower bound: the
    screen's perturbed genes are added to the HVGs)."""
    from evoformer.perturb.models import model_grid, point_id, run_spec

    p = config["perturbation"]
    seq_len = args.L or int(p.get("n_hvg", 2000))
    if args.binned_meta is not None:
        seq_len = int(json.loads(args.binned_meta.read_text())["max_len"])
    out = []
    for point in model_grid(config):
        s = run_spec(config, point)
        shape = data_shape(
            seq_len,
            int(p.get("n_bins", 51)),
            True,
            None,
            prior=bool(s.get("prior")),
            prior_mode=(s.get("prior") or {}).get("mode", "init"),
        )
        shape["task"] = "perturbation"
        out.append((f"perturbation {point_id(point)}", s["model"], s["train"], shape))
    return out, config.get("memory") or {}


def _table(name: str, res: dict[str, Any]) -> str:
    a, t = res["analytical"], res["traced"]
    lines = [f"== {name}", f"   {'component':24s} {'analytical GiB':>15s} {'traced GiB':>12s}"]
    for cat in CATEGORIES:
        av, tv = a["by_category"].get(cat, 0), (t or {}).get("by_category", {}).get(cat, 0)
        if av or tv:
            lines.append(f"   {cat:24s} {av / GIB:15.2f} {(tv / GIB if t else float('nan')):12.2f}")
    tp = t["peak_bytes"] / GIB if t else float("nan")
    lines.append(f"   {'PEAK per GPU':24s} {a['peak_bytes'] / GIB:15.2f} {tp:12.2f}")
    lines.append(
        f"   usable: {res['budget_bytes'] / GIB:.2f} GiB; workspace allowance (added to the peak) "
        f"{res['workspace_bytes'] / GIB:.2f} GiB; analytical peak at {a.get('peak_at', '')}"
    )
    host_a, host_t = a.get("host_bytes", 0), (t or {}).get("host_peak_bytes", 0)
    if host_a or host_t:
        tv = host_t / GIB if t else float("nan")
        lines.append(f"   {'host (pinned) per GPU':24s} {host_a / GIB:15.2f} {tv:12.2f}")
    lines.append("   " + res["message"])
    return "\n".join(lines)


def _analytical_only(
    model: dict,
    train: dict,
    shape: dict,
    gpus: int,
    mem: float,
    margin: float,
    opm: str,
    workspace_mib: float,
    host_mem_gib: float,
) -> dict[str, Any]:
    spec = spec_from_config(model, train, shape, n_gpus=gpus, device="cuda", opm=opm)
    a = estimate(spec)
    budget = int(mem * GIB * (1 - margin))
    workspace = workspace_bytes(workspace_mib, "cuda")
    host_budget = int(host_mem_gib * GIB * (1 - margin))
    host_fits = gpus * a.host_bytes <= host_budget
    fits = a.peak_bytes + workspace <= budget and host_fits
    verdict = "fits" if fits else "does not fit"
    host = (
        f"; host {gpus} x {a.host_bytes / GIB:.1f} GiB vs {host_budget / GIB:.1f} GiB usable"
        if a.host_bytes
        else ""
    )
    return {
        "fits": fits,
        "analytical": a.to_dict(),
        "traced": None,
        "budget_bytes": budget,
        "workspace_bytes": workspace,
        "message": f"{verdict} (analytical): {a.peak_bytes / GIB:.1f} GiB per GPU + workspace "
        f"allowance {workspace / GIB:.2f} GiB vs {budget / GIB:.1f} GiB usable{host}",
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.journal_table:
            print(journal_table_markdown())
            if not (args.config or args.journal or args.af2 or args.preset):
                return 0
        mem_cfg: dict[str, Any] = {}
        if args.config is not None:
            runs, mem_cfg = _from_config(args)
        else:
            model, train, shape = _explicit(args)
            label = "journal" if args.journal else "af2" if args.af2 else "explicit"
            runs = [(label, model, train, shape)]
        gpus = args.gpus or 1
        mem = (
            args.gpu_mem_gib
            if args.gpu_mem_gib is not None
            else float(mem_cfg.get("gpu_mem_gib", 80))
        )
        margin = (
            args.safety_margin
            if args.safety_margin is not None
            else float(mem_cfg.get("safety_margin", 0.1))
        )
        workspace = (
            args.workspace_mib
            if args.workspace_mib is not None
            else float(mem_cfg.get("workspace_mib", WORKSPACE_MIB))
        )
        host_mem = (
            args.host_mem_gib
            if args.host_mem_gib is not None
            else float(mem_cfg.get("host_mem_gib", HOST_MEM_GIB))
        )
        auto = args.auto_micro_batch or bool(mem_cfg.get("auto_micro_batch", False))
        results = []
        for name, model, train, shape in runs:
            if args.method == "analytical":
                res = _analytical_only(
                    model, train, shape, gpus, mem, margin, args.opm, workspace, host_mem
                )
            else:
                pf: PreflightResult = preflight(
                    model,
                    train,
                    shape,
                    mem,
                    gpus,
                    margin,
                    auto,
                    opm=args.opm,
                    raise_on_oom=False,
                    workspace_mib=workspace,
                    host_mem_gib=host_mem,
                )
                res = {**pf.to_dict(), "message": pf.message()}
            res["name"] = name
            results.append(res)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2, default=str))
    else:
        for res in results:
            print(_table(res["name"], res))
    return 0 if all(r["fits"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
