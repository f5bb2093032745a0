"""Prior gene-gene network (e.g. an OmniPath export) as a dense ``[G, G]`` matrix."""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import torch

from evoformer.errors import InputError

log = logging.getLogger(__name__)


def read_edges(path: str | os.PathLike, what: str = "network") -> pd.DataFrame:
    """A TSV of directed gene-gene edges: ``source``, ``target`` (gene names), optional
    ``weight`` (float, default 1) and ``sign`` (+1 / -1, default +1); other columns ignored.

    Returns:
        DataFrame ``[E]`` with ``source``, ``target`` (str) and ``value`` = weight x sign.

    Raises:
        InputError: one line naming the file (and ``what`` it is) when it is missing or
            unreadable, lacks a column, or has a bad weight or sign.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: {what} file not found")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read {what} TSV ({type(exc).__name__})") from None
    for col in ("source", "target"):
        if col not in df.columns:
            raise InputError(f"{path}: {what} has no '{col}' column (columns: {list(df.columns)})")
    value = np.ones(len(df), dtype=np.float64)
    if "weight" in df.columns:
        w = pd.to_numeric(df["weight"], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(w)
        if bad.any():
            row = int(np.argmax(bad))
            raise InputError(
                f"{path}: column 'weight' row {row + 2} is not a finite number: "
                f"{df['weight'].iloc[row]!r}"
            )
        value *= w
    if "sign" in df.columns:
        sign = pd.to_numeric(df["sign"], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isin(sign, (1.0, -1.0))
        if bad.any():
            row = int(np.argmax(bad))
            raise InputError(
                f"{path}: column 'sign' row {row + 2} must be +1 or -1, got {df['sign'].iloc[row]!r}"
            )
        value *= sign
    return pd.DataFrame({"source": df["source"], "target": df["target"], "value": value})


def load_prior_network(
    path: str | os.PathLike, gene_names: list[str], min_gene_share: float = 0.0
) -> torch.Tensor:
    """Read a TSV of directed gene-gene edges into ``prior [G, G]`` (``prior[source, target]``).

    The file has a header with columns ``source`` and ``target`` (gene names as in
    ``gene_names``) and optionally ``weight`` (float, default 1) and/or ``sign`` (+1 / -1,
    default +1); an edge's value is ``weight * sign``, duplicate edges add up. Other columns are
    ignored. Genes not in ``gene_names`` are skipped, with a warning naming how many.

    The gene overlap is ``|network genes & gene_names| / min(|network genes|, |gene_names|)``
    (1 when the smaller set lies inside the larger): a network of other gene identifiers (Ensembl
    ids against symbols, another species) has overlap ~0 and would silently become an all-zero
    matrix, so an overlap below ``min_gene_share``, or no edge left at all, is refused.

    Args:
        path: TSV file.
        gene_names: ``G`` gene names in model order (genes.tsv).
        min_gene_share: the smallest gene overlap accepted (config
            ``experiment.prior.min_gene_share``).

    Returns:
        float32 ``[G, G]``; 0 where there is no edge.

    Raises:
        InputError: the file is missing/unreadable, a required column is missing, or a
            weight/sign value is invalid.
    """
    df = read_edges(path, "prior network")
    path, n = os.fspath(path), len(df)
    if df.empty:
        raise InputError(f"{path}: prior network has no edges")
    value = df["value"].to_numpy()

    index = {g: i for i, g in enumerate(gene_names)}
    src = df["source"].map(index)
    tgt = df["target"].map(index)
    keep = (src.notna() & tgt.notna()).to_numpy()
    net_genes = set(df["source"]) | set(df["target"])
    shared = len(net_genes & set(index))
    overlap = shared / max(1, min(len(net_genes), len(index)))
    if overlap < min_gene_share or not keep.any():
        raise InputError(
            f"{path}: only {shared} of the network's {len(net_genes)} genes are among the "
            f"{len(index)} model genes (overlap {overlap:.2f} < experiment.prior.min_gene_share "
            f"{min_gene_share}; {int(keep.sum())} edges left): are the gene identifiers the same?"
        )
    if shared < len(net_genes):
        log.warning(
            "%s: %d of the network's %d genes are not model genes; %d of %d edges kept",
            path,
            len(net_genes) - shared,
            len(net_genes),
            int(keep.sum()),
            n,
        )
    prior = np.zeros((len(gene_names), len(gene_names)), dtype=np.float64)
    np.add.at(
        prior, (src[keep].astype(int).to_numpy(), tgt[keep].astype(int).to_numpy()), value[keep]
    )
    return torch.from_numpy(prior.astype(np.float32))
