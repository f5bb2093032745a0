"""How a signed, weighted prior network enters BioFormer (evoformer.model.prior): ``init`` (into
the initial z), ``bias`` (of every row attention), ``both``, on a hand-made 3-gene network."""

from __future__ import annotations

import pytest
import torch

from evoformer.errors import InputError
from evoformer.evaluate import load_model
from evoformer.memory.analytical import parameter_counts
from evoformer.memory.spec import StepSpec, data_shape, spec_from_config
from evoformer.model import BioFormer, ModelConfig, count_parameters
from evoformer.model.prior import (
    PRIOR_MODES,
    PriorAttentionBias,
    check_prior_mode,
    prior_mode_of_state,
)

CFG = ModelConfig.from_dict(
    dict(c_m=16, c_z=8, c_opm=4, n_heads_msa=2, c_hidden_msa=4, n_blocks=2, dropout_msa=0.0)
)
A, B, C, D = 0, 1, 2, 3  # genes; D has no edge
G, K = 4, 5
H = CFG.n_heads_msa


def network() -> torch.Tensor:
    """A -> B activating (weight 1), A -> C repressing (weight 0.5): prior[s, t] = w * sign."""
    prior = torch.zeros(G, G)
    prior[A, B] = 1.0
    prior[A, C] = -0.5
    return prior


def cell(order=(C, A, B, D)):
    """One cell whose tokens are the genes in ``order`` (token i + 1 after CLS)."""
    gene_ids = torch.tensor(order).view(1, 1, -1)
    values = torch.tensor([1, 2, 3, 4][: len(order)]).view(1, 1, -1)
    pad_mask = torch.ones_like(gene_ids, dtype=torch.bool)
    return gene_ids, values, pad_mask


def pos(order, gene):
    """Row / column of ``gene`` in the ``[r, r]`` pair maps (CLS is 0)."""
    return list(order).index(gene) + 1


def models(mode, prior=None):
    """(no-prior model, prior model) with the same shared weights."""
    torch.manual_seed(0)
    off = BioFormer(CFG, n_genes=G, n_bins=K).eval()
    on = BioFormer(CFG, n_genes=G, n_bins=K, prior=network() if prior is None else prior,
                   prior_mode=mode).eval()  # fmt: skip
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("prior") for k in missing)
    return off, on


def row_attention_biases(model, batch):
    """The bias each block's row attention hands to its attention: ``[1, 1, H, r, r]`` each."""
    seen = []
    hooks = [
        blk.msa_row_attention.op.mha.register_forward_pre_hook(
            lambda mod, args: seen.append(args[1].detach().clone())
        )
        for blk in model.stack.blocks
    ]
    with torch.no_grad():
        model(*batch)
    for h in hooks:
        h.remove()
    return seen


# --------------------------------------------------------------------------- init (the default)
def test_init_mode_shifts_z_of_connected_pairs_by_the_projection_of_the_signed_weight():
    order = (C, A, B, D)
    off, on = models("init")
    batch = cell(order)
    with torch.no_grad():
        dz = on.embed(*batch)[1][0] - off.embed(*batch)[1][0]  # [r, r, c_z]
    w, c = on.prior_proj.weight, on.prior_proj.bias  # [c_z, 2], [c_z]
    a, b, cc, d = (pos(order, g) for g in (A, B, C, D))
    atol = 1e-6
    # connected pairs: W [p, 1] + c; the sign and weight enter through p
    torch.testing.assert_close(dz[a, b], w[:, 0] * 1.0 + w[:, 1] + c, atol=atol, rtol=0)
    torch.testing.assert_close(dz[a, cc], w[:, 0] * -0.5 + w[:, 1] + c, atol=atol, rtol=0)
    torch.testing.assert_close(dz[a, b] - dz[a, cc], 1.5 * w[:, 0], atol=atol, rtol=0)
    # unconnected pairs (the reverse direction too, and CLS): the constant c only
    for i, j in [(b, a), (cc, a), (b, cc), (d, a), (a, d), (0, a), (a, 0), (d, d)]:
        torch.testing.assert_close(dz[i, j], c, atol=atol, rtol=0)
    # flipping the sign of A -> B moves z[A, B] by 2 |w| W[:, 0]
    flipped = network()
    flipped[A, B] = -1.0
    on.prior.copy_(flipped)
    with torch.no_grad():
        dz_flip = on.embed(*batch)[1][0] - off.embed(*batch)[1][0]
    torch.testing.assert_close(dz[a, b] - dz_flip[a, b], 2.0 * w[:, 0], atol=atol, rtol=0)
    # init mode adds no bias of its own to the row attention
    assert on.prior_bias is None and on.prior_attention_bias(batch[0]) is None


