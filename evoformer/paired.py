"""Paired comparison of a finished run's grid points on the same masked test values.

``python -m evoformer.paired RUN_DIR --dataset D --point P --reference NAME [--prior NAME=TSV]``
compares the holdout models of the grid points ``<P>~<name>`` under
``RUN_DIR/results/<D>/exp/`` (``P`` is the grid-point prefix before the swept value, e.g.
``n_hvg~64_n_bins~21_prior``) with :func:`evoformer.evaluate.paired_model_differences`, and
prints each one's paired difference with the reference (``name - reference``, 95% bootstrap
over test cells) per expression metric. ``--prior NAME=TSV`` gives a point's prior network (a
path under ``RUN_DIR``). RESULTS.md's prior experiments use it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from evoformer.evaluate import paired_model_differences
from evoformer.metrics import EXPR_METRICS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--point", required=True, help="grid-point prefix before the value")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--prior", action="append", default=[], metavar="NAME=TSV")
    parser.add_argument("--mask-ratio", type=float, default=0.15)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    exp = args.run / "results" / args.dataset / "exp"
    priors = dict(p.split("=", 1) for p in args.prior)
    models = {}
    for folder in sorted(exp.glob(f"{args.point}~*")):
        name = folder.name[len(args.point) + 1 :]
        prior = args.run / priors[name] if name in priors else None
        models[name] = (folder / "fold~holdout/train/model.pt", prior)
    n_hvg, n_bins = (re.search(rf"{k}~(\d+)", args.point).group(1) for k in ("n_hvg", "n_bins"))
    data = args.run / "results" / args.dataset
    res = paired_model_differences(
        models,
        data / f"hvg{n_hvg}/bins{n_bins}",
        data / "split.tsv",
        args.reference,
        {"mask_ratio": args.mask_ratio, "n_bootstrap": args.n_bootstrap},
    )
    print(f"{'model':<12} " + " ".join(f"{m:>30}" for m in EXPR_METRICS))
    for name in models:
        if name == args.reference:
            continue
        d = res[f"diff:{name}"]  # reference - name
        cells = [f"{-d[m]['value']:+.4f} [{-d[m]['hi']:+.4f}, {-d[m]['lo']:+.4f}]" for m in d]
        print(f"{name:<12} " + " ".join(f"{c:>30}" for c in cells))


if __name__ == "__main__":
    main()
