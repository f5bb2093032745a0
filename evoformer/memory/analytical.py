"""Analytical estimate: closed-form bytes of a training step, op by op.

Two parts.

**The journal's table** (:func:`journal_rows`). The researcher's journal sized three tensors per
configuration (batch ``B``, length ``r``, model dim ``c``, heads ``n``, head dim ``c' = c/n``),
fp32, in decimal megabytes (1 MB = 10^6 bytes), rounded to the nearest MB:

* Q, K, V: the header says ``B n r c' 3``; the printed numbers are ``B n r c'`` (one tensor).
  :func:`journal_rows` returns both (``qkv_one_mb`` reproduces the column, ``qkv_three_mb`` is
  the header's formula).
* attention scores ``B n r r``;
* the parallelised outer product ``B r^2 c^2``.

It uses ``r = n_hvg = 500``, not ``r = n_hvg + 1 = 501`` (with 501 the outer product is
526,385 MB), and its third row lists ``c' = 32`` although ``c/n = 64/4 = 16``: its 2 MB is the
``c' = 16`` value (``c' = 32`` would print 4 MB).

**The training-step model** (:func:`estimate`). Every Evoformer op of
:mod:`evoformer.model` is a ledger of the tensors autograd keeps for backward (named, with
closed-form sizes in ``B, S, r, c_m, c_z, c_opm, heads, c_hidden``, the activation dtype and the
chunk size), the extra bytes at its forward peak, the extra bytes at its backward peak and the
gradient bytes of its parameters. The step is then replayed: the forward adds each op's kept
tensors; the backward walks the ops in reverse, the peak is the largest "kept so far + live
gradients + op's backward extra"; with activation checkpointing each checkpointed group keeps
only its inputs in forward and recomputes its ledger in backward. Static terms: fp32
parameters ``P``, fp32 gradients (allocated op by op during backward; all of them from the
start with gradient accumulation), AdamW's two fp32 moments ``2P`` (plus foreach AdamW's
``sqrt(v)``, ``P``, during the optimizer step on CUDA), DDP's gradient buckets ``P`` with more
than one process and, under bf16 autocast, the bf16 copies of the weights autocast keeps.

Sizes: ``N_m = B S r`` MSA tokens, ``N_z = B r^2`` pair entries, ``e`` bytes per activation
(4 fp32, 2 bf16). The sizes below are those of the model as implemented (SDPA attention, the
rank-folded outer product mean, checkpointed chunks); the CUDA device uses the memory-efficient
SDPA kernel (keeps ``q, k, v, bias, out`` and a ``[N, H, ceil(r/32)*32]`` fp32 log-sum-exp,
pads an unaligned bias to 8 columns), the CPU device an explicit softmax (keeps scaled ``q, k``,
``v`` and the ``[N, H, r, r]`` probabilities).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from evoformer.memory.spec import StepSpec
from evoformer.model.checkpointing import pinned_bytes

MB = 10**6
GIB = 2**30


def human_bytes(b: float | int | None) -> str:
    """``1.23 GiB`` / ``45.6 MiB`` / ``7.8 KiB`` (binary units); ``—`` for None."""
    if b is None:
        return "—"
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{b / size:,.2f} {unit}" if abs(b) < 10 * size else f"{b / size:,.1f} {unit}"
    return f"{int(b)} B"


#: The journal's configurations (inputs, not results): (B, r, c, n_heads).
JOURNAL_CONFIGS: tuple[tuple[int, int, int, int], ...] = (
    (32, 500, 128, 4),
    (16, 400, 128, 4),
    (16, 500, 64, 4),
)


# ====================================================================== the journal's table
def journal_rows(
    configs: tuple[tuple[int, int, int, int], ...] = JOURNAL_CONFIGS, bytes_per: int = 4
) -> list[dict[str, Any]]:
    """The journal's memory table, recomputed from its formulas.

    Args:
        configs: ``(B, r, c, n)`` per row.
        bytes_per: bytes per element (the journal: fp32, 4).

    Returns:
        one dict per row: ``B, r, c, n, head_dim`` (``c // n``), the bytes ``qkv_one_bytes``
        (``B n r c'``), ``qkv_three_bytes`` (``3 B n r c'``, the header's formula),
        ``scores_bytes`` (``B n r r``), ``opm_bytes`` (``B r^2 c^2``) and the same in decimal MB
        rounded to the nearest integer as printed (``*_mb``).
    """
    rows = []
    for b, r, c, n in configs:
        hd = c // n
        row: dict[str, Any] = {"B": b, "r": r, "c": c, "n": n, "head_dim": hd}
        row["qkv_one_bytes"] = b * n * r * hd * bytes_per
        row["qkv_three_bytes"] = 3 * row["qkv_one_bytes"]
        row["scores_bytes"] = b * n * r * r * bytes_per
        row["opm_bytes"] = b * r * r * c * c * bytes_per
        for key in ("qkv_one", "qkv_three", "scores", "opm"):
            row[f"{key}_mb"] = round(row[f"{key}_bytes"] / MB)
        rows.append(row)
    return rows


def journal_table_markdown(rows: list[dict[str, Any]] | None = None) -> str:
    """The journal's table as printed (QKV = one tensor), plus the header's 3-tensor QKV column."""
    rows = rows if rows is not None else journal_rows()
    lines = [
        "| B | r | c | n | c' = c/n | Q, K, V (one tensor, as printed) | Q, K, V (x3, header) "
        "| attention scores | parallelised outer product |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in rows:
        lines.append(
            f"| {x['B']} | {x['r']} | {x['c']} | {x['n']} | {x['head_dim']} | {x['qkv_one_mb']:,} MB "
            f"| {x['qkv_three_mb']:,} MB | {x['scores_mb']:,} MB | {x['opm_mb']:,} MB |"
        )
    return "\n".join(lines)


# ====================================================================== parameters
def _linear(c_in: int, c_out: int, bias: bool = True) -> int:
    return c_in * c_out + (c_out if bias else 0)


def _ln(c: int) -> int:
    return 2 * c


def _attention(c_in: int, d: int, h: int) -> int:
    """Gated attention: q, k, v (no bias), gate (bias), output (bias)."""
    return 3 * _linear(c_in, h * d, False) + _linear(c_in, h * d) + _linear(h * d, c_in)


def _prior_parameters(spec: StepSpec) -> int:
    """The prior's weights: ``init`` its projection into ``z`` (``Linear(2, c_z)``), ``bias``
    4 weights per row-attention head (:class:`evoformer.model.prior.PriorAttentionBias`)."""
    if not spec.prior:
        return 0
    init = _linear(2, spec.model.c_z) if spec.prior_mode in ("init", "both") else 0
    return init + (4 * spec.model.n_heads_msa if spec.prior_mode in ("bias", "both") else 0)


def _prior_tensors(spec: StepSpec) -> int:
    """Parameter tensors of the prior: weight and bias of ``init``, one weight of ``bias``."""
    if not spec.prior:
        return 0
    return (2 if spec.prior_mode in ("init", "both") else 0) + (
        1 if spec.prior_mode in ("bias", "both") else 0
    )


def parameter_counts(spec: StepSpec) -> dict[str, int]:
    """Trainable parameters per component, closed form (keys as ``count_parameters``).

    The last block has no pair update (nothing reads its ``z``), so the outer product mean and
    the pair stack exist in ``n_blocks - 1`` blocks.
    """
    m = spec.model
    cm, cz, c = m.c_m, m.c_z, m.c_opm
    nb, nbp = m.n_blocks, (m.n_blocks - 1 if m.uses_pair else 0)
    k = spec.n_bins
    if m.value_encoder == "embedding":
        value_enc = (k + 1) * cm
    else:
        value_enc = _linear(1, cm) + _linear(cm, cm) + _ln(cm) + cm
    counts = {
        "embeddings": spec.n_genes * cm + cm + value_enc + _ln(cm),
        "pair_init": (2 * _linear(cm, cz) + _prior_parameters(spec)) if m.uses_pair else 0,
        "msa_row_attention": nb
        * (
            _ln(cm)
            + (_ln(cz) + _linear(cz, m.n_heads_msa, False) if m.uses_pair else 0)
            + _attention(cm, m.c_hidden_msa, m.n_heads_msa)
        ),
        "msa_column_attention": nb * (_ln(cm) + _attention(cm, m.c_hidden_msa, m.n_heads_msa))
        if m.column_attention
        else 0,
        "msa_transition": nb
        * (_ln(cm) + _linear(cm, m.transition_n * cm) + _linear(m.transition_n * cm, cm)),
        "outer_product_mean": nbp
        * (_ln(cm if m.ln_order == "pre" else cz) + 2 * _linear(cm, c) + _linear(c * c, cz)),
    }
    ch = m.c_hidden_tri_mul
    tri_mul = _ln(cz) + 4 * _linear(cz, ch) + _ln(ch) + _linear(ch, cz) + _linear(cz, cz)
    tri_att = (
        _ln(cz)
        + _linear(cz, m.n_heads_pair, False)
        + _attention(cz, m.c_hidden_pair, m.n_heads_pair)
    )
    pair_tr = _ln(cz) + _linear(cz, m.transition_n * cz) + _linear(m.transition_n * cz, cz)
    counts["tri_mul_out"] = nbp * tri_mul if m.tri_mul_out else 0
    counts["tri_mul_in"] = nbp * tri_mul if m.tri_mul_in else 0
    counts["tri_att_start"] = nbp * tri_att if m.tri_att_start else 0
    counts["tri_att_end"] = nbp * tri_att if m.tri_att_end else 0
    counts["pair_transition"] = nbp * pair_tr if m.pair_transition else 0
    n_out = k if m.loss == "ce" else 1
    counts["heads"] = (
        (_ln(cm) if m.ln_order == "pre" else 0)
        + _linear(cm, cm)
        + _linear(cm, n_out)
        + (_linear(cm, spec.n_labels) if spec.n_labels > 0 else 0)
    )
    counts["total"] = sum(counts.values())
    return counts


# ====================================================================== per-op ledgers
@dataclass
class OpMemory:
    """Memory of one op (one Residual update of one block, or the embedding / head).

    Attributes:
        name: op name (``msa_row_attention``, ``outer_product_mean``, ...).
        block: block index (-1 for embedding / head).
        kept: named tensors (bytes) autograd keeps from this op's forward until its backward,
            including the new residual stream the op outputs.
        fwd_extra: bytes above ``kept`` alive at the op's forward peak (freed temporaries).
        bwd_extra: bytes above the memory at the start of the op's backward alive at its peak
            (gradients of its intermediates while its kept tensors still exist).
        grad_bytes: fp32 gradient bytes of its parameters (allocated in its backward).
    """

    name: str
    block: int
    kept: dict[str, int]
    fwd_extra: int = 0
    bwd_extra: int = 0
    grad_bytes: int = 0

    @property
    def kept_bytes(self) -> int:
        return sum(self.kept.values())


def _ceil(x: int, k: int) -> int:
    return -(-x // k) * k


class _Dims:
    """Sizes of one step (see the module docstring)."""

    def __init__(self, spec: StepSpec) -> None:
        m = spec.model
        self.spec = spec
        self.B, self.S, self.r, self.L = spec.batch_size, spec.S, spec.r, spec.seq_len
        self.cm, self.cz, self.c = m.c_m, m.c_z, m.c_opm
        self.Hm, self.dm = m.n_heads_msa, m.c_hidden_msa
        self.Hp, self.dp = m.n_heads_pair, m.c_hidden_pair
        self.ch, self.n = m.c_hidden_tri_mul, m.transition_n
        self.e = spec.bytes_act
        self.bf16 = spec.precision == "bf16"
        self.Nm = self.B * self.S * self.r
        self.pair = m.uses_pair  # preset none: no pair representation
        self.Nz = self.B * self.r * self.r if self.pair else 0
        self.pre = m.ln_order == "pre"
        self.chunk = m.chunk_size
        self.cuda = spec.device == "cuda"

    def chunked(self, n: int) -> bool:
        """Whether a dim of size ``n`` is processed in chunks."""
        return self.chunk is not None and n > self.chunk


def _attention_kept(
    d: _Dims, n_batch: int, q_len: int, h: int, hd: int, bias_bytes: int
) -> dict[str, int]:
    """Gated attention over ``n_batch`` sequences of ``q_len``: what is kept for backward.

    ``bias_bytes``: the attention bias as the kernel keeps it (CUDA) - ignored on CPU, where the
    math kernel keeps the probabilities instead.
    """
    e = d.e
    tok = n_batch * q_len * h * hd * e
    kept = {"qkv": 3 * tok, "attn_out": tok, "gate_sigmoid": tok, "gated_out": tok}
    if d.cuda:
        kept["attention_bias"] = bias_bytes
        kept["logsumexp"] = n_batch * h * _ceil(q_len, 32) * 4
    else:  # CPU: explicit softmax, half-precision attention computed in fp32
        kept["qkv"] = 3 * n_batch * q_len * h * hd * 4
        kept["attention_probs"] = n_batch * h * q_len * q_len * 4
    return kept


def _attention_bwd(
    d: _Dims, n_batch: int, q_len: int, h: int, hd: int, c_in: int, bias_grad: int
) -> int:
    """Extra bytes at the peak of a gated attention's backward (the SDPA backward call)."""
    e = d.e
    tok = n_batch * q_len * h * hd * e
    # grad of the attention output and of the gate's input, dq/dk/dv and the bias gradient,
    # less the gate's sigmoid and the gated output (freed by the earlier backward nodes)
    extra = tok + n_batch * q_len * c_in * e + 3 * tok + bias_grad - 2 * tok
    if not d.cuda:  # explicit softmax: gradient of the probabilities and of the logits (fp32)
        extra += 2 * n_batch * h * q_len * q_len * 4
    return extra


def _bias_padded(d: _Dims, k_len: int) -> int:
    """Elements per bias row as the CUDA memory-efficient kernel keeps it.

    SDPA re-lays out a bias whose row stride is not a multiple of 8 elements as
    ``pad(bias, 8 - K % 8)[..., :K]``. (:func:`evoformer.model.primitives.attention` hands the
    kernel a bias with a unit last-dim stride; a strided one would send CUDA to the math kernel.)
    """
    if d.cuda and k_len % 8:
        return k_len + 8 - k_len % 8
    return k_len


def _ln_stats(n: int) -> int:
    return 2 * n * 4


def _residual_in(d: _Dims, n_tok: int, c: int) -> dict[str, int]:
    """What the Residual wrapper keeps: LayerNorm output + stats (pre) or the sum + stats (post)."""
    if d.pre:
        return {"ln_out": n_tok * c * d.e, "ln_stats": _ln_stats(n_tok)}
    return {"post_ln_in": n_tok * c * d.e, "ln_stats": _ln_stats(n_tok)}


def _row_attention(d: _Dims) -> OpMemory:
    if not d.pair:
        return _row_attention_without_pair(d)
    e, B, S, r = d.e, d.B, d.S, d.r
    kept = _residual_in(d, d.Nm, d.cm)
    kept["pair_ln_out"] = d.Nz * d.cz * e
    kept["pair_ln_stats"] = _ln_stats(d.Nz)
    bias = B * S * d.Hm * r * _bias_padded(d, r) * e
    kept.update(_attention_kept(d, B * S, r, d.Hm, d.dm, bias))
    if d.spec.model.dropout_msa > 0:
        kept["dropout_mask"] = B * r * d.cm * e
    kept["msa_stream"] = d.Nm * d.cm * e
    # CUDA: pair bias + key mask summed into one [B, S, H, r, r] bias (and its gradient);
    # CPU: both added in place to the logits, the pair-bias gradient reduced over S
    bias_full = B * S * d.Hm * r * r * e if d.cuda else 0
    bias_grad = B * S * d.Hm * r * _ceil(r, 16) * e if d.cuda else d.Nz * d.Hm * e
    sdpa = _attention_bwd(d, B * S, r, d.Hm, d.dm, d.cm, bias_grad) + d.Nm * d.cm * e
    # bias gradient and its un-padded copy; then the pair-bias gradient (summed over S) gives
    # grad LN(z) [B, r, r, c_z], which replaces the kept LN(z) before grad z is formed
    pair = max(bias_grad + bias_full - bias, d.Nz * d.cz * e + d.Nz * d.Hm * e)
    logits = 0 if d.cuda else B * S * d.Hm * r * r * 4  # CPU: logits next to probabilities
    fwd = max(bias_full + logits + d.Nz * d.Hm * e, d.Nm * d.cm * e)
    return OpMemory("msa_row_attention", 0, kept, fwd_extra=fwd, bwd_extra=max(sdpa, pair))


def _row_attention_without_pair(d: _Dims) -> OpMemory:
    """Preset none: the bias is the key mask alone, a broadcast view ``[B*S, H, r, r]`` of a
    ``[B, S, r]`` tensor (never materialised), with no gradient; on CPU it is added in place
    to the logits of the explicit softmax."""
    e, B, S, r = d.e, d.B, d.S, d.r
    kept = _residual_in(d, d.Nm, d.cm)
    bias = B * S * r * e
    kept.update(_attention_kept(d, B * S, r, d.Hm, d.dm, bias))
    sdpa = _attention_bwd(d, B * S, r, d.Hm, d.dm, d.cm, 0) + d.Nm * d.cm * e
    logits = 0 if d.cuda else B * S * d.Hm * r * r * 4  # CPU: logits next to probabilities
    if d.spec.model.dropout_msa > 0:
        kept["dropout_mask"] = B * r * d.cm * e
    kept["msa_stream"] = d.Nm * d.cm * e
    fwd = max(logits, d.Nm * d.cm * e)
    return OpMemory("msa_row_attention", 0, kept, fwd_extra=fwd, bwd_extra=sdpa)


def _column_attention(d: _Dims) -> OpMemory:
    e, B, S, r = d.e, d.B, d.S, d.r
    kept = _residual_in(d, d.Nm, d.cm)
    if d.pre:
        kept["ln_out"] = 0  # the LayerNorm output is replaced by its transposed copy
    kept["msa_transposed"] = d.Nm * d.cm * e
    # key mask bias [B*r, H, S, S] (a broadcast view unless the kernel re-lays it out)
    bias = B * r * d.Hm * S * _bias_padded(d, S) * e if S % 8 else B * r * S * e
    kept.update(_attention_kept(d, B * r, S, d.Hm, d.dm, bias))
    kept["msa_stream"] = d.Nm * d.cm * e
    bwd = _attention_bwd(d, B * r, S, d.Hm, d.dm, d.cm, 0) + 2 * d.Nm * d.cm * e
    return OpMemory("msa_column_attention", 0, kept, fwd_extra=d.Nm * d.cm * e, bwd_extra=bwd)


def _transition(d: _Dims, name: str, n_tok: int, c: int, rows: int) -> OpMemory:
    """MSA / pair transition; ``rows``: size of the chunked dim (pair transition only)."""
    e, hidden = d.e, n_tok * d.n * c * d.e
    kept = _residual_in(d, n_tok, c)
    if name == "pair_transition" and d.chunked(rows):
        k = d.chunk
        assert k is not None
        chunk_hidden = hidden * k // rows
        out = n_tok * c * e
        kept["pair_stream"] = out
        chunk_out = out * k // rows
        # forward: the last chunk's hidden and ReLU next to the earlier chunks' outputs;
        # backward: the chunk's recomputed ReLU and two hidden gradients, the incoming gradient
        # and the full-size gradient of the sliced input
        return OpMemory(
            name,
            0,
            kept,
            fwd_extra=max(0, 2 * chunk_hidden - chunk_out),
            bwd_extra=3 * chunk_hidden + 2 * out,
        )
    kept["transition_hidden"] = hidden
    kept["msa_stream" if name == "msa_transition" else "pair_stream"] = n_tok * c * e
    # forward: the pre-ReLU hidden (the new stream does not exist yet); backward: the
    # gradients of the ReLU output and input next to the incoming gradient
    fwd = max(0, hidden - n_tok * c * e)
    return OpMemory(name, 0, kept, fwd_extra=fwd, bwd_extra=2 * hidden + n_tok * c * e)


def _outer_product_mean(d: _Dims) -> OpMemory:
    e, B, S, r, c, cz = d.e, d.B, d.S, d.r, d.c, d.cz
    kept = {"ln_out": d.Nm * d.cm * e, "ln_stats": _ln_stats(d.Nm)} if d.pre else {}
    if d.bf16:
        kept["msa_mask_cast"] = d.Nm * e
    out = d.Nz * cz * e
    if d.spec.opm == "naive":
        naive = B * r * r * c * c * e
        kept["a_b"] = 2 * d.Nm * c * e
        kept["opm_outer"] = naive
        kept["opm_norm"] = d.Nz * e
        if not d.pre:
            kept.update({"post_ln_in": out, "ln_stats": _ln_stats(d.Nz)})
        kept["pair_stream"] = out
        # forward: the projection and its normalised copy next to the kept outer product;
        # backward: grad of the outer product, its re-laid-out copy for the einsum's bmm and
        # grad of the bmm output, while the kept outer product is freed
        fwd = 2 * out
        bwd = 2 * naive
        return OpMemory("outer_product_mean", 0, kept, fwd_extra=fwd, bwd_extra=bwd)
    q = B * S * c * r * cz * e  # Q [B, S*c, r*c_z]
    kept["b"] = d.Nm * c * e
    kept["a"] = d.Nm * c * e
    kept["w_b"] = c * c * cz * e
    kept["opm_q"] = q
    kept["opm_norm"] = d.Nz * e
    if not d.pre:
        kept.update({"post_ln_in": out, "ln_stats": _ln_stats(d.Nz)})
    kept["pair_stream"] = out
    if d.chunked(r):
        k = d.chunk
        assert k is not None
        chunk_out = B * k * r * cz * e
        fwd = max(q, out)  # Q's transposed copy; the concatenated update next to its parts
        # per chunk: recomputed product and its gradient, grad Q of the chunk and the sum
        bwd = 2 * chunk_out + 2 * q + B * k * S * c * e
        return OpMemory("outer_product_mean", 0, kept, fwd_extra=fwd, bwd_extra=bwd)
    # forward: Q before its transposed copy, then the update next to the new stream;
    # backward: grad of the product with grad Q, then grad Q and its transposed copy
    fwd = max(q, out)
    bwd = max(out + q, 2 * q) + 2 * d.Nm * c * e
    return OpMemory("outer_product_mean", 0, kept, fwd_extra=fwd, bwd_extra=bwd)


def _tri_mul(d: _Dims, name: str) -> OpMemory:
    e, Nz, cz, ch = d.e, d.Nz, d.cz, d.ch
    kept = _residual_in(d, Nz, cz)
    if d.bf16:
        kept["pair_mask_cast"] = Nz * e
    hid = Nz * ch * e
    if d.chunked(ch):
        k = d.chunk
        assert k is not None
        chunk = Nz * k * e
        kept["tri_product"] = hid
        fwd = hid  # the chunks' products next to their concatenation
        bwd_chunk = 12 * chunk
    else:
        kept["tri_projections"] = 4 * hid  # sigmoid(gate) and projection of a and b
        kept["tri_operands"] = 2 * hid  # a, b laid out for the batched matmul
        kept["tri_product"] = hid
        fwd = hid
        bwd_chunk = 3 * hid
    kept["tri_ln_stats"] = _ln_stats(Nz)
    kept["tri_ln_out"] = hid
    kept["tri_out_proj"] = Nz * cz * e
    kept["tri_gate"] = Nz * cz * e
    if d.spec.model.dropout_pair > 0:
        kept["dropout_mask"] = d.B * d.r * cz * e
    kept["pair_stream"] = Nz * cz * e
    # backward: grad of the product, of both matmul operands and the accumulated grad LN(z)
    bwd = bwd_chunk + Nz * cz * e
    return OpMemory(name, 0, kept, fwd_extra=fwd, bwd_extra=bwd)


def _tri_att(d: _Dims, name: str) -> OpMemory:
    e, B, r, H, Nz, cz = d.e, d.B, d.r, d.Hp, d.Nz, d.cz
    kept = _residual_in(d, Nz, cz)
    if not name.endswith("start"):  # ending node: a transposed copy replaces the LN output
        if d.pre:
            kept["ln_out"] = 0
        kept["pair_transposed"] = Nz * cz * e
    rows = B * r
    bias_full = rows * H * r * r * e
    if d.chunked(r):
        k = d.chunk
        assert k is not None
        kept["tri_bias"] = Nz * H * e
        ck = B * k
        chunk_bias = ck * H * r * _bias_padded(d, r) * e
        chunk_kept = sum(_attention_kept(d, ck, r, H, d.dp, chunk_bias).values())
        kept["pair_stream"] = Nz * cz * e
        out = Nz * cz * e
        fwd = out + chunk_kept + ck * H * r * r * e
        bias_grad = ck * H * r * _ceil(r, 16) * e if d.cuda else Nz * H * e
        bwd = out + chunk_kept + _attention_bwd(d, ck, r, H, d.dp, cz, bias_grad)
        if d.spec.model.dropout_pair > 0:
            kept["dropout_mask"] = B * r * cz * e
        return OpMemory(name, 0, kept, fwd_extra=fwd, bwd_extra=bwd + 2 * out)
    bias = rows * H * r * _bias_padded(d, r) * e
    # the attention is over rows of r entries: B*r sequences of length r
    kept.update(_attention_kept(d, rows, r, H, d.dp, bias))
    if d.spec.model.dropout_pair > 0:
        kept["dropout_mask"] = B * r * cz * e
    kept["pair_stream"] = Nz * cz * e
    transposed = 0 if name.endswith("start") else Nz * cz * e
    if not d.cuda:
        # CPU: the triangle bias and key mask are added in place to the logits (no summed
        # bias); forward: the logits next to the probabilities; backward: the explicit
        # softmax's, the triangle-bias gradient reduced over the rows
        bias_grad = Nz * H * e
        fwd = rows * H * r * r * 4 + Nz * H * e + transposed
        bwd = _attention_bwd(d, rows, r, H, d.dp, cz, bias_grad) + Nz * cz * e
        return OpMemory(name, 0, kept, fwd_extra=fwd, bwd_extra=bwd)
    bias_grad = rows * H * r * _ceil(r, 16) * e
    # the un-padded sum next to its re-laid-out copy, the triangle bias (ending node: the LN
    # output next to its transposed copy)
    fwd = bias_full + Nz * H * e + transposed
    # backward: the SDPA backward; later the bias gradient and its un-padded copy, once the
    # kept bias is freed
    bwd = max(
        _attention_bwd(d, rows, r, H, d.dp, cz, bias_grad) + Nz * cz * e,
        bias_grad + bias_full - bias + Nz * H * e + Nz * cz * e,
    )
    return OpMemory(name, 0, kept, fwd_extra=fwd, bwd_extra=bwd)


def _embedding(d: _Dims) -> OpMemory:
    e, B, S, r, L = d.e, d.B, d.S, d.r, d.L
    kept = {
        "embed_ln_in": d.Nm * d.cm * 4,
        "ln_stats": _ln_stats(d.Nm),
        "pair_init_in": B * r * d.cm * e if d.pair else 0,
        "msa_stream": d.Nm * d.cm * e,
        "pair_stream": d.Nz * d.cz * e,
        "masks": d.Nm * 4
        + (d.Nz * 4 if d.spec.model.tri_mul_out or d.spec.model.tri_mul_in else 0),
    }
    if d.bf16:  # the fp32 LayerNorm output is cast to bf16 (the fp32 one is then freed)
        fwd = d.Nm * d.cm * 4
    else:
        fwd = 0
    fwd += 3 * B * S * L * d.cm * 4 + d.Nz * d.cz * e
    return OpMemory("embeddings", -1, kept, fwd_extra=fwd, bwd_extra=3 * d.Nm * d.cm * 4)


def _head(d: _Dims) -> OpMemory:
    e, B, S, L = d.e, d.B, d.S, d.L
    cells = B * S * L
    kept: dict[str, int] = {}
    if d.pre:
        kept.update({"final_ln_out": d.Nm * d.cm * e, "ln_stats": _ln_stats(d.Nm)})
    kept["head_hidden"] = 2 * cells * d.cm * e
    m = d.spec.model
    k = d.spec.n_bins if m.loss == "ce" else 1
    kept["loss"] = cells * k * 4 + cells * 4 * 2
    # forward: logits in e and as fp32, the fp32 log-softmax; backward: their gradients
    fwd = cells * k * (e + 4) + cells * d.cm * e
    bwd = 2 * cells * k * 4 + cells * k * e + 2 * cells * d.cm * e + d.Nm * d.cm * e
    return OpMemory("heads", -1, kept, fwd_extra=fwd, bwd_extra=bwd)


def op_ledger(spec: StepSpec) -> list[OpMemory]:
    """All ops of one training step in forward order, with their ledgers."""
    d = _Dims(spec)
    m = spec.model
    ops = [_embedding(d)]
    for blk in range(m.n_blocks):
        block_ops = [_row_attention(d)]
        if m.column_attention:
            block_ops.append(_column_attention(d))
        block_ops.append(_transition(d, "msa_transition", d.Nm, d.cm, d.r))
        if blk < m.n_blocks - 1 and d.pair:  # the last block has no pair update
            block_ops.append(_outer_product_mean(d))
            if m.tri_mul_out:
                block_ops.append(_tri_mul(d, "tri_mul_out"))
            if m.tri_mul_in:
                block_ops.append(_tri_mul(d, "tri_mul_in"))
            if m.tri_att_start:
                block_ops.append(_tri_att(d, "tri_att_start"))
            if m.tri_att_end:
                block_ops.append(_tri_att(d, "tri_att_end"))
            if m.pair_transition:
                block_ops.append(_transition(d, "pair_transition", d.Nz, d.cz, d.r))
        for op in block_ops:
            op.block = blk
        ops.extend(block_ops)
    ops.append(_head(d))
    # parameter gradients (fp32), attributed to the op that owns the parameters
    counts = parameter_counts(spec)
    for op in ops:
        if op.block >= 0:
            n_with = (
                m.n_blocks
                if op.name in ("msa_row_attention", "msa_column_attention", "msa_transition")
                else m.n_blocks - 1
            )
            op.grad_bytes = 4 * counts[op.name] // max(1, n_with)
    ops[0].grad_bytes = 4 * (counts["embeddings"] + counts["pair_init"])
    ops[-1].grad_bytes = 4 * counts["heads"]
    return ops


# ====================================================================== the step
@dataclass
class AnalyticalResult:
    """Analytical peak of one training step (bytes, per device).

    Attributes:
        peak_bytes: the predicted peak.
        by_category: live bytes at the peak: ``parameters``, ``gradients``, ``optimizer``,
            ``activations`` (kept tensors, incl. bf16 weight copies), ``backward_temporaries``
            (gradients of activations and op temporaries), ``inputs``, ``ddp_buckets``.
        phase: ``forward`` or ``backward`` or ``optimizer``.
        host_bytes: host memory the step holds for the device: the checkpointed groups' inputs
            ``offload_checkpoints`` keeps in pinned memory, each copy rounded up to a power of
            two as the pinned allocator does (0 without offloading).
        by_op: per op name (summed over blocks): kept bytes (``kept``), its largest forward and
            backward extra.
        components: journal-style totals over the whole forward by tensor kind (``qkv``,
            ``attention_bias``, ``opm_outer``/``opm_q``, ``tri_*``, ``transition_hidden``,
            ``pair_stream``, ``msa_stream``, ...).
        parameters: parameter counts per component.
    """

    peak_bytes: int
    by_category: dict[str, int]
    phase: str
    host_bytes: int = 0
    peak_at: str = ""
    by_op: dict[str, dict[str, int]] = field(default_factory=dict)
    components: dict[str, int] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _groups(spec: StepSpec, ops: list[OpMemory]) -> list[list[OpMemory]]:
    """Ops grouped as executed: embedding, one group per checkpoint (or per block), head."""
    m = spec.model
    k = m.blocks_per_ckpt or 1
    groups: list[list[OpMemory]] = [[ops[0]]]
    blocks = [[op for op in ops if op.block == b] for b in range(m.n_blocks)]
    for i in range(0, m.n_blocks, k):
        groups.append([op for blk in blocks[i : i + k] for op in blk])
    groups.append([ops[-1]])
    return groups


def estimate(spec: StepSpec) -> AnalyticalResult:
    """Closed-form peak memory of one training step of ``spec`` (see the module docstring)."""
    m = spec.model
    d = _Dims(spec)
    ops = op_ledger(spec)
    counts = parameter_counts(spec)
    n_params = counts["total"]
    p_bytes = 4 * n_params
    n_tensors = _n_param_tensors(spec)
    optimizer = 2 * p_bytes + (512 if spec.device == "cuda" else 4) * n_tensors  # moments + steps
    inputs = spec.batch_size * spec.S * spec.seq_len * (4 * 8 + 2) + (
        spec.batch_size * spec.S * 8 if spec.n_labels else 0
    )
    weight_casts = 2 * (n_params - spec.n_genes * m.c_m) if d.bf16 else 0
    buffers = 4 * spec.n_genes**2 if spec.prior else 0
    static = p_bytes + optimizer + inputs + buffers
    ckpt = m.blocks_per_ckpt is not None
    offload = ckpt and m.offload_checkpoints and d.cuda  # a CPU run's host is its device
    groups = _groups(spec, ops)
    streams_in = _stream_in_bytes(d)  # what an offloaded group keeps in host memory

    def op_ckpt(gi: int) -> bool:  # the ops of this group are checkpoints of their own
        return m.checkpoint_ops and 0 < gi < len(groups) - 1

    # ---------------------------------------------------------------- forward
    peak, phase, at_peak, where = 0, "forward", {}, ""
    kept = weight_casts  # live kept bytes
    host = 0
    for gi, group in enumerate(groups):
        is_ckpt = ckpt and 0 < gi < len(groups) - 1
        start = kept
        for op in group:
            here = static + kept + op.kept_bytes + op.fwd_extra
            if here > peak:
                peak, phase = here, "forward"
                at_peak = {
                    "activations": kept + op.kept_bytes,
                    "backward_temporaries": op.fwd_extra,
                    "gradients": 0,
                }
                where = f"forward of {op.name} (block {op.block})"
            kept += _op_stream(op) if op_ckpt(gi) else op.kept_bytes
        if is_ckpt:  # only the group's inputs (kept already) and its output streams stay
            kept = start + _stream_bytes(d, group)
            if offload:  # the inputs wait in host memory
                kept -= streams_in
                host += _pinned_stream_in_bytes(d)

    # ---------------------------------------------------------------- backward
    # with accumulation the gradients of the earlier micro-batches exist from the start
    grads, unsaved = (p_bytes if spec.grad_accumulation > 1 else 0), 0
    stream_grads = d.Nm * d.cm * d.e
    for gi in range(len(groups) - 1, -1, -1):
        group = groups[gi]
        is_ckpt = ckpt and 0 < gi < len(groups) - 1
        per_op = op_ckpt(gi)
        if is_ckpt:  # recompute: the group's ledgers come back
            kept -= _stream_bytes(d, group)
            if offload:  # its inputs come back from the host
                kept += streams_in
            base = kept
            # recomputation stops at the last tensor autograd saves: the group's final stream
            # (the last residual add) is not recreated (offloaded: recreated, then freed)
            last = group[-1]
            unsaved = _op_stream(last)
            for op in group:
                here = static + base + op.kept_bytes + op.fwd_extra + grads + stream_grads
                if op is last and not offload:
                    here -= unsaved
                if here > peak:
                    peak, phase = here, "backward"
                    at_peak = {
                        "activations": base + op.kept_bytes,
                        "backward_temporaries": op.fwd_extra + stream_grads,
                        "gradients": grads,
                    }
                    where = f"recomputation of {op.name} (block {op.block})"
                base += _op_stream(op) if per_op else op.kept_bytes
            kept = base - unsaved
        for op in reversed(group):
            if per_op:  # the op's own checkpoint: its ledger comes back, its output stays
                rec = op.kept_bytes - _op_stream(op)
                here = static + kept + rec + op.fwd_extra + grads + stream_grads
                if here > peak:
                    peak, phase = here, "backward"
                    at_peak = {
                        "activations": kept + rec,
                        "backward_temporaries": op.fwd_extra + stream_grads,
                        "gradients": grads,
                    }
                    where = f"recomputation of {op.name} (block {op.block})"
                kept += rec
            here = static + kept + grads + stream_grads + op.bwd_extra
            if here > peak:
                peak, phase = here, "backward"
                at_peak = {
                    "activations": kept,
                    "backward_temporaries": stream_grads + op.bwd_extra,
                    "gradients": grads,
                }
                where = f"backward of {op.name} (block {op.block})"
            kept -= op.kept_bytes - (unsaved if is_ckpt and op is group[-1] else 0)
            grads += op.grad_bytes if spec.grad_accumulation == 1 else 0
            if op.name == "msa_row_attention" and op.block == m.n_blocks - 1:
                stream_grads += d.Nz * d.cz * d.e  # z got its first gradient here

    # ---------------------------------------------------------------- optimizer (foreach: sqrt(v))
    opt_peak = static + p_bytes + (p_bytes if spec.device == "cuda" else 0)
    if opt_peak > peak:
        peak, phase = opt_peak, "optimizer"
        at_peak = {
            "activations": 0,
            "backward_temporaries": 0,
            "gradients": p_bytes,
            # foreach AdamW's sqrt(v) for all parameters (MemTracker counts it as optimizer)
            "optimizer_extra": p_bytes if spec.device == "cuda" else 0,
        }
        where = "optimizer step"
    ddp = p_bytes if spec.world_size > 1 else 0
    by_category = {
        "parameters": p_bytes,
        "gradients": at_peak.get("gradients", 0),
        "optimizer": optimizer + at_peak.get("optimizer_extra", 0),
        "activations": at_peak.get("activations", 0),
        "backward_temporaries": at_peak.get("backward_temporaries", 0),
        "inputs": inputs,
        "buffers": buffers,
        "ddp_buckets": ddp,
    }
    by_op: dict[str, dict[str, int]] = {}
    components: dict[str, int] = {}
    for op in ops:
        row = by_op.setdefault(op.name, {"kept": 0, "fwd_extra": 0, "bwd_extra": 0, "count": 0})
        row["kept"] += op.kept_bytes
        row["fwd_extra"] = max(row["fwd_extra"], op.fwd_extra)
        row["bwd_extra"] = max(row["bwd_extra"], op.bwd_extra)
        row["count"] += 1
        for name, b in op.kept.items():
            components[name] = components.get(name, 0) + b
    if weight_casts:
        components["bf16_weight_copies"] = weight_casts
    return AnalyticalResult(
        peak_bytes=peak + ddp,
        host_bytes=host,
        by_category=by_category,
        phase=phase,
        peak_at=where,
        by_op=by_op,
        components=components,
        parameters=counts,
        spec=spec.to_dict(),
    )


def _stream_in_bytes(d: _Dims) -> int:
    """The streams a checkpointed group takes as inputs: ``m`` and (with a pair) ``z``."""
    return d.Nm * d.cm * d.e + d.Nz * d.cz * d.e


def _pinned_stream_in_bytes(d: _Dims) -> int:
    """The same in pinned host memory, whose allocator rounds each copy to a power of two."""
    return pinned_bytes(d.Nm * d.cm * d.e) + (pinned_bytes(d.Nz * d.cz * d.e) if d.pair else 0)


def _op_stream(op: OpMemory) -> int:
    """The residual stream an op outputs (what its own checkpoint leaves for the next op)."""
    return op.kept.get("pair_stream", 0) + op.kept.get("msa_stream", 0)


def _stream_bytes(d: _Dims, group: list[OpMemory]) -> int:
    """The new MSA (and pair, if updated) streams a checkpointed group outputs."""
    pair = any(op.name == "outer_product_mean" for op in group)
    return d.Nm * d.cm * d.e + (d.Nz * d.cz * d.e if pair else 0)


def _n_param_tensors(spec: StepSpec) -> int:
    """Parameter tensors (AdamW keeps one step counter per tensor)."""
    m = spec.model
    att = 5 + 2  # q, k, v weights; gate weight + bias; output weight + bias
    pair_init = (4 + _prior_tensors(spec)) if m.uses_pair else 0
    n = 1 + 1 + (1 if m.value_encoder == "embedding" else 7) + 2 + pair_init
    row = 2 + att + (2 + 1 if m.uses_pair else 0)
    per_block = row + (2 + att if m.column_attention else 0) + (2 + 4)
    pair = 2 + 4 + 2
    tri_mul = 2 + 8 + 2 + 2 + 2
    tri_att = 2 + 1 + att
    pair += tri_mul * (int(bool(m.tri_mul_out)) + int(bool(m.tri_mul_in)))
    pair += tri_att * (int(bool(m.tri_att_start)) + int(bool(m.tri_att_end)))
    pair += (2 + 4) if m.pair_transition else 0
    n += m.n_blocks * per_block + ((m.n_blocks - 1) * pair if m.uses_pair else 0)
    n += (2 if m.ln_order == "pre" else 0) + 4 + (2 if spec.n_labels else 0)
    return n