def test_init_mode_follows_the_genes_not_the_token_positions():
    off, on = models("init")
    with torch.no_grad():
        z1 = on.embed(*cell((C, A, B, D)))[1][0] - off.embed(*cell((C, A, B, D)))[1][0]
        z2 = on.embed(*cell((B, D, A, C)))[1][0] - off.embed(*cell((B, D, A, C)))[1][0]
    for s, t in [(A, B), (A, C), (B, A), (D, C)]:
        torch.testing.assert_close(
            z1[pos((C, A, B, D), s), pos((C, A, B, D), t)],
            z2[pos((B, D, A, C), s), pos((B, D, A, C), t)],
        )


# --------------------------------------------------------------------------- bias
def test_bias_mode_leaves_z_alone_and_starts_as_the_model_without_a_prior():
    off, on = models("bias")
    batch = cell()
    with torch.no_grad():
        torch.testing.assert_close(on.embed(*batch)[1], off.embed(*batch)[1], atol=0, rtol=0)
        out_on, out_off = on(*batch), off(*batch)
    # zero-initialised weights: no effect until training moves them
    assert torch.count_nonzero(on.prior_bias.weight) == 0
    torch.testing.assert_close(out_on["pred"], out_off["pred"], atol=0, rtol=0)
    assert on.prior_proj is None


def test_bias_mode_adds_the_documented_per_head_bias_to_every_row_attention():
    order = (C, A, B, D)
    off, on = models("bias")
    u, v, x, y = (
        torch.tensor([0.7, -1.3]),
        torch.tensor([0.2, 0.4]),
        torch.tensor([-0.9, 0.5]),
        torch.tensor([0.3, -0.6]),
    )
    with torch.no_grad():
        on.prior_bias.weight.copy_(torch.stack([u, v, x, y], dim=-1))  # [H, 4]
    batch = cell(order)
    bias = on.prior_attention_bias(batch[0]).detach()[0, 0]  # [H, r, r]
    a, b, cc, d = (pos(order, g) for g in (A, B, C, D))
    atol = 1e-6
    # out-edges of the query: u p + v; in-edges (the query is the target): x p + y
    torch.testing.assert_close(bias[:, a, b], u * 1.0 + v, atol=atol, rtol=0)
    torch.testing.assert_close(bias[:, a, cc], u * -0.5 + v, atol=atol, rtol=0)
    torch.testing.assert_close(bias[:, b, a], x * 1.0 + y, atol=atol, rtol=0)
    torch.testing.assert_close(bias[:, cc, a], x * -0.5 + y, atol=atol, rtol=0)
    # unconnected pairs, D, and the CLS row and column: exactly 0
    zero = torch.ones_like(bias[0], dtype=torch.bool)
    for i, j in [(a, b), (a, cc), (b, a), (cc, a)]:
        zero[i, j] = False
    assert torch.count_nonzero(bias[:, zero]) == 0
    # it reaches every block's row attention on top of z's pair bias (block 0: same z, same m)
    seen_on, seen_off = row_attention_biases(on, batch), row_attention_biases(off, batch)
    assert len(seen_on) == CFG.n_blocks
    torch.testing.assert_close(seen_on[0] - seen_off[0], bias[None, None], atol=1e-5, rtol=0)
    # a sign flip flips the value terms only
    on.prior[A, B] = -1.0
    flipped = on.prior_attention_bias(batch[0]).detach()[0, 0]
    torch.testing.assert_close(flipped[:, a, b], -u + v, atol=atol, rtol=0)
    torch.testing.assert_close(flipped[:, b, a], -x + y, atol=atol, rtol=0)


