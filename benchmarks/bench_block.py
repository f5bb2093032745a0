"""One Evoformer block, forward + backward: ours unchunked and chunked vs the naive block, CPU.

Usage: python benchmarks/bench_block.py [--reps 5] [--chunk 16] [--threads N]

The naive block (tests/reference_ops.py: explicit logits, ``[B, r, r, c, c]`` outer product,
einsum triangle products) and ours share the block's weights; all run in eval mode (no
dropout) in fp32 with gradients. Ours runs unchunked and with ``chunk_size = --chunk`` (in
training each chunk is recomputed in backward). Reported: max abs difference of the outputs
(over real positions, ours unchunked / chunked vs naive), peak tensor memory of forward +
backward (MemTracker, bytes added on top of parameters/inputs/upstream gradients) and
best-of-reps wall time. Writes benchmarks/results/model.md (section bench_block).
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from bench_opm import best_seconds, mib, peak_bytes, write_section  # isort: skip
from evoformer.model import EvoformerBlock, ModelConfig  # noqa: E402
from tests.reference_ops import random_masks, randomize_parameters_, ref_evoformer_block  # noqa: E402

SIZE = dict(
    c_m=64,
    c_z=64,
    c_opm=32,
    n_heads_msa=4,
    c_hidden_msa=16,
    n_heads_pair=4,
    c_hidden_pair=16,
    c_hidden_tri_mul=64,
    transition_n=4,
)
# (preset, B, S, r)
SETTINGS = [
    ("bioformer", 4, 1, 128),
    ("evoformer", 2, 1, 64),
    ("evoformer", 1, 4, 64),
    ("evoformer", 1, 1, 128),
]


def run(setting: tuple, reps: int, chunk: int) -> str:
    preset, b, s, r = setting
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**SIZE, "preset": preset})
    block = randomize_parameters_(EvoformerBlock(cfg)).eval()
    m = torch.randn(b, s, r, cfg.c_m, requires_grad=True)
    z = torch.randn(b, r, r, cfg.c_z, requires_grad=True)
    msa_mask, pair_mask = random_masks(b, s, r)
    msa_mask, pair_mask = msa_mask.float(), pair_mask.float()
    gm, gz = torch.randn_like(m), torch.randn_like(z)

    def ours():
        return block(m, z, msa_mask, pair_mask)

    def ours_chunked():
        return block(m, z, msa_mask, pair_mask, chunk)

    def naive():
        return ref_evoformer_block(m, z, msa_mask, pair_mask, block)

    def fwd_bwd(f):
        def call():
            m.grad = z.grad = None
            block.zero_grad(set_to_none=True)
            mo, zo = f()
            torch.autograd.backward([mo, zo], [gm, gz])

        return call

    mask_m, mask_z = msa_mask[..., None], pair_mask[..., None]
    with torch.no_grad():
        mr, zr = naive()
        diffs = []
        for f in (ours, ours_chunked):
            mo, zo = f()
            diffs.append(
                max(
                    ((mo - mr) * mask_m).abs().max().item(), ((zo - zr) * mask_z).abs().max().item()
                )
            )
    live = (block, m, z, msa_mask, pair_mask, gm, gz)
    mem_naive = peak_bytes(fwd_bwd(naive), *live)
    mem_ours = peak_bytes(fwd_bwd(ours), *live)
    mem_chunk = peak_bytes(fwd_bwd(ours_chunked), *live)
    t_naive = best_seconds(fwd_bwd(naive), reps)
    t_ours = best_seconds(fwd_bwd(ours), reps)
    t_chunk = best_seconds(fwd_bwd(ours_chunked), reps)
    return (
        f"| {preset} | {b} | {s} | {r} | {diffs[0]:.1e} / {diffs[1]:.1e} "
        f"| {mib(mem_naive)} / {mib(mem_ours)} / {mib(mem_chunk)} "
        f"| **{mem_naive / mem_ours:.1f}x** | {mem_chunk / mem_ours:.2f} "
        f"| {t_naive * 1e3:.0f} / {t_ours * 1e3:.0f} / {t_chunk * 1e3:.0f} "
        f"| **{t_naive / t_ours:.2f}x** | {t_chunk / t_ours:.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=16, help="chunk_size of the chunked run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = ", ".join(f"{k}={v}" for k, v in SIZE.items())
    threads = f" --threads {args.threads}" if args.threads else ""
    lines = [
        "### One Evoformer block forward + backward: ours (unchunked, chunked) vs naive (CPU, fp32)",
        "",
        f"Command: `python benchmarks/bench_block.py --reps {args.reps} --chunk {args.chunk}"
        f"{threads}` (torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads). Sizes: {sizes}; random padding masks.",
        "Memory: peak tensor bytes added on top of parameters, inputs and upstream gradients "
        "(MemTracker). Time: best of `--reps` forward + backward. Diff: max abs over real "
        f"positions. Chunked: `chunk_size={args.chunk}`; chunk / unchunked columns are ours.",
        "",
        "| preset | B | S | r | max abs diff unchunked / chunked "
        "| fwd+bwd peak MiB naive / ours / ours chunked | naive / ours | chunked / unchunked "
        "| fwd+bwd ms naive / ours / ours chunked | naive / ours | chunked / unchunked |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        lines.append(run(setting, args.reps, args.chunk))
        print(lines[-1], file=sys.stderr)
    text = "\n".join(lines)
    print(text)
    write_section("bench_block", text)


if __name__ == "__main__":
    main()
