"""Every optimised Evoformer operation against its naive reference (masks and gradients)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from evoformer.model.msa_column_attention import MSAColumnAttention
from evoformer.model.msa_row_attention import MSARowAttentionWithPairBias
from evoformer.model.outer_product_mean import OuterProductMean
from evoformer.model.primitives import chunked
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
