"""Rule preflight: predict the peak GPU memory of an experiment's training step before any
training job is queued; stop (exit 1, one line in the log) when it does not fit
(evoformer.memory.preflight).

input:  meta  - the binned data's meta.json (exact sequence length without zero genes)
        cells - the binned data's cells.tsv (label classes, when train.label_head is on)
output: json  - results/{dataset}/exp/{grid point}/preflight.json
params: preflight - model, train (the experiment's dicts), n_hvg, n_bins,
        include_zero_genes, prior (bool), prior_mode (with a prior), task (perturbation
        models only), and the config's memory section: gpu_mem_gib, n_gpus, safety_margin,
        workspace_mib, auto_micro_batch and host_mem_gib (only when set)
"""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.step import run_step  # noqa: E402
from evoformer.memory.preflight import write_preflight  # noqa: E402
from evoformer.memory.spec import label_classes, resolve_data_shape  # noqa: E402


def main() -> None:
    p = dict(snakemake.params.preflight)
    label_head = bool(p["train"].get("label_head", False))
    shape = resolve_data_shape(
        int(p["n_hvg"]),
        int(p["n_bins"]),
        bool(p["include_zero_genes"]),
        snakemake.input.meta,
        label_classes(snakemake.input.cells) if label_head else 0,
        bool(p["prior"]),
        str(p.get("prior_mode", "init")),
    )
    if "task" in p:  # the perturbation task's step (the masked-expression step without it)
        shape["task"] = str(p["task"])
    write_preflight(
        out_json=snakemake.output.json,
        model_cfg=dict(p["model"]),
        train_cfg=dict(p["train"]),
        data_shape=shape,
        gpu_mem_gib=float(p["gpu_mem_gib"]),
        n_gpus=int(p["n_gpus"]),
        safety_margin=float(p["safety_margin"]),
        auto_micro_batch=bool(p["auto_micro_batch"]),
        workspace_mib=float(p["workspace_mib"]),
        host_mem_gib=float(p["host_mem_gib"]) if "host_mem_gib" in p else None,
    )


run_step(snakemake.log[0], main)
