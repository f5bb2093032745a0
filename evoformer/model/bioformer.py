"""BioFormer: the single-cell Evoformer (genes are tokens, expression bins are values).

Input per cell: ``L`` gene tokens (all HVGs, or the cell's non-zero genes padded) with their
expression bins. The model prepends a CLS token (``r = L + 1``) and builds

* the MSA ``m [B, S, r, c_m]``: LayerNorm(gene identity embedding + value embedding), CLS = a
  learned vector; ``S`` cells form one "MSA" (``S = 1`` by default: every cell is its own MSA);
* the pair representation ``z [B, r, r, c_z]``: outer sum of projections of the gene identity
  embeddings (AF2's ``z_ij = a_i + b_j``). ``z`` is indexed by the gene tokens of the first cell
  of each group (with ``S > 1`` the cells of a group should share their gene order, i.e.
  ``include_zero_genes: true``);
* optionally a prior gene-gene network ``prior [G, G]``, entering (``prior_mode``) through a
  learned projection added to the initial ``z`` (``init``), as a per-head bias of every row
  attention (``bias``), or both (see :mod:`evoformer.model.prior`);

runs the Evoformer stack, and predicts the masked bins from ``m`` (and a cell label from CLS).

With ``n_perturbation_types > 0`` (the perturbation task, :mod:`evoformer.tasks.perturbation`)
the model also reads ``perturbed [B, S, L]`` (0 = not perturbed, t = perturbation type t): a
learned embedding per type is added to the perturbed genes' tokens in ``m`` and, with a pair
representation, to the perturbed gene's row and column of ``z``. ``output="expression"``
replaces the bin head by an expression head: ``expression = baseline[gene] + head(m_gene)``
(log1p; ``baseline`` = the training controls' mean, the head's last layer starts at 0, so the
untrained model predicts no change). Genes are tokens: a perturbation of a gene never seen
perturbed in training needs no new parameter.
Preset ``none`` builds no ``z`` (and no prior): a plain transformer over the gene tokens.
Because the heads read only ``m``, the last block has no pair updates (they would be computed
and thrown away); the returned ``z`` is the pair representation that biased the last block.

Under autocast (bf16 on GPU) the residual streams ``m`` and ``z`` are kept in the autocast dtype,
which halves the memory of the pair representation and of the activation checkpoints.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.model.config import ModelConfig
from evoformer.model.evoformer import EvoformerStack
from evoformer.model.primitives import LayerNorm, Linear
from evoformer.model.prior import PRIOR_MODES, PriorAttentionBias, prior_pairs


class ContinuousValueEncoder(nn.Module):
    """scGPT / BioFormer continuous value encoder: ``LN(Linear(ReLU(Linear(bin))))``.

    The MASK token (value ``n_bins``) gets a learned embedding instead.
    """

    def __init__(self, c: int, n_bins: int) -> None:
        super().__init__()
        self.n_bins = n_bins
        self.linear_1 = Linear(1, c, init="relu")
        self.linear_2 = Linear(c, c)
        self.layer_norm = LayerNorm(c)
        self.mask_embedding = nn.Parameter(torch.zeros(c))
        nn.init.normal_(self.mask_embedding, std=0.02)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """``values [*] long in [0, n_bins]`` -> ``[*, c]``."""
        x = values.to(self.linear_1.weight.dtype).unsqueeze(-1)
        x = self.layer_norm(self.linear_2(torch.relu(self.linear_1(x))))
        is_mask = (values == self.n_bins).unsqueeze(-1)
        return torch.where(is_mask, self.mask_embedding.to(x.dtype), x)


class BioFormer(nn.Module):
    """Single-cell Evoformer with a masked-value head and an optional cell-label head.

    Args:
        cfg: model configuration.
        n_genes: ``G``, size of the gene vocabulary (genes.tsv).
        n_bins: ``K``, number of expression bins (values ``0..K-1``; ``K`` is the MASK token).
        n_labels: classes of the cell-label head on CLS (0 = no head).
        prior: optional float ``[G, G]`` prior gene-gene network (see ``load_prior_network``).
        prior_mode: how the prior enters, one of ``PRIOR_MODES`` (``init``: projected into the
            initial ``z``; ``bias``: a per-head bias of every row attention; ``both``); ignored
            without a prior.
        n_perturbation_types: ``T``, perturbation types the model is told about (0: none).
        output: ``bins`` (the masked-value head) or ``expression`` (an expression head; needs
            ``expression_baseline``).
        expression_baseline: ``[G]`` float, the log1p expression the expression head adds to.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        n_genes: int,
        n_bins: int,
        n_labels: int = 0,
        prior: torch.Tensor | None = None,
        prior_mode: str = "init",
        n_perturbation_types: int = 0,
        output: str = "bins",
        expression_baseline: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.cfg = cfg
        self.n_genes = n_genes
        self.n_bins = n_bins
        self.n_labels = n_labels
        c_m, c_z = cfg.c_m, cfg.c_z

        self.gene_embedding = nn.Embedding(n_genes, c_m)
        nn.init.normal_(self.gene_embedding.weight, std=1.0)
        self.cls_embedding = nn.Parameter(torch.randn(c_m))
        if cfg.value_encoder == "embedding":
            self.value_encoder: nn.Module = nn.Embedding(n_bins + 1, c_m)
        else:
            self.value_encoder = ContinuousValueEncoder(c_m, n_bins)
        self.embed_layer_norm = LayerNorm(c_m)

        if cfg.uses_pair:
            self.pair_left: Linear | None = Linear(c_m, c_z)
            self.pair_right: Linear | None = Linear(c_m, c_z)
        else:
            self.pair_left = self.pair_right = None
        if prior is not None and not cfg.uses_pair:
            raise ValueError("a prior network enters the pair representation: preset none has none")
        self.prior_proj: Linear | None = None
        self.prior_bias: PriorAttentionBias | None = None
        self.prior_mode: str | None = None
        if prior is not None:
            if tuple(prior.shape) != (n_genes, n_genes):
                raise ValueError(f"prior must be [{n_genes}, {n_genes}], got {list(prior.shape)}")
            if prior_mode not in PRIOR_MODES:
                raise ValueError(f"prior_mode must be one of {PRIOR_MODES}, got {prior_mode!r}")
            self.register_buffer("prior", prior.detach().to(torch.float32).clone())
            self.prior_mode = prior_mode
            if prior_mode in ("init", "both"):
                # features per pair: the edge value and an edge-present indicator
                self.prior_proj = Linear(2, c_z)
            if prior_mode in ("bias", "both"):
                self.prior_bias = PriorAttentionBias(cfg.n_heads_msa)
        else:
            self.prior = None

        # The heads read only the MSA: the last block's pair updates would have no consumer.
        self.stack = EvoformerStack(cfg, final_pair_update=False)
        self.final_layer_norm = LayerNorm(c_m) if cfg.ln_order == "pre" else nn.Identity()
        self.output = output
        self.value_head: nn.Module | None = None
        self.expression_head: nn.Module | None = None
        if output == "bins":
            n_out = n_bins if cfg.loss == "ce" else 1
            self.value_head = nn.Sequential(
                Linear(c_m, c_m, init="relu"), nn.GELU(), Linear(c_m, n_out)
            )
        self.label_head = Linear(c_m, n_labels) if n_labels > 0 else None

        # the perturbation task (created after everything else: a masked-expression model's
        # parameters are initialised from the same random stream as before)
        self.n_perturbation_types = n_perturbation_types
        self.perturbation_embedding: nn.Embedding | None = None
        self.perturbation_row: nn.Embedding | None = None
        self.perturbation_col: nn.Embedding | None = None
        if n_perturbation_types > 0:
            n = n_perturbation_types + 1  # 0: not perturbed (a zero vector, never trained)
            self.perturbation_embedding = nn.Embedding(n, c_m, padding_idx=0)
            if cfg.uses_pair:
                self.perturbation_row = nn.Embedding(n, c_z, padding_idx=0)
                self.perturbation_col = nn.Embedding(n, c_z, padding_idx=0)
        if output == "expression":
            if expression_baseline is None or tuple(expression_baseline.shape) != (n_genes,):
                raise ValueError(f"output 'expression' needs an expression_baseline [{n_genes}]")
            self.register_buffer(
                "expression_baseline", expression_baseline.detach().to(torch.float32).clone()
            )
            self.expression_head = nn.Sequential(
                Linear(c_m, c_m, init="relu"), nn.GELU(), Linear(c_m, 1, init="final")
            )
        else:
            self.expression_baseline = None

    # ------------------------------------------------------------------ embeddings
    def embed(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        pad_mask: torch.Tensor,
        perturbed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Initial representations.

        Args:
            gene_ids, values: ``[B, S, L]`` long; pad_mask: ``[B, S, L]`` bool.
            perturbed: ``[B, S, L]`` long perturbation type of each token (0 = none); only for
                a model with ``n_perturbation_types > 0``.

        Returns:
            ``m [B, S, r, c_m]``, ``z [B, r, r, c_z]``, ``msa_mask [B, S, r]``,
            ``pair_mask [B, r, r]`` (masks as float 0/1), ``r = L + 1``; ``z`` and
            ``pair_mask`` are None for preset ``none``.
        """
        b, s, _ = gene_ids.shape
        gene = self.gene_embedding(gene_ids)  # [B, S, L, c_m]
        tok = gene + self.value_encoder(values).to(gene.dtype)
        if perturbed is not None:
            if self.perturbation_embedding is None:
                raise ValueError("perturbed given to a model without perturbation embeddings")
            tok = tok + self.perturbation_embedding(perturbed).to(gene.dtype)
        cls = self.cls_embedding.to(gene.dtype).expand(b, s, 1, -1)
        m = self.embed_layer_norm(torch.cat([cls, tok], dim=-2))  # [B, S, r, c_m]

        real = torch.ones_like(pad_mask[..., :1])
        msa_mask = torch.cat([real, pad_mask], dim=-1).to(m.dtype)  # [B, S, r]
        if self.pair_left is None or self.pair_right is None:
            return m, None, msa_mask, None
        tok_mask = msa_mask[:, 0]  # [B, r] (first cell of the group)
        pair_mask = tok_mask[:, :, None] * tok_mask[:, None, :]

        e = torch.cat([cls[:, 0], gene[:, 0]], dim=-2)  # [B, r, c_m]
        z = self.pair_left(e)[:, :, None, :] + self.pair_right(e)[:, None, :, :]
        if self.prior is not None and self.prior_proj is not None:
            p = prior_pairs(self.prior, gene_ids[:, 0])  # [B, r, r]
            feats = torch.stack([p, (p != 0).to(p.dtype)], dim=-1)
            z = z + self.prior_proj(feats).to(z.dtype)
        if perturbed is not None and self.perturbation_row is not None:
            assert self.perturbation_col is not None
            p = F.pad(perturbed[:, 0], (1, 0))  # [B, r]: CLS is never perturbed
            z = z + self.perturbation_row(p)[:, :, None, :].to(z.dtype)
            z = z + self.perturbation_col(p)[:, None, :, :].to(z.dtype)
        return m, z, msa_mask, pair_mask

    def prior_attention_bias(self, gene_ids: torch.Tensor) -> torch.Tensor | None:
        """The prior's bias of the row attention logits (mode ``bias``/``both``; else None).

        Args:
            gene_ids: ``[B, S, L]`` long (the first cell of each group gives the gene order).

        Returns:
            ``[B, 1, H, r, r]``, added to every block's row attention logits.
        """
        if self.prior is None or self.prior_bias is None:
            return None
        return self.prior_bias(prior_pairs(self.prior, gene_ids[:, 0]))

    def forward(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        pad_mask: torch.Tensor,
        perturbed: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """
        Args:
            gene_ids: ``[B, S, L]`` long in ``[0, G)``.
            values: ``[B, S, L]`` long in ``[0, K]`` (``K`` = MASK).
            pad_mask: ``[B, S, L]`` bool, True = real token.
            perturbed: ``[B, S, L]`` long perturbation type per token (0 = none), or None.

        Returns:
            dict with ``pred`` (``[B, S, L, K]`` logits for loss "ce", ``[B, S, L]`` bin value for
            "mse"; None with output ``expression``), ``expression [B, S, L]`` (float32 log1p,
            output ``expression`` only, else None), ``cls [B, S, c_m]``, ``mean [B, S, c_m]``
            (over real gene tokens), ``label_logits [B, S, n_labels]`` or None,
            ``z [B, r, r, c_z]`` (None for preset ``none``).
        """
        m, z, msa_mask, pair_mask = self.embed(gene_ids, values, pad_mask, perturbed)
        attn_bias = self.prior_attention_bias(gene_ids)
        dev = m.device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            m = m.to(dt)
            z = z.to(dt) if z is not None else None
            attn_bias = attn_bias.to(dt) if attn_bias is not None else None
        m, z = self.stack(m, z, msa_mask, pair_mask, attn_bias)
        m = self.final_layer_norm(m)

        genes = m[:, :, 1:]  # [B, S, L, c_m]
        pred = expression = None
        if self.value_head is not None:
            pred = self.value_head(genes)
            if self.cfg.loss == "mse":
                pred = pred.squeeze(-1)
        if self.expression_head is not None:
            base = self.expression_baseline[gene_ids]  # [B, S, L]
            expression = base + self.expression_head(genes).squeeze(-1).float()
        w = pad_mask.to(genes.dtype).unsqueeze(-1)
        mean = (genes * w).sum(-2) / w.sum(-2).clamp(min=1)
        cls = m[:, :, 0]
        label_logits = self.label_head(cls) if self.label_head is not None else None
        return {
            "pred": pred,
            "expression": expression,
            "cls": cls,
            "mean": mean,
            "label_logits": label_logits,
            "z": z,
        }

    # ------------------------------------------------------------------ loss
    def loss_terms(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and detached 0-d metric tensors (no host sync; safe under FakeTensorMode).

        Args:
            batch: ``gene_ids``, ``values`` (masked), ``pad_mask``, ``target`` (true bins),
                ``loss_mask`` (positions to predict), all ``[B, S, L]``; optional ``labels``
                ``[B, S]`` long (-1 = unknown).

        Returns:
            ``(loss, metrics)``: scalar loss (value loss + label loss) and 0-d metric tensors.
        """
        out = self(batch["gene_ids"], batch["values"], batch["pad_mask"])
        w = batch["loss_mask"].to(torch.float32)
        n = w.sum().clamp(min=1)
        pred = out["pred"]
        assert pred is not None
        per, hit = self.value_terms(pred, batch["target"])
        value_loss = (per * w).sum() / n
        metrics = {"value_loss": value_loss.detach(), "bin_acc": ((hit * w).sum() / n).detach()}
        loss = value_loss

        labels = batch.get("labels")
        if self.label_head is not None and labels is not None:
            logits = out["label_logits"]
            assert logits is not None
            known = (labels >= 0).to(torch.float32)
            n_known = known.sum().clamp(min=1)
            per_cell = F.cross_entropy(
                logits.float().reshape(-1, self.n_labels),
                labels.clamp(min=0).reshape(-1),
                reduction="none",
            ).view_as(known)
            label_loss = (per_cell * known).sum() / n_known
            label_hit = (logits.argmax(-1) == labels).to(torch.float32)
            metrics["label_loss"] = label_loss.detach()
            metrics["label_acc"] = ((label_hit * known).sum() / n_known).detach()
            loss = loss + label_loss
        metrics["loss"] = loss.detach()
        return loss, metrics

    def value_terms(
        self, pred: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position value loss and bin hit (float32 ``[B, S, L]`` each).

        Args:
            pred: the ``pred`` of :meth:`forward` (``[B, S, L, K]`` logits or ``[B, S, L]``).
            target: ``[B, S, L]`` long true bins.

        Loss "ce": cross-entropy of the logits, hit = argmax is the true bin; "mse": squared
        error of the predicted bin value, hit = the rounded value is the true bin.
        """
        if self.cfg.loss == "ce":
            logits = pred.float()
            per = F.cross_entropy(
                logits.reshape(-1, self.n_bins), target.reshape(-1), reduction="none"
            ).view_as(target)
            hit = logits.argmax(-1) == target
        else:
            value = pred.float()
            per = (value - target.to(torch.float32)) ** 2
            hit = value.round().clamp(0, self.n_bins - 1) == target
        return per.to(torch.float32), hit.to(torch.float32)

    def decode_expression(
        self, pred: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted log1p expression and a non-zero score for every position.

        Args:
            pred: the ``pred`` of :meth:`forward` (``[B, S, L, K]`` logits or ``[B, S, L]``).
            values: ``[B, S, K]`` representative value of each bin of each cell
                (:func:`evoformer.metrics.bin_values` of its edges).

        Returns:
            ``(expression [B, S, L], nonzero_score [B, S, L])``: "ce" the expectation of the bin
            values under the softmax and ``1 - P(bin 0)``; "mse" the predicted bin mapped
            through the bin values by linear interpolation, and that value.
        """
        from evoformer.metrics import decode_bin_value, decode_distribution

        v = values.float().unsqueeze(-2)  # [B, S, 1, K]
        if self.cfg.loss == "ce":
            probs = torch.softmax(pred.float(), dim=-1)
            return decode_distribution(probs, v), 1.0 - probs[..., 0]
        expr = decode_bin_value(pred.float(), v.expand(*pred.shape, v.shape[-1]))
        return expr, expr

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """:meth:`loss_terms` with the metrics as Python floats (NaN for fake/meta tensors)."""
        loss, metrics = self.loss_terms(batch)
        return loss, metrics_to_floats(metrics)


#: What the model predicts per gene token: masked bins, or log1p expression (perturbation).
OUTPUTS = ("bins", "expression")


def metrics_to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-d metric tensors -> Python floats in one host transfer; NaN under FakeTensorMode/meta."""
    from torch._subclasses.fake_tensor import is_fake

    if not metrics:
        return {}
    vals = list(metrics.values())
    if any(is_fake(v) or v.device.type == "meta" for v in vals):
        return {k: float("nan") for k in metrics}
    floats = torch.stack([v.detach().float() for v in vals]).tolist()
    return dict(zip(metrics, floats, strict=True))


# ---------------------------------------------------------------------- parameter counts
_OPS = (
    "msa_row_attention",
    "msa_column_attention",
    "msa_transition",
    "outer_product_mean",
    "tri_mul_out",
    "tri_mul_in",
    "tri_att_start",
    "tri_att_end",
    "pair_transition",
)
_TOP = {
    "gene_embedding": "embeddings",
    "cls_embedding": "embeddings",
    "value_encoder": "embeddings",
    "embed_layer_norm": "embeddings",
    "pair_left": "pair_init",
    "pair_right": "pair_init",
    "prior_proj": "pair_init",
    "prior_bias": "pair_init",
    "final_layer_norm": "heads",
    "value_head": "heads",
    "label_head": "heads",
    "expression_head": "heads",
    "perturbation_embedding": "embeddings",
    "perturbation_row": "pair_init",
    "perturbation_col": "pair_init",
}
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.\d+\.([A-Za-z_]+)\.")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per component.

    Keys: ``embeddings``, ``pair_init`` (``z``'s initialisation and the prior's weights), one
    key per Evoformer op (summed over blocks, its
    LayerNorm included; 0 when the op is switched off), ``heads`` and ``total`` (the sum).
    Works on a BioFormer, an EvoformerStack or an EvoformerBlock (block params are keyed by op).
    """
    counts = {"embeddings": 0, "pair_init": 0, **dict.fromkeys(_OPS, 0), "heads": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        match = _BLOCK_RE.search(name)
        top = name.split(".", 1)[0]
        if match:
            key = match.group(1)
        elif top in _OPS:  # a bare EvoformerBlock
            key = top
        else:
            key = _TOP.get(top, "other")
        counts[key] = counts.get(key, 0) + p.numel()
    counts["total"] = sum(counts.values())
    return counts
