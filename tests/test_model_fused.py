"""The fused paths and the compiled step (``train.compile``) against the plain eager model."""

from __future__ import annotations

import pytest
import torch

from evoformer.errors import InputError
from evoformer.model import BioFormer, EvoformerStack, ModelConfig, apply_value_mask, fused
from evoformer.model.fused import (
    AUTO,
    AUTO_COMPILE,
    COMPILE_MODES,
    _LayerNormHeads,
    adamw_options,
    compile_mode,
    compile_model,
    layer_norm_heads,
    set_fused,
)
from evoformer.model.primitives import LayerNorm
from evoformer.train_config import TrainConfig
from tests.reference_ops import randomize_parameters_, ref_layer_norm

TINY = {
    "c_m": 8,
    "c_z": 6,
    "c_opm": 3,
    "n_heads_msa": 2,
    "c_hidden_msa": 4,
    "n_heads_pair": 2,
    "c_hidden_pair": 4,
    "c_hidden_tri_mul": 5,
    "n_blocks": 2,
    "dropout_msa": 0.2,
    "dropout_pair": 0.3,
}
N_GENES, N_BINS, B, L = 20, 5, 3, 7


def _batch(s: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.stack([torch.randperm(N_GENES, generator=g)[:L] for _ in range(B)])
    gene_ids = gene_ids[:, None].expand(B, s, L).contiguous()
    values = torch.randint(0, N_BINS, (B, s, L), generator=g)
    pad_mask = torch.ones(B, s, L, dtype=torch.bool)
    pad_mask[0, :, -2:] = False  # padded tokens: masked keys, rows and columns of z
    masked, loss_mask = apply_value_mask(values, pad_mask, 0.3, N_BINS, g)
    return {
        "gene_ids": gene_ids,
        "values": masked,
        "pad_mask": pad_mask,
        "target": values,
        "loss_mask": loss_mask,
    }


def _model(preset: str, **keys) -> BioFormer:
    cfg = ModelConfig.from_dict({**TINY, "preset": preset, **keys})
    torch.manual_seed(0)
    return randomize_parameters_(BioFormer(cfg, n_genes=N_GENES, n_bins=N_BINS), seed=3).train()


def _loss_and_grads(model: BioFormer, batch, bf16: bool = False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks for every variant
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = model.loss_terms(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_close(a, b, rtol: float) -> None:
    """Loss and every gradient agree to ``rtol`` of their scale (L2 error; a gradient that is
    zero up to rounding, e.g. the pair bias's LayerNorm bias under the softmax, is held to
    ``rtol`` of a thousandth of the largest gradient's norm)."""
    (la, ga), (lb, gb) = a, b
    assert abs(la.item() - lb.item()) <= rtol * abs(lb.item())
    assert ga.keys() == gb.keys()
    floor = 1e-3 * max(g.float().norm() for g in gb.values())
    for name in gb:
        err = (ga[name].float() - gb[name].float()).norm()
        assert err <= rtol * max(gb[name].float().norm(), floor), (name, err.item())


@pytest.mark.parametrize("preset", ["bioformer", "evoformer"])
@pytest.mark.parametrize("ckpt", [None, 1])
def test_fused_matches_eager_fp32(preset, ckpt):
    keys = {"blocks_per_ckpt": ckpt, "chunk_size": 4 if preset == "evoformer" else None}
    model = _model(preset, **keys)
    batch = _batch()
    eager = _loss_and_grads(set_fused(model, False), batch)
    fused = _loss_and_grads(set_fused(model, True), batch)
    fused_params = [n for n in fused[1] if "_z." in n or "outer_product_mean" in n]
    assert fused_params and all(fused[1][n].abs().sum() > 0 for n in fused_params)
    _assert_close(fused, eager, 1e-5)


@pytest.mark.parametrize("preset", ["bioformer", "evoformer"])
def test_fused_matches_eager_bf16_autocast(preset):
    model = _model(preset, n_cells_per_msa=2, ln_order="post" if preset == "bioformer" else "pre")
    batch = _batch(s=2)
    eager = _loss_and_grads(set_fused(model, False), batch, bf16=True)
    fused = _loss_and_grads(set_fused(model, True), batch, bf16=True)
    ref = _loss_and_grads(set_fused(model, False), batch)  # fp32: the scale of bf16's error
    err_eager = max((eager[1][n] - ref[1][n]).norm() / ref[1][n].norm() for n in ref[1])
    _assert_close(fused, eager, max(0.05, 2 * float(err_eager)))


@pytest.mark.parametrize("chunk_elements", [1 << 24, 12])
def test_layer_norm_heads_gradcheck_and_reference(chunk_elements, monkeypatch):
    monkeypatch.setattr(fused, "_CHUNK_ELEMENTS", chunk_elements)  # 12: 2 rows per slice
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(9, 5, generator=g, dtype=torch.float64) * 2 + 3).requires_grad_()
    gamma = (1 + 0.1 * torch.randn(5, generator=g, dtype=torch.float64)).requires_grad_()
    beta = (0.1 * torch.randn(5, generator=g, dtype=torch.float64)).requires_grad_()
    w = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: _LayerNormHeads.apply(*a, 1e-5), (x, gamma, beta, w))
    ln = LayerNorm(5).to(torch.float64)
    with torch.no_grad():
        ln.weight.copy_(gamma)
        ln.bias.copy_(beta)
    x3 = x.detach().view(3, 3, 5)
    ref = ref_layer_norm(x3, ln) @ w.detach().t()  # [3, 3, H]
    torch.testing.assert_close(layer_norm_heads(x3, ln, w.detach()), ref.movedim(-1, 0))


def test_compiled_block_matches_eager():
    """One compiled variant, kept small (compilation dominates): ``blocks`` (fused +
    torch.compile of the block) on one checkpointed bioformer block with its outer product
    mean, forward and gradients; inductor's random ops fall back to eager's, so the dropout
    masks agree."""
    import torch._inductor.config as inductor_config

    cfg = ModelConfig.from_dict({**TINY, "n_blocks": 1, "blocks_per_ckpt": 1})
    torch.manual_seed(0)
    stack = randomize_parameters_(EvoformerStack(cfg), seed=3).train()
    g = torch.Generator().manual_seed(1)
    r = L + 1
    m = torch.randn(B, 1, r, cfg.c_m, generator=g, requires_grad=True)
    z = torch.randn(B, r, r, cfg.c_z, generator=g, requires_grad=True)
    msa_mask = torch.ones(B, 1, r)
    msa_mask[0, :, -2:] = 0
    pair_mask = msa_mask[:, 0, :, None] * msa_mask[:, 0, None, :]
    wm, wz = torch.randn(m.shape, generator=g), torch.randn(z.shape, generator=g)

    def run():
        stack.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        mo, zo = stack(m, z, msa_mask, pair_mask)
        loss = (mo * wm).sum() + (zo * wz).sum()
        grads = torch.autograd.grad(loss, [m, z, *stack.parameters()])
        names = ["m", "z", *(n for n, _ in stack.named_parameters())]
        return loss.detach(), dict(zip(names, grads, strict=True))

    eager = run()
    compile_model(stack, "blocks")
    try:
        with inductor_config.patch(fallback_random=True):
            compiled = run()
    finally:
        torch._dynamo.reset()
    _assert_close(compiled, eager, 1e-4)


def test_compile_modes_apply_in_place():
    model = _model("bioformer")
    assert compile_model(model, "model") is model and model._compiled_call_impl is not None
    model = compile_model(_model("bioformer"), "fused")
    blocks = list(model.stack.blocks)
    assert all(b.msa_row_attention.fused for b in blocks)
    assert all(b._compiled_call_impl is None for b in blocks)
    compile_model(model, "blocks")
    assert all(b._compiled_call_impl is not None for b in blocks)
    compile_model(model, "eager")
    assert not any(getattr(m, "fused", False) for m in model.modules())
    assert adamw_options("eager") == adamw_options(False) == {}
    assert adamw_options("fused") == {"fused": True}
    torch._dynamo.reset()


def test_compile_auto_is_the_default_and_picks_per_device():
    """``auto`` (the default) runs :data:`AUTO_COMPILE`'s mode for the device type: ``fused`` on
    a CPU, so a default CPU training runs the fused paths and the fused AdamW; a device type
    without an entry runs ``eager``."""
    assert TrainConfig().compile == AUTO
    assert compile_mode(AUTO, "cpu") == AUTO_COMPILE["cpu"] == "fused"
    assert compile_mode(AUTO, "cuda") == AUTO_COMPILE["cuda"]
    assert compile_mode(AUTO, "mps") == "eager"
    assert adamw_options(AUTO, "cpu") == {"fused": True}
    model = compile_model(_model("bioformer"), TrainConfig().compile)
    assert all(b.msa_row_attention.fused for b in model.stack.blocks)


@pytest.mark.parametrize("value", [True, False, AUTO, *COMPILE_MODES])
def test_train_compile_values(value):
    assert compile_mode(TrainConfig.from_dict({"compile": value}).compile) in COMPILE_MODES


@pytest.mark.parametrize("value", ["fast", "off", 1])
def test_train_compile_bad_value_names_the_key(value):
    with pytest.raises(InputError, match=r"train\.compile"):
        TrainConfig.from_dict({"compile": value})
