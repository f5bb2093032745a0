"""Evoformer block and stack (AF2 supplement Alg. 6), with switchable ops and LN order.

Every operation is wrapped in a :class:`Residual`: in ``pre`` order ``x + drop(op(LN(x)))``
(AF2), in ``post`` order ``LN(x + drop(op(x)))``. One block, in AF2's order::

    m += RowAttentionWithPairBias(m, z)   (row-wise dropout, dropout_msa; no pair bias and no
                                           z at all with preset none)
    m += ColumnAttention(m)                [column_attention]
    m += MSATransition(m)
    z += OuterProductMean(m)
    z += TriangleMultiplicationOutgoing(z) [tri_mul_out]    (row-wise dropout, dropout_pair)
    z += TriangleMultiplicationIncoming(z) [tri_mul_in]     (row-wise dropout)
    z += TriangleAttentionStartingNode(z)  [tri_att_start]  (row-wise dropout)
    z += TriangleAttentionEndingNode(z)    [tri_att_end]    (column-wise dropout)
    z += PairTransition(z)                 [pair_transition]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from evoformer.model.checkpointing import offloaded_checkpoint
from evoformer.model.config import ModelConfig
from evoformer.model.dropout import DropoutColumnwise, DropoutRowwise
from evoformer.model.fused import add_dropout
from evoformer.model.msa_column_attention import MSAColumnAttention
from evoformer.model.msa_row_attention import MSARowAttentionWithPairBias
from evoformer.model.outer_product_mean import OuterProductMean
from evoformer.model.primitives import LayerNorm
from evoformer.model.transitions import Transition
from evoformer.model.triangle_attention import TriangleAttention
from evoformer.model.triangle_multiplication import TriangleMultiplication


class Residual(nn.Module):
    """One residual update with its LayerNorm and dropout.

    Args:
        op: module called as ``op(x_in, *args, **kwargs)``.
        c_ln: channels of the LayerNorm: the op input's in ``pre`` order, the residual stream's in
            ``post`` order (they differ only for the outer product mean, ``c_m`` vs ``c_z``).
        pre: ``pre`` (True) or ``post`` (False) LayerNorm order.
        dropout: module applied to the update (identity when None).

    ``fused`` (:func:`evoformer.model.fused.set_fused`): the dropout and the residual add in one
    pass (:func:`evoformer.model.fused.add_dropout`); an op with ``adds_residual`` (the outer
    product mean, which has no dropout) adds ``x`` into its own output (``residual=x``).
    """

    fused: bool = False

    def __init__(self, op: nn.Module, c_ln: int, pre: bool, dropout: nn.Module | None = None):
        super().__init__()
        self.op = op
        self.layer_norm = LayerNorm(c_ln)
        self.pre = pre
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(
        self, x: torch.Tensor, *args: Any, inp: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """``x``: the residual stream; ``inp``: the op's input when it is another stream (OPM)."""
        src = x if inp is None else inp
        if self.pre:
            src = self.layer_norm(src)
        if not self.fused:
            out = x + self.dropout(self.op(src, *args, **kwargs))
        elif getattr(self.op, "adds_residual", False) and isinstance(self.dropout, nn.Identity):
            out = self.op(src, *args, residual=x, **kwargs)
        else:
            out = add_dropout(x, self.op(src, *args, **kwargs), self.dropout)
        return out if self.pre else self.layer_norm(out)