def test_bias_weights_learn_from_zero():
    _, on = models("bias")
    on.train()
    gene_ids, values, pad_mask = cell()
    target = values.clone()
    masked = values.clone()
    masked[0, 0, 1] = K  # mask gene A's value
    # linear_o starts at 0 (AF2's "final" init): give the attention an output so the gradient
    # reaches the logits, as it does after the first optimizer steps
    for blk in on.stack.blocks:
        torch.nn.init.normal_(blk.msa_row_attention.op.mha.linear_o.weight, std=0.1)
    loss, _ = on.loss(
        {
            "gene_ids": gene_ids,
            "values": masked,
            "pad_mask": pad_mask,
            "target": target,
            "loss_mask": masked == K,
        }
    )
    on.zero_grad()
    loss.backward()
    assert on.prior_bias.weight.grad is not None
    assert torch.count_nonzero(on.prior_bias.weight.grad) > 0


# --------------------------------------------------------------------------- both, off
def test_both_mode_does_init_and_bias():
    order = (C, A, B, D)
    _, init = models("init")
    _, both = models("both")
    both.prior_proj.load_state_dict(init.prior_proj.state_dict())
    batch = cell(order)
    with torch.no_grad():
        torch.testing.assert_close(both.embed(*batch)[1], init.embed(*batch)[1], atol=0, rtol=0)
        both.prior_bias.weight.fill_(1.0)
        bias = both.prior_attention_bias(batch[0])[0, 0]
    a, b = pos(order, A), pos(order, B)
    assert float(bias[0, a, b]) == pytest.approx(2.0) and float(bias[0, b, a]) == pytest.approx(2.0)


def test_without_a_prior_there_are_no_prior_weights_and_no_bias():
    off, _ = models("init")
    assert off.prior is None and off.prior_proj is None and off.prior_bias is None
    assert off.prior_mode is None and off.prior_attention_bias(cell()[0]) is None
    assert not any("prior" in k for k in off.state_dict())
    assert prior_mode_of_state(off.state_dict()) is None


@pytest.mark.parametrize("mode", PRIOR_MODES)
def test_saved_models_come_back_with_their_mode(tmp_path, mode):
    _, on = models(mode)
    with torch.no_grad():
        if on.prior_bias is not None:
            on.prior_bias.weight.normal_()
    assert prior_mode_of_state(on.state_dict()) == mode
    path = tmp_path / "model.pt"
    torch.save(
        {"model": on.state_dict(), "model_config": CFG.to_dict(), "n_genes": G, "n_bins": K}, path
    )
    back, _ = load_model(path, ["A", "B", "C", "D"])
    assert back.prior_mode == mode
    batch = cell()
    with torch.no_grad():
        torch.testing.assert_close(back(*batch)["pred"], on(*batch)["pred"], atol=0, rtol=0)


def test_unknown_modes_are_refused():
    with pytest.raises(ValueError, match="prior_mode"):
        BioFormer(CFG, n_genes=G, n_bins=K, prior=network(), prior_mode="sideways")
    with pytest.raises(InputError, match=r"experiment\.prior\.mode.*'sideways'"):
        check_prior_mode("sideways")
    with pytest.raises(InputError, match="prior_mode"):
        StepSpec(model=CFG, batch_size=1, seq_len=4, n_genes=G, n_bins=K, prior=True,
                 prior_mode="sideways")  # fmt: skip


# --------------------------------------------------------------------------- memory estimate
@pytest.mark.parametrize("mode", PRIOR_MODES)
def test_the_memory_estimate_counts_the_prior_weights_of_each_mode(mode):
    shape = data_shape(G, K, prior=True, prior_mode=mode)
    spec = spec_from_config(CFG, {"micro_batch_size": 1}, shape, device="cpu")
    assert spec.prior and spec.prior_mode == mode
    _, on = models(mode)
    counted = count_parameters(on)
    formula = parameter_counts(spec)
    assert formula == {k: counted[k] for k in formula}
    expected = (3 * CFG.c_z if mode != "bias" else 0) + (
        PriorAttentionBias.N_FEATURES * H if mode != "init" else 0
    )
    no_prior = parameter_counts(StepSpec(model=CFG, batch_size=1, seq_len=G, n_genes=G, n_bins=K))
    assert formula["pair_init"] - no_prior["pair_init"] == expected
