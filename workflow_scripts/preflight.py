"""Rule preflight: predict the peak GPU memory of an experiment's training step before it is
queued; stop (exit 1, one line in the log) when it does not fit (evoformer.memory.preflight).

input:  meta (optional) - the binned data's meta.json (exact max_len without zero genes)
output: json - results/{exp}/preflight.json
params: model, train (the experiment's dicts), n_hvg, n_bins, include_zero_genes, n_labels,
        prior (bool), gpu_mem_gib, safety_margin, auto_micro_batch, n_gpus, device (optional:
        "cuda", or "cpu" for a CPU-only run with n_gpus = processes and gpu_mem_gib = memory
        per process)
"""

import sys
from pathlib import Path

# The repository's evoformer package, also inside a --sdm conda environment.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from evoformer.data.step import run_step  # noqa: E402
from evoformer.memory.preflight import write_preflight  # noqa: E402
from evoformer.memory.spec import resolve_data_shape  # noqa: E402

p = snakemake.params
run_step(
    snakemake.log[0],
    write_preflight,
    out_json=snakemake.output.json,
    model_cfg=dict(p.model),
    train_cfg=dict(p.train),
    data_shape=resolve_data_shape(
        int(p.n_hvg),
        int(p.n_bins),
        bool(p.include_zero_genes),
        snakemake.input.get("meta"),
        int(p.get("n_labels", 0)),
        bool(p.get("prior", False)),
    ),
    gpu_mem_gib=float(p.gpu_mem_gib),
    n_gpus=int(p.n_gpus),
    safety_margin=float(p.safety_margin),
    auto_micro_batch=bool(p.auto_micro_batch),
    device=str(p.get("device", "cuda")),
)