class EvoformerBlock(nn.Module):
    """One Evoformer block: MSA ``[*, S, r, c_m]`` and pair ``[*, r, r, c_z]`` in and out.

    Args:
        cfg: model configuration (op switches, LN order, sizes).
        update_pair: False builds no pair update at all (no OPM, no pair stack): the block only
            reads ``z`` as the row-attention bias. Used for the last block of a model whose heads
            read only the MSA (nothing would consume, or backpropagate into, its pair updates).
            Preset ``none`` has no ``z``: no pair bias, no pair updates in any block.
    """

    def __init__(self, cfg: ModelConfig, update_pair: bool = True) -> None:
        super().__init__()
        pre = cfg.ln_order == "pre"
        c_m, c_z = cfg.c_m, cfg.c_z
        update_pair = update_pair and cfg.uses_pair
        self.checkpoint_ops = cfg.checkpoint_ops
        self.msa_row_attention = Residual(
            MSARowAttentionWithPairBias(
                c_m, c_z if cfg.uses_pair else None, cfg.c_hidden_msa, cfg.n_heads_msa
            ),
            c_m,
            pre,
            DropoutRowwise(cfg.dropout_msa),
        )
        self.msa_column_attention = (
            Residual(MSAColumnAttention(c_m, cfg.c_hidden_msa, cfg.n_heads_msa), c_m, pre)
            if cfg.column_attention
            else None
        )
        self.msa_transition = Residual(
            Transition(c_m, cfg.transition_n, "msa_transition"), c_m, pre
        )
        self.outer_product_mean = (
            Residual(OuterProductMean(c_m, c_z, cfg.c_opm), c_m if pre else c_z, pre)
            if update_pair
            else None
        )

        def tri_mul(outgoing: bool) -> Residual:
            op = TriangleMultiplication(c_z, cfg.c_hidden_tri_mul, outgoing)
            return Residual(op, c_z, pre, DropoutRowwise(cfg.dropout_pair))

        def tri_att(starting: bool) -> Residual:
            op = TriangleAttention(c_z, cfg.c_hidden_pair, cfg.n_heads_pair, starting)
            drop = DropoutRowwise if starting else DropoutColumnwise
            return Residual(op, c_z, pre, drop(cfg.dropout_pair))

        self.tri_mul_out = tri_mul(True) if cfg.tri_mul_out and update_pair else None
        self.tri_mul_in = tri_mul(False) if cfg.tri_mul_in and update_pair else None
        self.tri_att_start = tri_att(True) if cfg.tri_att_start and update_pair else None
        self.tri_att_end = tri_att(False) if cfg.tri_att_end and update_pair else None
        self.pair_transition = (
            Residual(Transition(c_z, cfg.transition_n, "pair_transition"), c_z, pre)
            if cfg.pair_transition and update_pair
            else None
        )

    def forward(
        self,
        m: torch.Tensor,
        z: torch.Tensor | None,
        msa_mask: torch.Tensor,
        pair_mask: torch.Tensor | None,
        chunk_size: int | None = None,
        attn_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            m: ``[*, S, r, c_m]``; z: ``[*, r, r, c_z]`` (None for preset ``none``).
            msa_mask: ``[*, S, r]``; pair_mask: ``[*, r, r]`` (1 = real; None without z).
            chunk_size: see :class:`ModelConfig`.
            attn_bias: ``[*, 1, H, r, r]`` added to the row attention logits (the prior's bias,
                :class:`evoformer.model.prior.PriorAttentionBias`), or None.

        Returns:
            ``(m [*, S, r, c_m], z [*, r, r, c_z] or None)``.
        """
        with record_function("evoformer_block"):
            m = self._run(self.msa_row_attention, m, z, msa_mask, attn_bias)
            if self.msa_column_attention is not None:
                m = self._run(self.msa_column_attention, m, msa_mask)
            m = self._run(self.msa_transition, m)
            if self.outer_product_mean is not None:
                z = self._run(self.outer_product_mean, z, msa_mask, inp=m, chunk_size=chunk_size)
            for op in (self.tri_mul_out, self.tri_mul_in, self.tri_att_start, self.tri_att_end):
                if op is not None:
                    z = self._run(op, z, pair_mask, chunk_size=chunk_size)
            if self.pair_transition is not None:
                z = self._run(self.pair_transition, z, chunk_size=chunk_size)
            return m, z

    def _run(self, op: Residual, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``op(*args, **kwargs)``; with ``checkpoint_ops`` in training its own activation
        checkpoint (inside a checkpointed group: while the group is recomputed in backward)."""
        if self.checkpoint_ops and self.training and torch.is_grad_enabled():
            return checkpoint(op, *args, use_reentrant=False, **kwargs)
        return op(*args, **kwargs)


class EvoformerStack(nn.Module):
    """``n_blocks`` Evoformer blocks with optional activation checkpointing.

    With ``blocks_per_ckpt = k`` (and grad enabled in training mode) each run of ``k`` consecutive
    blocks is one non-reentrant checkpoint: only its inputs are kept, its activations are
    recomputed in backward (dropout masks reproduced through the saved RNG state). With
    ``offload_checkpoints`` those inputs (``m`` and ``z``) wait for the backward in pinned host
    memory instead of on the GPU (:func:`evoformer.model.checkpointing.offloaded_checkpoint`).
    With ``checkpoint_ops`` every op of a block is a checkpoint of its own as well: a group's
    recomputation then keeps only the streams between its ops, and each op's activations exist
    only while that op is differentiated.

    Args:
        cfg: model configuration.
        final_pair_update: False when nothing downstream reads the output ``z``: the last block
            then skips its pair updates (see :class:`EvoformerBlock`), which saves their compute
            and memory and leaves no parameter without a gradient (DDP requires that).
    """

    def __init__(self, cfg: ModelConfig, final_pair_update: bool = True) -> None:
        super().__init__()
        self.chunk_size = cfg.chunk_size
        self.blocks_per_ckpt = cfg.blocks_per_ckpt
        self.offload_checkpoints = cfg.offload_checkpoints
        n = cfg.n_blocks
        self.blocks = nn.ModuleList(
            EvoformerBlock(cfg, update_pair=final_pair_update or i < n - 1) for i in range(n)
        )

    def forward(
        self,
        m: torch.Tensor,
        z: torch.Tensor | None,
        msa_mask: torch.Tensor,
        pair_mask: torch.Tensor | None,
        attn_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            m: ``[*, S, r, c_m]``; z: ``[*, r, r, c_z]`` (None for preset ``none``).
            msa_mask: ``[*, S, r]``; pair_mask: ``[*, r, r]`` (1 = real; None without z).
            attn_bias: ``[*, 1, H, r, r]`` added to every block's row attention logits, or None.

        Returns:
            ``(m [*, S, r, c_m], z [*, r, r, c_z] or None)``.
        """
        blocks = list(self.blocks)
        k = self.blocks_per_ckpt
        if k is None or not (self.training and torch.is_grad_enabled()):
            groups = [blocks]
            use_ckpt = False
        else:
            groups = [blocks[i : i + k] for i in range(0, len(blocks), k)]
            use_ckpt = True

        offload = use_ckpt and self.offload_checkpoints
        for group in groups:

            def run(m_, z_, bias_, group=group):
                for block in group:
                    m_, z_ = block(m_, z_, msa_mask, pair_mask, self.chunk_size, bias_)
                return m_, z_

            if offload:
                params = [p for block in group for p in block.parameters() if p.requires_grad]
                m, z = offloaded_checkpoint(run, (m, z, attn_bias), (True, True, False), params)
            elif use_ckpt:
                m, z = checkpoint(run, m, z, attn_bias, use_reentrant=False)
            else:
                m, z = run(m, z, attn_bias)
        return m, z
