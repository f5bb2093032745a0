"""BioFormer: config, forward/loss contract, masking, prior network, parameter counts, tracing."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from evoformer.errors import InputError
from evoformer.model import (
    BioFormer,
    ModelConfig,
    apply_value_mask,
    count_parameters,
    load_prior_network,
)
from evoformer.model.config import OP_SWITCHES

SMALL = dict(
    c_m=16,
    c_z=8,
    c_opm=4,
    n_heads_msa=2,
    c_hidden_msa=4,
    n_heads_pair=2,
    c_hidden_pair=4,
    c_hidden_tri_mul=8,
    transition_n=2,
    n_blocks=2,
)
G, K = 30, 7


def _batch(b=2, s=1, length=9, seed=0, n_labels=0):
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.stack([torch.randperm(G, generator=g)[:length] for _ in range(b * s)]).view(
        b, s, length
    )
    values = torch.randint(0, K, (b, s, length), generator=g)
    n_real = torch.randint(length // 2, length + 1, (b, s), generator=g)
    pad_mask = torch.arange(length) < n_real[..., None]
    masked, loss_mask = apply_value_mask(values, pad_mask, 0.4, K, g)
    batch = {
        "gene_ids": gene_ids,
        "values": masked,
        "pad_mask": pad_mask,
        "target": values,
        "loss_mask": loss_mask,
    }
    if n_labels:
        batch["labels"] = torch.randint(-1, n_labels, (b, s), generator=g)
    return batch


# --------------------------------------------------------------------------- config
def test_config_presets_defaults_overrides_and_round_trip():
    bio = ModelConfig.from_dict({})
    assert bio.preset == "bioformer" and not any(getattr(bio, k) for k in OP_SWITCHES)
    evo = ModelConfig.from_dict({"preset": "evoformer", "tri_att_end": False})
    assert evo.tri_mul_out and evo.column_attention and evo.tri_att_end is False
    d = evo.to_dict()
    assert all(isinstance(d[k], bool) for k in OP_SWITCHES)
    assert ModelConfig.from_dict(d) == evo
    assert d["c_m"] == 128 and d["c_opm"] == 32 and d["chunk_size"] is None


@pytest.mark.parametrize(
    ("d", "key"),
    [
        ({"d_model": 128}, "d_model"),
        ({"preset": "alphafold"}, "preset"),
        ({"c_m": 0}, "c_m"),
        ({"ln_order": "middle"}, "ln_order"),
        ({"dropout_msa": 1.5}, "dropout_msa"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"tri_mul_in": "yes"}, "tri_mul_in"),
        ({"loss": "l1"}, "loss"),
        ({"preset": "none", "tri_mul_out": True}, "tri_mul_out"),
        ({"c_m": "16"}, "c_m"),
        ({"c_m": 16.0}, "c_m"),
        ({"dropout_msa": "high"}, "dropout_msa"),
    ],
)
def test_config_rejects_bad_keys_naming_them(d, key):
    with pytest.raises(InputError, match=key):
        ModelConfig.from_dict(d)


# --------------------------------------------------------------------------- forward / loss
@pytest.mark.parametrize(
    ("preset", "encoder", "loss", "s"),
    [
        ("bioformer", "embedding", "ce", 1),
        ("bioformer", "continuous", "mse", 1),
        ("evoformer", "continuous", "ce", 3),
        ("evoformer", "embedding", "mse", 2),
        ("none", "embedding", "ce", 1),
        ("none", "continuous", "mse", 2),
    ],
)
def test_forward_shapes_and_loss_backward(preset, encoder, loss, s):
    cfg = ModelConfig.from_dict(
        {
            **SMALL,
            "preset": preset,
            "value_encoder": encoder,
            "loss": loss,
            "n_cells_per_msa": s,
            "chunk_size": 4,
            "blocks_per_ckpt": 1,
        }
    )
    model = BioFormer(cfg, n_genes=G, n_bins=K, n_labels=3)
    batch = _batch(s=s, n_labels=3)
    out = model(batch["gene_ids"], batch["values"], batch["pad_mask"])
    b, L = 2, 9
    assert out["pred"].shape == ((b, s, L, K) if loss == "ce" else (b, s, L))
    assert out["cls"].shape == out["mean"].shape == (b, s, cfg.c_m)
    assert out["label_logits"].shape == (b, s, 3)
    if preset == "none":  # the ablation: no pair representation at all
        assert out["z"] is None
        assert not any("pair" in n or "outer_product" in n for n, _ in model.named_parameters())
    else:
        assert out["z"].shape == (b, L + 1, L + 1, cfg.c_z)
    total, metrics = model.loss(batch)
    total.backward()
    assert set(metrics) >= {"value_loss", "label_loss", "bin_acc", "loss"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert math.isclose(
        metrics["loss"], metrics["value_loss"] + metrics["label_loss"], rel_tol=1e-5
    )
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_value_loss_counts_only_loss_mask_positions():
    cfg = ModelConfig.from_dict({**SMALL, "dropout_msa": 0.0})
    model = BioFormer(cfg, n_genes=G, n_bins=K).eval()
    batch = _batch()
    logits = model(batch["gene_ids"], batch["values"], batch["pad_mask"])["pred"]
    w = batch["loss_mask"]
    expected = torch.nn.functional.cross_entropy(logits[w], batch["target"][w])
    loss, metrics = model.loss(batch)
    torch.testing.assert_close(loss, expected)
    acc = (logits[w].argmax(-1) == batch["target"][w]).float().mean().item()
    assert metrics["bin_acc"] == pytest.approx(acc)
    # targets outside the loss mask do not matter
    other = dict(batch, target=torch.where(w, batch["target"], (batch["target"] + 1) % K))
    torch.testing.assert_close(model.loss(other)[0], loss)


def test_padding_does_not_change_real_outputs():
    cfg = ModelConfig.from_dict({**SMALL, "preset": "evoformer", "n_cells_per_msa": 2})
    model = BioFormer(cfg, n_genes=G, n_bins=K, n_labels=2).double().eval()
    batch = _batch(s=2)
    pad = ~batch["pad_mask"]
    pad[:, 0] = pad[:, 0]  # first cell defines the pair mask
    g2 = torch.where(pad, (batch["gene_ids"] + 3) % G, batch["gene_ids"])
    v2 = torch.where(pad, (batch["values"] + 2) % K, batch["values"])
    a = model(batch["gene_ids"], batch["values"], batch["pad_mask"])
    b = model(g2, v2, batch["pad_mask"])
    real = batch["pad_mask"][..., None]
    torch.testing.assert_close(a["pred"] * real, b["pred"] * real)
    for key in ("cls", "mean", "label_logits"):
        torch.testing.assert_close(a[key], b[key])


def test_cls_is_token_zero_and_mean_is_over_real_genes():
    cfg = ModelConfig.from_dict(SMALL)
    model = BioFormer(cfg, n_genes=G, n_bins=K).double().eval()
    batch = _batch(b=1)
    batch["pad_mask"][..., -3:] = False
    out = model(batch["gene_ids"], batch["values"], batch["pad_mask"])
    model.final_layer_norm.register_forward_hook(lambda mod, inp, o: captured.append(o))
    captured: list[torch.Tensor] = []
    model(batch["gene_ids"], batch["values"], batch["pad_mask"])
    m = captured[0]
    torch.testing.assert_close(out["cls"], m[:, :, 0])
    n = int(batch["pad_mask"].sum())
    torch.testing.assert_close(out["mean"], m[:, :, 1 : n + 1].mean(-2))


def test_label_loss_ignores_unknown_labels():
    cfg = ModelConfig.from_dict(SMALL)
    model = BioFormer(cfg, n_genes=G, n_bins=K, n_labels=3).eval()
    batch = _batch(n_labels=3)
    batch["labels"] = torch.tensor([[-1], [-1]])
    _, metrics = model.loss(batch)
    assert metrics["label_loss"] == 0.0
    batch["labels"] = torch.tensor([[2], [-1]])
    logits = model(batch["gene_ids"], batch["values"], batch["pad_mask"])["label_logits"]
    _, metrics = model.loss(batch)
    expected = torch.nn.functional.cross_entropy(logits[0], torch.tensor([2])).item()
    assert metrics["label_loss"] == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- masking
def test_apply_value_mask_counts_positions_and_is_deterministic():
    values = torch.randint(0, K, (3, 2, 20))
    pad_mask = torch.arange(20) < torch.tensor([[20, 11], [5, 0], [1, 19]])[..., None]
    masked, loss_mask = apply_value_mask(
        values, pad_mask, 0.25, K, torch.Generator().manual_seed(7)
    )
    n_real = pad_mask.sum(-1)
    expected = torch.tensor([[round(0.25 * int(n)) for n in row] for row in n_real])
    assert torch.equal(loss_mask.sum(-1), expected)
    assert not (loss_mask & ~pad_mask).any()
    assert torch.equal(masked[loss_mask], torch.full_like(masked[loss_mask], K))
    assert torch.equal(masked[~loss_mask], values[~loss_mask])
    again = apply_value_mask(values, pad_mask, 0.25, K, torch.Generator().manual_seed(7))
    assert torch.equal(again[1], loss_mask)
    other = apply_value_mask(values, pad_mask, 0.25, K, torch.Generator().manual_seed(8))
    assert not torch.equal(other[1], loss_mask)


def test_apply_value_mask_draws_a_share_from_non_zero_genes():
    values = torch.tensor([[[0, 0, 0, 0, 0, 0, 0, 0, 3, 4, 5, 2, 0, 0, 0, 0, 0, 0, 0, 0]]])
    pad = torch.ones_like(values, dtype=torch.bool)
    for frac, n_nonzero in ((None, None), (1.0, 4), (0.25, 2), (0.0, 0)):
        for seed in range(5):
            gen = torch.Generator().manual_seed(seed)
            _, lm = apply_value_mask(values, pad, 0.4, K, gen, nonzero_fraction=frac)
            assert lm.sum() == 8  # round(0.4 * 20)
            if n_nonzero is not None:
                assert int((values[lm] > 0).sum()) == n_nonzero
    # fewer non-zeros than asked for: all of them, the rest from the zeros
    _, lm = apply_value_mask(values, pad, 0.6, K, torch.Generator().manual_seed(0), 1.0)
    assert lm.sum() == 12 and int((values[lm] > 0).sum()) == 4


def test_preset_none_refuses_a_prior():
    cfg = ModelConfig.from_dict({**SMALL, "preset": "none"})
    with pytest.raises(ValueError, match="preset none"):
        BioFormer(cfg, n_genes=G, n_bins=K, prior=torch.zeros(G, G))


# --------------------------------------------------------------------------- prior network
def test_load_prior_network(tmp_path):
    genes = ["A", "B", "C", "D"]
    path = tmp_path / "net.tsv"
    path.write_text(
        "source\ttarget\tweight\tsign\tx\nA\tB\t0.5\t-1\tq\nC\tA\t2\t1\tq\n"
        "Z\tA\t1\t1\tq\nC\tA\t1\t1\tq\n"
    )
    prior = load_prior_network(path, genes)
    expected = torch.zeros(4, 4)
    expected[0, 1] = -0.5
    expected[2, 0] = 3.0  # duplicate edges add up; unknown gene Z ignored
    assert torch.equal(prior, expected)
    plain = tmp_path / "plain.tsv"
    plain.write_text("source\ttarget\nB\tD\n")
    assert load_prior_network(plain, genes)[1, 3] == 1.0


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("src\ttarget\nA\tB\n", "'source'"),
        ("source\ttgt\nA\tB\n", "'target'"),
        ("source\ttarget\tweight\nA\tB\tbig\n", "'weight'"),
        ("source\ttarget\tsign\nA\tB\t2\n", "'sign'"),
    ],
)
def test_load_prior_network_rejects_bad_files(tmp_path, text, match):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as err:
        load_prior_network(path, ["A", "B"])
    assert "bad.tsv" in str(err.value)
    with pytest.raises(InputError, match="missing.tsv"):
        load_prior_network(tmp_path / "missing.tsv", ["A"])


def test_load_prior_network_refuses_other_gene_identifiers(tmp_path):
    """A network in other identifiers would become an all-zero matrix: refused, naming the key."""
    path = tmp_path / "ensembl.tsv"
    path.write_text("source\ttarget\nENSG1\tENSG2\nENSG3\tENSG2\n")
    with pytest.raises(InputError, match="min_gene_share") as err:
        load_prior_network(path, ["A", "B", "C"])
    assert "ensembl.tsv" in str(err.value) and "0 of the network's 3 genes" in str(err.value)
    half = tmp_path / "half.tsv"
    half.write_text("source\ttarget\nA\tB\nX\tY\nX\tZ\nY\tZ\n")  # 2 of 5 genes known
    with pytest.raises(InputError, match="overlap 0.67 < "):
        load_prior_network(half, ["A", "B", "C"], min_gene_share=0.8)
    assert load_prior_network(half, ["A", "B", "C"], min_gene_share=0.5)[0, 1] == 1.0


def test_prior_enters_the_pair_representation():
    cfg = ModelConfig.from_dict({**SMALL, "n_blocks": 1})
    prior = torch.zeros(G, G)
    torch.manual_seed(0)
    with_prior = BioFormer(cfg, n_genes=G, n_bins=K, prior=prior).eval()
    batch = _batch(b=1)
    ids = batch["gene_ids"][0, 0]
    args = (batch["gene_ids"], batch["values"], batch["pad_mask"])
    _, z0, _, _ = with_prior.embed(*args)
    with_prior.prior[ids[0], ids[1]] = 1.5  # edge gene0 -> gene1
    _, z1, _, _ = with_prior.embed(*args)
    changed = (z1 - z0).abs().sum(-1) > 0
    expected = torch.zeros_like(changed)
    expected[0, 1, 2] = True  # token positions are shifted by CLS
    assert torch.equal(changed, expected)
    assert "prior" in with_prior.state_dict()
    with pytest.raises(ValueError, match="prior"):
        BioFormer(cfg, n_genes=G, n_bins=K, prior=torch.zeros(3, 3))


# --------------------------------------------------------------------------- counts, tracing
def test_count_parameters_per_component():
    cfg = ModelConfig.from_dict({**SMALL, "preset": "evoformer", "tri_att_end": False})
    model = BioFormer(cfg, n_genes=G, n_bins=K, n_labels=4)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["tri_att_end"] == 0 and counts["tri_att_start"] > 0
    assert counts["embeddings"] == G * 16 + 16 + (K + 1) * 16 + 2 * 16
    # the last block has no pair updates (nothing reads its z)
    assert counts["outer_product_mean"] == (cfg.n_blocks - 1) * (
        2 * (16 * 4 + 4) + 16 * 8 + 8 + 2 * 16
    )
    assert count_parameters(model.stack.blocks[0])["tri_att_start"] == counts["tri_att_start"]
    assert count_parameters(model.stack.blocks[-1])["tri_att_start"] == 0
    assert "other" not in counts


@pytest.mark.parametrize("preset", ["none", "bioformer", "evoformer"])
def test_runs_under_fake_tensor_mode(preset):
    cfg = ModelConfig.from_dict({**SMALL, "preset": preset, "chunk_size": 3, "blocks_per_ckpt": 1})
    with FakeTensorMode():
        model = BioFormer(cfg, n_genes=G, n_bins=K, n_labels=2)
        b, s, length = 4, 1, 50
        batch = {
            "gene_ids": torch.zeros(b, s, length, dtype=torch.long),
            "values": torch.zeros(b, s, length, dtype=torch.long),
            "pad_mask": torch.ones(b, s, length, dtype=torch.bool),
            "target": torch.zeros(b, s, length, dtype=torch.long),
            "loss_mask": torch.ones(b, s, length, dtype=torch.bool),
            "labels": torch.zeros(b, s, dtype=torch.long),
        }
        loss, metrics = model.loss(batch)
        loss.backward()
        assert loss.shape == ()
        assert all(math.isnan(v) for v in metrics.values())


def test_bf16_autocast_keeps_streams_in_bf16():
    cfg = ModelConfig.from_dict({**SMALL, "preset": "evoformer", "chunk_size": 4})
    model = BioFormer(cfg, n_genes=G, n_bins=K)
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch["gene_ids"], batch["values"], batch["pad_mask"])
        loss, metrics = model.loss(batch)
    assert out["z"].dtype == torch.bfloat16 and out["cls"].dtype == torch.bfloat16
    loss.backward()
    assert math.isfinite(metrics["loss"])
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
