"""A prior gene-gene network: read as a dense ``[G, G]`` matrix, and how it enters the model.

``prior[s, t]`` is the signed weight of the edge ``s -> t`` (source gene row, target gene
column; ``weight * sign``, 0 = no edge). Inside a cell whose tokens are the genes ``g_1..g_L``
(plus CLS at position 0) the model reads ``p_ij = prior[g_i, g_j]`` (``[B, r, r]``, 0 on the CLS
row and column). ``PRIOR_MODES`` are the two ways it enters, chosen by ``experiment.prior.mode``:

* ``init`` (the default; what every earlier prior run did): the pair representation starts as
  ``z_ij = a_i + b_j + W [p_ij, 1(p_ij != 0)] + c`` (``W``: ``[c_z, 2]``, ``c``: ``[c_z]``, the
  learned :attr:`BioFormer.prior_proj`). Connected pairs differ from unconnected ones by
  ``W [p_ij, 1]``; flipping an edge's sign changes ``z_ij`` by ``2 |p_ij| W[:, 0]``. It is
  *directional*: an edge ``s -> t`` changes ``z`` at (row ``s``, column ``t``) only, which the
  row attention reads as the bias of query ``s`` attending to key ``t``; without the triangle
  ops (preset ``bioformer``) nothing moves it to ``(t, s)``, so a masked target gets no direct
  pull towards its regulators. The prior then evolves with ``z`` (outer product mean, pair
  stack).
* ``bias``: ``z`` is left alone; every block's MSA row attention adds, for head ``h``,
  ``beta_h(i, j) = u_h p_ij + v_h 1(p_ij != 0) + x_h p_ji + y_h 1(p_ji != 0)`` to its logits
  (:class:`PriorAttentionBias`, 4 weights per head shared by all blocks, no constant term).
  Unconnected pairs, CLS and padding get exactly 0; both directions are seen (a target can
  attend to its regulators, ``x_h``, ``y_h``); the bias is linear in the signed weight, so a
  sign flip flips the ``u_h``/``x_h`` term and a weight scales it. The weights start at 0: at
  initialisation the model equals the model without a prior, and training decides per head how
  much the network matters. The bias is a fixed function of the network (it does not evolve
  with ``z``).
* ``both``: ``init`` and ``bias`` together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from evoformer.errors import InputError

log = logging.getLogger(__name__)

#: How a prior network enters BioFormer (module docstring); ``init`` is the default.
PRIOR_MODES = ("init", "bias", "both")


def leading_comment_lines(path: str | os.PathLike) -> int:
    """Lines starting with ``#`` at the top of a text file (a provenance header), 0 if none."""
    n = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.startswith("#"):
                break
            n += 1
    return n


def read_edges(path: str | os.PathLike, what: str = "network") -> pd.DataFrame:
    """A TSV of directed gene-gene edges: ``source``, ``target`` (gene names), optional
    ``weight`` (float, default 1) and ``sign`` (+1 / -1, default +1); other columns ignored.
    Lines starting with ``#`` before the header (a provenance header) are skipped.

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
        df = pd.read_csv(
            path, sep="\t", dtype=str, keep_default_na=False, skiprows=leading_comment_lines(path)
        )
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
    covered = int(((prior != 0).any(axis=0) | (prior != 0).any(axis=1)).sum())
    log.info(
        "%s: %d of %d edges among the %d model genes; %d of the model genes have an edge "
        "(%d positive, %d negative entries)",
        path,
        int(keep.sum()),
        n,
        len(gene_names),
        covered,
        int((prior > 0).sum()),
        int((prior < 0).sum()),
    )
    return torch.from_numpy(prior.astype(np.float32))


# ----------------------------------------------------------------------------- in the model
def check_prior_mode(mode: str, key: str = "experiment.prior.mode") -> str:
    """``mode`` if it is one of :data:`PRIOR_MODES`; else InputError naming ``key``."""
    if mode not in PRIOR_MODES:
        raise InputError(f"config key '{key}': got {mode!r}, expected one of {list(PRIOR_MODES)}")
    return mode


def prior_pairs(prior: torch.Tensor, gene_ids: torch.Tensor) -> torch.Tensor:
    """The network among one cell's tokens: ``p_ij = prior[g_i, g_j]``, CLS row/column 0.

    Args:
        prior: ``[G, G]`` float (``prior[source, target]``).
        gene_ids: ``[B, L]`` long, the tokens' genes (first cell of each group).

    Returns:
        ``[B, r, r]`` (``r = L + 1``) in the prior's dtype.
    """
    p = prior[gene_ids[:, :, None], gene_ids[:, None, :]]  # [B, L, L]
    return F.pad(p, (1, 0, 1, 0))


class PriorAttentionBias(nn.Module):
    """Per-head bias of the MSA row attention from the prior (mode ``bias``, module docstring).

    ``beta_h(i, j) = W_h . [p_ij, 1(p_ij != 0), p_ji, 1(p_ji != 0)]``: 4 weights per head, no
    constant, initialised to 0 (no effect until training moves them).
    """

    #: per pair: out-edge value, out-edge present, in-edge value, in-edge present
    N_FEATURES = 4

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_heads, self.N_FEATURES))

    @staticmethod
    def features(p: torch.Tensor) -> torch.Tensor:
        """``[B, r, r]`` pair values -> ``[B, r, r, 4]`` features (see the class docstring)."""
        pt = p.transpose(-1, -2)
        return torch.stack([p, (p != 0).to(p.dtype), pt, (pt != 0).to(p.dtype)], dim=-1)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """``p [B, r, r]`` (:func:`prior_pairs`) -> additive logits bias ``[B, 1, H, r, r]``
        (the 1 broadcasts over the ``S`` cells of a group)."""
        bias = F.linear(self.features(p), self.weight.to(p.dtype))  # [B, r, r, H]
        return bias.movedim(-1, -3).unsqueeze(-4)


def prior_mode_of_state(state: Mapping[str, torch.Tensor]) -> str | None:
    """The prior mode a saved BioFormer state dict was trained with (None: no prior), read from
    which prior parameters it holds (``prior_proj.*``: init, ``prior_bias.*``: bias)."""
    if "prior" not in state:
        return None
    init = any(k.startswith("prior_proj.") for k in state)
    bias = any(k.startswith("prior_bias.") for k in state)
    return "both" if init and bias else "bias" if bias else "init"
