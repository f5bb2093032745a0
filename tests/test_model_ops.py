"""Every optimised Evoformer operation against its naive reference (masks and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from evoformer.model import primitives
from evoformer.model.msa_column_attention import MSAColumnAttention
from evoformer.model.msa_row_attention import MSARowAttentionWithPairBias
from evoformer.model.outer_product_mean import OuterProductMean
from evoformer.model.primitives import attention, chunked
from evoformer.model.transitions import Transition
from evoformer.model.triangle_attention import TriangleAttention
from evoformer.model.triangle_multiplication import TriangleMultiplication
from tests.reference_ops import (
    assert_same,
    outputs_and_grads,
    random_masks,
    randomize_parameters_,
    ref_msa_column_attention,
    ref_msa_row_attention,
    ref_outer_product_mean,
    ref_transition,
    ref_triangle_attention,
    ref_triangle_multiplication,
)

B, R, C_M, C_Z = 2, 7, 12, 6
D = torch.float64
F32 = torch.float32


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _module(cls, *args, seed=0):
    return randomize_parameters_(cls(*args).to(D), seed)


@pytest.mark.parametrize("s", [1, 3])
def test_msa_row_attention_matches_reference(s):
    op = _module(MSARowAttentionWithPairBias, C_M, C_Z, 4, 3)
    msa_mask, _ = random_masks(B, s, R)
    m, z, w = _rand(B, s, R, C_M, seed=1), _rand(B, R, R, C_Z, seed=2), _rand(B, s, R, C_M, seed=3)
    out_mask = msa_mask[..., None]
    ours = outputs_and_grads(lambda m, z: op(m, z, msa_mask), [m, z], op, w, out_mask)
    ref = outputs_and_grads(
        lambda m, z: ref_msa_row_attention(m, z, msa_mask, op), [m, z], op, w, out_mask
    )
    assert_same(ours, ref)


def test_msa_column_attention_matches_reference():
    s = 4
    op = _module(MSAColumnAttention, C_M, 4, 2)
    msa_mask, _ = random_masks(B, s, R)
    m, w = _rand(B, s, R, C_M, seed=1), _rand(B, s, R, C_M, seed=3)
    out_mask = msa_mask[..., None]
    ours = outputs_and_grads(lambda m: op(m, msa_mask), [m], op, w, out_mask)
    ref = outputs_and_grads(
        lambda m: ref_msa_column_attention(m, msa_mask, op), [m], op, w, out_mask
    )
    assert_same(ours, ref)


@pytest.mark.parametrize("chunk", [None, 3])
def test_transition_matches_reference(chunk):
    op = _module(Transition, C_Z, 3, "pair_transition")
    z, w = _rand(B, R, R, C_Z, seed=1), _rand(B, R, R, C_Z, seed=2)
    ones = torch.ones(B, R, R, 1, dtype=D)
    ours = outputs_and_grads(lambda z: op(z, chunk_size=chunk), [z], op, w, ones)
    ref = outputs_and_grads(lambda z: ref_transition(z, op), [z], op, w, ones)
    assert_same(ours, ref)


@pytest.mark.parametrize(("s", "chunk"), [(1, None), (1, 3), (3, None), (3, 2), (4, 16)])
def test_outer_product_mean_matches_naive_einsum(s, chunk):
    op = _module(OuterProductMean, C_M, C_Z, 5)
    msa_mask, pair_mask = random_masks(B, s, R, seed=s)
    # a cell with only some real tokens in row 1 exercises per-pair normalisation n_ij
    m, w = _rand(B, s, R, C_M, seed=1), _rand(B, R, R, C_Z, seed=2)
    ones = torch.ones(B, R, R, 1, dtype=D)
    op.train()
    ours = outputs_and_grads(lambda m: op(m, msa_mask, chunk_size=chunk), [m], op, w, ones)
    ref = outputs_and_grads(lambda m: ref_outer_product_mean(m, msa_mask, op), [m], op, w, ones)
    assert_same(ours, ref)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor produced by any aten op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk", [None, 4])
def test_outer_product_mean_never_materialises_r_r_c_c(chunk):
    b, s, r, c_opm, c_z = 2, 2, 16, 8, 4
    op = _module(OuterProductMean, C_M, c_z, c_opm)
    msa_mask, _ = random_masks(b, s, r)
    m = _rand(b, s, r, C_M).requires_grad_(True)
    forbidden = b * r * r * c_opm * c_opm
    with _LargestTensor() as ours:
        op(m, msa_mask, chunk_size=chunk).sum().backward()
    with _LargestTensor() as naive:
        ref_outer_product_mean(m, msa_mask, op).sum().backward()
    assert naive.largest >= forbidden  # the probe sees the naive [B, r, r, c, c]
    assert ours.largest <= b * r * r * c_z  # nothing larger than the output itself


@pytest.mark.parametrize("outgoing", [True, False])
@pytest.mark.parametrize("chunk", [None, 3])
def test_triangle_multiplication_matches_reference(outgoing, chunk):
    op = _module(TriangleMultiplication, C_Z, 7, outgoing)
    _, pair_mask = random_masks(B, 1, R)
    z, w = _rand(B, R, R, C_Z, seed=1), _rand(B, R, R, C_Z, seed=2)
    out_mask = pair_mask[..., None]
    op.train()
    ours = outputs_and_grads(lambda z: op(z, pair_mask, chunk_size=chunk), [z], op, w, out_mask)
    ref = outputs_and_grads(
        lambda z: ref_triangle_multiplication(z, pair_mask, op), [z], op, w, out_mask
    )
    assert_same(ours, ref)


@pytest.mark.parametrize("starting", [True, False])
@pytest.mark.parametrize("chunk", [None, 2])
def test_triangle_attention_matches_reference(starting, chunk):
    op = _module(TriangleAttention, C_Z, 4, 3, starting)
    _, pair_mask = random_masks(B, 1, R, seed=4)
    z, w = _rand(B, R, R, C_Z, seed=1), _rand(B, R, R, C_Z, seed=2)
    out_mask = pair_mask[..., None]
    op.train()
    ours = outputs_and_grads(lambda z: op(z, pair_mask, chunk_size=chunk), [z], op, w, out_mask)
    ref = outputs_and_grads(
        lambda z: ref_triangle_attention(z, pair_mask, op), [z], op, w, out_mask
    )
    assert_same(ours, ref)


def test_masked_tokens_do_not_leak():
    """Changing padded tokens' features leaves every real output unchanged."""
    _, pair_mask = random_masks(B, 1, R, seed=5)
    msa_mask = pair_mask.diagonal(dim1=-2, dim2=-1)[:, None]  # [B, 1, R]
    m, z = _rand(B, 1, R, C_M, seed=1), _rand(B, R, R, C_Z, seed=2)
    pad_m = (1 - msa_mask)[..., None]
    pad_z = (1 - pair_mask)[..., None]
    m2 = m + 5 * pad_m * _rand(B, 1, R, C_M, seed=3)
    z2 = z + 5 * pad_z * _rand(B, R, R, C_Z, seed=4)
    ops = [
        (
            _module(MSARowAttentionWithPairBias, C_M, C_Z, 4, 2),
            lambda op, m, z: op(m, z, msa_mask),
            msa_mask,
        ),
        (_module(OuterProductMean, C_M, C_Z, 3), lambda op, m, z: op(m, msa_mask), pair_mask),
        (
            _module(TriangleMultiplication, C_Z, 5, True),
            lambda op, m, z: op(z, pair_mask),
            pair_mask,
        ),
        (
            _module(TriangleMultiplication, C_Z, 5, False),
            lambda op, m, z: op(z, pair_mask),
            pair_mask,
        ),
        (_module(TriangleAttention, C_Z, 4, 2, True), lambda op, m, z: op(z, pair_mask), pair_mask),
        (
            _module(TriangleAttention, C_Z, 4, 2, False),
            lambda op, m, z: op(z, pair_mask),
            pair_mask,
        ),
    ]
    for op, call, mask in ops:
        a, b = call(op, m, z) * mask[..., None], call(op, m2, z2) * mask[..., None]
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=type(op).__name__)


