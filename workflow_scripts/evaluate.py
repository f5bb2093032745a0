"""Snakemake ``script:`` of the ``evaluate`` rule: evaluate one trained model on the test cells.

Expects (the rule's names)::

    input:  model="<exp>/train/model.pt",
            binned="results/{dataset}/hvg{n_hvg}/bins{n_bins}"   (the folder, or any file in it),
            split="results/{dataset}/split.tsv",
            hvg="results/{dataset}/hvg{n_hvg}/hvg.h5ad",
            prior=<prior TSV>                                     (optional)
            network=<true network TSV>                            (optional, planted data)
    output: metrics="<exp>/eval/eval_metrics.json",
            embeddings="<exp>/eval/embeddings.h5ad",
            umap="<exp>/eval/umap.png"
    params: fold=<k >= 0 | -1 | "holdout" | "final">,
            eval={...}         (optional: the config's evaluation section, evoformer.evaluate.EvalParams)
    log:    "logs/.../evaluate.log"

Errors from bad input end up as one line in the log (and the job fails).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repository root

from evoformer.data.step import run_step  # noqa: E402


def main() -> None:
    from evoformer.evaluate import evaluate

    inp, out, params = snakemake.input, snakemake.output, snakemake.params
    binned = Path(inp.binned)
    if binned.is_file():
        binned = binned.parent
    eval_params = dict(getattr(params, "eval", None) or {})
    fold = getattr(params, "fold", -1)
    if fold == "final":
        eval_params.update(fold=-1, final=True)
    else:
        eval_params["fold"] = -1 if fold in (None, "holdout") else int(fold)
    # an input function's list: str() of the one file (a Namedlist is no path)
    prior = str(inp.prior) if "prior" in inp.keys() and inp.prior else None
    network = inp.network if "network" in inp.keys() and inp.network else None
    evaluate(
        inp.model,
        binned,
        inp.split,
        inp.hvg,
        Path(out.metrics).parent,
        eval_params,
        prior=prior,
        outputs={"metrics": out.metrics, "embeddings": out.embeddings, "umap": out.umap},
        network=network,
    )


run_step(snakemake.log[0], main)
