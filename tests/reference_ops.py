"""Naive reference implementations of every Evoformer operation (AF2 supplement Alg. 6-15).

Written the obvious way, as in the seeds (TinyOpenFold): explicit einsums, materialised logits
and the full ``[B, r, r, c, c]`` outer product. Each function takes the optimised module whose
parameters it uses, so tests (and ``benchmarks/``) compare the two on identical weights.
Everything here is deliberately unoptimised; do not import it from the ``evoformer`` package.
"""

from __future__ import annotations

import math

import torch
from torch import nn

INF = 1e9


def randomize_parameters_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter with random values (AF2's zero "final"/"gating" inits would make
    most outputs and gradients trivially zero). Matrices ~ N(0, 1/fan_in), vectors ~ N(0, 0.1^2),
    LayerNorm weights ~ 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                std = 1.0 / math.sqrt(p.shape[-1])
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
            elif "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return module


def ref_layer_norm(x: torch.Tensor, ln: nn.Module) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * w + b`` over the last dim."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    y = torch.einsum("...i,oi->...o", x, lin.weight)
    return y + lin.bias if lin.bias is not None else y


def ref_gated_attention(
    x: torch.Tensor, bias: torch.Tensor | None, mha: nn.Module, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Gated MHA over dim -2 with explicit logits and softmax.

    x ``[*, N, c]``; bias ``[*, H, N, N]`` or None; key_mask ``[*, N]`` (1 = real key): masked
    keys get ``-1e9``, and a sequence without any real key gets zero attention weights (its
    attention output is 0, as documented for ``evoformer.model.primitives.attention``).
    """
    h, d = mha.n_heads, mha.c_hidden
    q = ref_linear(x, mha.linear_q).unflatten(-1, (h, d))  # [*, N, H, d]
    k = ref_linear(x, mha.linear_k).unflatten(-1, (h, d))
    v = ref_linear(x, mha.linear_v).unflatten(-1, (h, d))
    logits = torch.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias
    if key_mask is not None:
        logits = logits + (key_mask[..., None, None, :] - 1) * INF
    weights = torch.softmax(logits, dim=-1)
    if key_mask is not None:
        weights = weights * (key_mask.sum(-1) > 0).to(weights.dtype)[..., None, None, None]
    o = torch.einsum("...hqk,...khd->...qhd", weights, v)
    g = torch.sigmoid(ref_linear(x, mha.linear_g)).unflatten(-1, (h, d))
    return ref_linear((g * o).flatten(-2), mha.linear_o)


def ref_msa_row_attention(
    m: torch.Tensor, z: torch.Tensor, msa_mask: torch.Tensor, op: nn.Module
) -> torch.Tensor:
    """Alg. 7. m ``[B, S, r, c_m]``, z ``[B, r, r, c_z]``, msa_mask ``[B, S, r]``."""
    pair_bias = ref_linear(ref_layer_norm(z, op.layer_norm_z), op.linear_z)  # [B, r, r, H]
    pair_bias = pair_bias.permute(0, 3, 1, 2)[:, None]  # [B, 1, H, r, r]
    return ref_gated_attention(m, pair_bias, op.mha, key_mask=msa_mask)


def ref_msa_column_attention(
    m: torch.Tensor, msa_mask: torch.Tensor, op: nn.Module
) -> torch.Tensor:
    """Alg. 8: attention over S for every column."""
    m_t = m.transpose(1, 2)  # [B, r, S, c]
    return ref_gated_attention(m_t, None, op.mha, key_mask=msa_mask.transpose(1, 2)).transpose(1, 2)


def ref_transition(x: torch.Tensor, op: nn.Module) -> torch.Tensor:
    """Alg. 9 / 15."""
    return ref_linear(torch.relu(ref_linear(x, op.linear_1)), op.linear_2)


def ref_outer_product_mean(m: torch.Tensor, msa_mask: torch.Tensor, op: nn.Module) -> torch.Tensor:
    """Alg. 10, the way the researcher wrote it: materialise ``[B, r, r, c, c]``."""
    mask = msa_mask[..., None]
    a = ref_linear(m, op.linear_a) * mask  # [B, S, r, c]
    b = ref_linear(m, op.linear_b) * mask
    outer = torch.einsum("bsic,bsjd->bijcd", a, b)  # [B, r, r, c, c]
    norm = torch.einsum("bsi,bsj->bij", msa_mask, msa_mask)[..., None, None]
    mean = outer / (norm + op.eps)
    return ref_linear(mean.flatten(-2), op.linear_out)  # [B, r, r, c_z]


def ref_triangle_multiplication(
    z: torch.Tensor, pair_mask: torch.Tensor, op: nn.Module
) -> torch.Tensor:
    """Alg. 11 (outgoing) / 12 (incoming)."""
    mask = pair_mask[..., None]
    a = torch.sigmoid(ref_linear(z, op.linear_a_g)) * ref_linear(z, op.linear_a_p) * mask
    b = torch.sigmoid(ref_linear(z, op.linear_b_g)) * ref_linear(z, op.linear_b_p) * mask
    if op.outgoing:
        x = torch.einsum("bikc,bjkc->bijc", a, b)
    else:
        x = torch.einsum("bkic,bkjc->bijc", a, b)
    x = ref_linear(ref_layer_norm(x, op.layer_norm_out), op.linear_z)
    return torch.sigmoid(ref_linear(z, op.linear_g)) * x


def ref_triangle_attention(z: torch.Tensor, pair_mask: torch.Tensor, op: nn.Module) -> torch.Tensor:
    """Alg. 13 (starting node) / 14 (ending node), logits ``[B, I, H, J, K]`` materialised."""
    if not op.starting:
        z = z.transpose(1, 2)
        pair_mask = pair_mask.transpose(1, 2)
    tri_bias = ref_linear(z, op.linear_bias).permute(0, 3, 1, 2)[:, None]  # [B, 1, H, J, K]
    out = ref_gated_attention(z, tri_bias, op.mha, key_mask=pair_mask)
    return out.transpose(1, 2) if not op.starting else out


def _residual(x, res, update_fn, inp=None):
    """Reference of ``evoformer.model.evoformer.Residual`` (no dropout: eval mode)."""
    src = x if inp is None else inp
    if res.pre:
        return x + update_fn(ref_layer_norm(src, res.layer_norm))
    return ref_layer_norm(x + update_fn(src), res.layer_norm)


def ref_evoformer_block(m, z, msa_mask, pair_mask, block):
    """Alg. 6 with the block's switches and LN order, every op naive. Returns ``(m, z)``."""
    m = _residual(
        m,
        block.msa_row_attention,
        lambda x: ref_msa_row_attention(x, z, msa_mask, block.msa_row_attention.op),
    )
    if block.msa_column_attention is not None:
        res = block.msa_column_attention
        m = _residual(m, res, lambda x: ref_msa_column_attention(x, msa_mask, res.op))
    m = _residual(m, block.msa_transition, lambda x: ref_transition(x, block.msa_transition.op))
    res = block.outer_product_mean
    if res is not None:
        z = _residual(z, res, lambda x: ref_outer_product_mean(x, msa_mask, res.op), inp=m)
    for name in ("tri_mul_out", "tri_mul_in"):
        res = getattr(block, name)
        if res is not None:
            z = _residual(
                z, res, lambda x, res=res: ref_triangle_multiplication(x, pair_mask, res.op)
            )
    for name in ("tri_att_start", "tri_att_end"):
        res = getattr(block, name)
        if res is not None:
            z = _residual(z, res, lambda x, res=res: ref_triangle_attention(x, pair_mask, res.op))
    if block.pair_transition is not None:
        z = _residual(
            z, block.pair_transition, lambda x: ref_transition(x, block.pair_transition.op)
        )
    return m, z


# ---------------------------------------------------------------------- test support
def random_masks(b: int, s: int, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``msa_mask [b, s, r]`` (float64 0/1; token 0 always real, random padding at the end of each
    cell, so the tokens of the first cell define ``pair_mask [b, r, r]``)."""
    g = torch.Generator().manual_seed(seed)
    n_real = torch.randint(r // 2, r + 1, (b, s), generator=g)
    msa_mask = (torch.arange(r)[None, None, :] < n_real[..., None]).to(torch.float64)
    tok = msa_mask[:, 0]
    return msa_mask, tok[:, :, None] * tok[:, None, :]


def outputs_and_grads(fn, inputs: list[torch.Tensor], module: nn.Module, weight, out_mask):
    """Run ``fn(*inputs)``, backprop ``sum(out * weight * out_mask)``.

    Returns ``(out * out_mask, [input grads], {param name: grad})``; inputs are cloned leaves.
    """
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    module.zero_grad(set_to_none=True)
    out = fn(*leaves)
    (out * weight * out_mask).sum().backward()
    grads = [x.grad for x in leaves]
    pgrads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return (out * out_mask).detach(), grads, pgrads


def assert_same(a, b, atol: float = 1e-9, rtol: float = 1e-7) -> None:
    """Outputs/grads of :func:`outputs_and_grads` agree (same parameters got gradients)."""
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol)
    for ga, gb in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(ga, gb, atol=atol, rtol=rtol)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=atol, rtol=rtol, msg=name)