def test_chunked_equals_unchunked_and_rejects_mismatched_sizes():
    x = _rand(3, 10, 4).requires_grad_(True)
    y = _rand(3, 1, 4)

    def fn(a, b):
        return torch.tanh(a * b).cumsum(-1)

    full = fn(x, y)
    g_full = torch.autograd.grad(full.sum(), x)[0]
    for chunk in (1, 3, 10, 11):
        part = chunked(fn, [x, y], [1, 1], chunk, out_dim=1)
        torch.testing.assert_close(part, full)
        torch.testing.assert_close(torch.autograd.grad(part.sum(), x)[0], g_full)
    with pytest.raises(ValueError, match="disagree"):
        chunked(fn, [x, _rand(3, 9, 4)], [1, 1], 2, out_dim=1)


def _padded_masks(b: int, s: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``msa_mask [b, s, r]`` with fully padded cells and positions padded in every cell, and
    ``pair_mask [b, r, r]`` from the first cell (so whole rows/columns of it are padded)."""
    msa_mask, _ = random_masks(b, s, r, seed=7)
    msa_mask[:, :, -2:] = 0  # the last two positions: padded in every cell (empty columns)
    if s > 1:
        msa_mask[0, 1] = 0  # a cell without tokens (an empty row for row attention)
    msa_mask = msa_mask.to(F32)
    tok = msa_mask[:, 0]
    return msa_mask, tok[:, :, None] * tok[:, None, :]


def _f32(*shape, seed=0):
    return _rand(*shape, seed=seed).to(F32)


def _module32(cls, *args, seed=0):
    return randomize_parameters_(cls(*args), seed).to(F32)


@pytest.mark.parametrize("sdpa", [False, True])
def test_attention_with_fully_masked_sequences_fp32(monkeypatch, sdpa):
    """fp32: sequences whose every key is masked output 0 and pass no gradient; the others
    match an explicit fp64 softmax, also with upstream gradient at the empty sequences."""
    if sdpa:  # PyTorch's SDPA (its fp32 CPU backward is wrong for a fully masked row)
        monkeypatch.setattr(primitives, "_use_math_kernel", lambda q: False)
    n, h, length, d = 4, 2, 5, 8
    q, k, v = (_f32(n, h, length, d, seed=i).requires_grad_(True) for i in (1, 2, 3))
    key_mask = torch.ones(n, length)
    key_mask[1] = 0  # no real key
    key_mask[2, 3:] = 0
    g = _f32(n, h, length, d, seed=4)
    for bias in (None, _f32(n, h, length, length, seed=5).requires_grad_(True)):
        leaves = [q, k, v] + ([bias] if bias is not None else [])
        out = attention(q, k, v, bias, key_mask)
        grads = torch.autograd.grad(out, leaves, g)
        ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
        qd, kd, vd = ref_leaves[:3]
        logits = qd @ kd.transpose(-1, -2) / math.sqrt(d) + (key_mask[:, None, None] - 1) * 1e9
        if bias is not None:
            logits = logits + ref_leaves[3]
        weights = logits.softmax(-1) * (key_mask.sum(-1) > 0)[:, None, None, None]
        ref = weights @ vd
        ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        for ours, theirs in zip(grads, ref_grads, strict=True):
            assert not ours[1].any()  # nothing flows back from the empty sequence
            torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=1e-5)


def test_sdpa_gets_a_bias_with_a_unit_last_dim_stride(monkeypatch):
    """The row attention's pair bias is permuted ([*, r, r, H] -> [*, H, r, r]); SDPA must get
    it with stride 1 in the last dim, or CUDA runs the math kernel (seen on an H200)."""
    monkeypatch.setattr(primitives, "_use_math_kernel", lambda q: False)
    strides = []
    sdpa = primitives.F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kw):
        strides.append(attn_mask.stride(-1))
        return sdpa(*args, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(primitives.F, "scaled_dot_product_attention", spy)
    row = _module32(MSARowAttentionWithPairBias, C_M, C_Z, 4, 3)
    m, z = _f32(B, 1, R, C_M, seed=1), _f32(B, R, R, C_Z, seed=2)
    padded = torch.ones(B, 1, R)
    padded[0, :, -2:] = 0
    for mask in (torch.ones(B, 1, R), padded):
        row(m, z, mask)
    assert strides == [1, 1]


def _assert_close32(a, b) -> None:
    assert_same(a, b, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("sdpa", [False, True])
def test_attention_ops_with_padding_fp32_all_positions(monkeypatch, sdpa):
    """Every attention op in fp32 against the explicit-softmax references, with fully padded
    cells, columns and pair rows and upstream gradient at the padded positions too."""
    if sdpa:
        monkeypatch.setattr(primitives, "_use_math_kernel", lambda q: False)
    b, s, r = 2, 3, 7
    msa_mask, pair_mask = _padded_masks(b, s, r)
    m, z = _f32(b, s, r, C_M, seed=1), _f32(b, r, r, C_Z, seed=2)
    wm, wz = _f32(b, s, r, C_M, seed=3), _f32(b, r, r, C_Z, seed=4)
    every_m, every_z = torch.ones(b, s, r, 1), torch.ones(b, r, r, 1)
    row = _module32(MSARowAttentionWithPairBias, C_M, C_Z, 4, 3)
    ours = outputs_and_grads(lambda m, z: row(m, z, msa_mask), [m, z], row, wm, every_m)
    ref = outputs_and_grads(
        lambda m, z: ref_msa_row_attention(m, z, msa_mask, row), [m, z], row, wm, every_m
    )
    _assert_close32(ours, ref)
    col = _module32(MSAColumnAttention, C_M, 4, 2)
    ours = outputs_and_grads(lambda m: col(m, msa_mask), [m], col, wm, every_m)
    ref = outputs_and_grads(
        lambda m: ref_msa_column_attention(m, msa_mask, col), [m], col, wm, every_m
    )
    _assert_close32(ours, ref)
    for starting in (True, False):
        tri = _module32(TriangleAttention, C_Z, 4, 3, starting)
        ref = outputs_and_grads(
            lambda z, tri=tri: ref_triangle_attention(z, pair_mask, tri), [z], tri, wz, every_z
        )
        for chunk in (None, 3):
            ours = outputs_and_grads(
                lambda z, tri=tri, chunk=chunk: tri(z, pair_mask, chunk_size=chunk),
                [z],
                tri,
                wz,
                every_z,
            )
            _assert_close32(ours, ref)


def test_chunked_recompute_with_tail_and_params():
    """Recomputed slices with a Linear tail give the unchunked values and gradients (inputs,
    whole args, params, tail params); a parameter missing from ``params`` raises."""
    lin1 = torch.nn.Linear(4, 6).to(D)
    lin2 = torch.nn.Linear(6, 3).to(D)
    x = _rand(3, 10, 4, seed=1).requires_grad_(True)
    scale = _rand(1, 1, 6, seed=2).requires_grad_(True)  # passed whole

    def fn(a, s):
        return torch.tanh(lin1(a)) * s

    tail = primitives.LinearTail(lin2)
    params = list(lin1.parameters())
    leaves = [x, scale, *params, *lin2.parameters()]
    full = lin2(fn(x, scale))
    g = _rand(*full.shape, seed=3)
    g_full = torch.autograd.grad(full, leaves, g)
    for chunk in (1, 3, 10):
        part = chunked(fn, [x, scale], [1, None], chunk, out_dim=1, params=params, tail=tail)
        torch.testing.assert_close(part, full)
        for a, b in zip(torch.autograd.grad(part, leaves, g), g_full, strict=True):
            torch.testing.assert_close(a, b)
        with torch.no_grad():  # inference: slices written into one output
            torch.testing.assert_close(
                chunked(fn, [x, scale], [1, None], chunk, out_dim=1, params=params, tail=tail),
                full,
            )
    part = chunked(fn, [x, scale], [1, None], 3, out_dim=1, params=params[:1], tail=tail)
    with pytest.raises(RuntimeError, match="not in args or params"):
        part.backward(g)
