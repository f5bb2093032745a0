"""Analytical memory model: the journal's table, parameter counts, agreement with the tracer."""

from __future__ import annotations

import pytest
import torch

from evoformer.memory.analytical import (
    estimate,
    journal_rows,
    journal_table_markdown,
    op_ledger,
    parameter_counts,
)
from evoformer.memory.spec import StepSpec
from evoformer.memory.traced import build_model, trace_step
from evoformer.model import ModelConfig, count_parameters

# The journal's printed table: (B, r, c, n) -> (Q,K,V MB, attention scores MB, outer product MB).
JOURNAL_PRINTED = {
    (32, 500, 128, 4): (8, 128, 524_288),
    (16, 400, 128, 4): (3, 41, 167_772),
    (16, 500, 64, 4): (2, 64, 65_536),
}

SMALL = dict(
    c_m=64, c_z=32, c_opm=16, n_blocks=3, c_hidden_msa=16, c_hidden_pair=16, c_hidden_tri_mul=32
)


def small_spec(preset: str, precision: str = "fp32", device: str = "cuda", **kw) -> StepSpec:
    model_keys = set(ModelConfig.__dataclass_fields__)
    model = {**SMALL, "preset": preset, **{k: v for k, v in kw.items() if k in model_keys}}
    step = {k: v for k, v in kw.items() if k not in model_keys}
    step = {"batch_size": 2, "seq_len": 63, "n_genes": 100, "n_bins": 11, **step}
    return StepSpec(model=ModelConfig(**model), precision=precision, device=device, **step)


def test_journal_table_rows_reproduced_exactly():
    rows = journal_rows()
    assert [(r["B"], r["r"], r["c"], r["n"]) for r in rows] == list(JOURNAL_PRINTED)
    for row in rows:
        qkv, scores, opm = JOURNAL_PRINTED[(row["B"], row["r"], row["c"], row["n"])]
        assert row["qkv_one_mb"] == qkv  # the printed column counts one tensor ...
        assert row["qkv_three_mb"] == round(3 * row["qkv_one_bytes"] / 1e6)  # ... the header three
        assert row["qkv_three_mb"] != qkv
        assert row["scores_mb"] == scores
        assert row["opm_mb"] == opm
    # the text's "~500 GB" and the exact bytes of the first row
    assert rows[0]["opm_bytes"] == 32 * 500**2 * 128**2 * 4 == 524_288_000_000
    # the third row's head dim is c/n = 16 (the journal prints 32; 32 would give 4 MB, not 2)
    assert rows[2]["head_dim"] == 16
    assert journal_rows(((16, 500, 64, 4),))[0]["qkv_one_bytes"] * 2 == 16 * 4 * 500 * 32 * 4
    md = journal_table_markdown()
    assert "524,288 MB" in md and "167,772 MB" in md and "| 41 MB |" in md


@pytest.mark.parametrize("preset", ["none", "bioformer", "evoformer"])
@pytest.mark.parametrize("kw", [{}, {"value_encoder": "continuous", "loss": "mse", "n_labels": 5}])
def test_parameter_counts_match_the_model(preset, kw):
    spec = small_spec(preset, **kw)
    with torch.device("meta"):
        model = build_model(spec)
    counted = count_parameters(model)
    formula = parameter_counts(spec)
    assert formula == {k: counted[k] for k in formula}


# (preset, precision, options): small configs; analytical within 10% of traced
CASES = [
    ("bioformer", "fp32", {}),
    ("bioformer", "bf16", {}),
    ("bioformer", "bf16", {"blocks_per_ckpt": 1}),
    ("bioformer", "fp32", {"chunk_size": 16, "n_cells_per_msa": 3}),
    ("bioformer", "fp32", {"opm": "naive"}),
    ("bioformer", "bf16", {"ln_order": "post", "seq_len": 64}),
    ("evoformer", "fp32", {}),
    ("evoformer", "bf16", {}),
    ("evoformer", "bf16", {"blocks_per_ckpt": 1, "chunk_size": 16}),
    ("evoformer", "fp32", {"opm": "naive", "ln_order": "post"}),
    ("bioformer", "bf16", {"grad_accumulation": 4, "n_genes": 20000}),
    ("none", "fp32", {}),
    ("none", "bf16", {"blocks_per_ckpt": 1}),
]


@pytest.mark.parametrize(("preset", "precision", "kw"), CASES)
def test_analytical_matches_traced_within_10_percent(preset, precision, kw):
    spec = small_spec(preset, precision, **kw)
    a = estimate(spec)
    t = trace_step(spec)
    assert abs(a.peak_bytes / t.peak_bytes - 1) < 0.10, (a.peak_bytes, t.peak_bytes)
    assert a.by_category["parameters"] == pytest.approx(t.by_category["parameters"], rel=0.05)
    assert a.by_category["optimizer"] == pytest.approx(t.by_category["optimizer"], rel=0.05)


@pytest.mark.parametrize("preset", ["none", "evoformer"])
def test_analytical_matches_traced_for_a_cpu_step(preset):
    spec = small_spec(preset, "fp32", device="cpu", n_cells_per_msa=2)
    assert estimate(spec).peak_bytes == pytest.approx(trace_step(spec).peak_bytes, rel=0.10)


def test_kept_ledgers_match_traced_per_op():
    """Per op (summed over blocks) the kept-for-backward bytes agree with MemTracker's."""
    spec = small_spec("evoformer", "fp32")
    a, t = estimate(spec), trace_step(spec)
    for op in (
        "msa_row_attention",
        "outer_product_mean",
        "tri_mul_out",
        "tri_att_start",
        "pair_transition",
    ):
        assert a.by_op[op]["kept"] == pytest.approx(t.by_op[op]["kept"], rel=0.05), op


def test_scaling_naive_opm_and_switches():
    """The naive outer product grows as B r^2 c^2 and dominates; bf16, checkpointing, chunking
    each lower the peak."""
    base = small_spec("bioformer", "fp32", batch_size=4, seq_len=127)
    naive = base.replace(opm="naive")
    comps = estimate(naive).components
    assert comps["opm_outer"] == 2 * 4 * 128 * 128 * 16 * 16 * 4  # two blocks with a pair update
    assert max(comps, key=comps.__getitem__) == "opm_outer"
    p = estimate(base).peak_bytes
    assert estimate(base.replace(precision="bf16")).peak_bytes < p
    assert estimate(base.replace(model={"blocks_per_ckpt": 1})).peak_bytes < p
    evo = small_spec("evoformer", "fp32", seq_len=127)
    assert (
        estimate(evo.replace(model={"chunk_size": 16})).peak_bytes < 0.6 * estimate(evo).peak_bytes
    )
    # the last block has no pair update
    names = [op.name for op in op_ledger(base) if op.block == base.model.n_blocks - 1]
    assert "outer_product_mean" not in names and "msa_row_attention" in names


def test_gradient_accumulation_keeps_all_gradients_through_backward():
    """From the second micro-batch of a cycle on, backward adds to existing gradients."""
    spec = small_spec("bioformer", "fp32", n_genes=20000)  # a large embedding: 5 MiB of grads
    acc = spec.replace(grad_accumulation=2)
    grads = 4 * parameter_counts(spec)["total"]
    t1, t2 = trace_step(spec), trace_step(acc)
    assert t2.by_category["gradients"] == pytest.approx(grads, rel=0.01)
    assert t2.peak_bytes > t1.peak_bytes + 0.8 * (grads - t1.by_category["gradients"])
    assert estimate(acc).peak_bytes == pytest.approx(t2.peak_bytes, rel=0.10)
