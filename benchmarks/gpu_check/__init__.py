"""One-shot GPU check: memory, throughput and FLOP/s, attention kernels and the training entry point.

Run once on a CUDA machine, from the repository root (the package is used from the working
tree, not installed)::

    python3 -m benchmarks.gpu_check --out $OUT/gpu

Without a CUDA device it prints that it needs one and exits 0. ``--cpu-dry-run`` runs every
item at tiny sizes on the CPU (fp32 and bf16 autocast on CPU, gloo for the training run) so the
whole code path can be exercised anywhere; ``--only ITEM[,ITEM]`` reruns some items and merges
them into the existing results in ``--out``.

Items (each in its own try/except; each writes its row, or its error, as soon as it is done, so
a run cut short keeps what it measured; a global ``--budget-s`` skips what is left with a note):

``env``
    GPU name / memory / driver (``nvidia-smi`` if present), torch / CUDA / cuDNN / NCCL
    versions, the SDPA backend switches, the fp32 matmul precision.
``memory_journal``, ``memory_pair_stack``
    Peak memory of one steady-state training step (forward through ``model.loss``, backward,
    gradient clipping, AdamW step; after one warm-up step): measured
    ``torch.cuda.max_memory_allocated`` (CPU: the profiler's allocator peak) vs the pre-flight's
    traced prediction (``evoformer.memory.preflight``, ``FakeTensorMode`` + ``MemTracker``) and
    the analytical estimate, for (a) the journal configuration (BioFormer, n_hvg 500 -> r = 501,
    c_m 128, 4 heads of 32, c_z 128, c_opm 32, 8 blocks, micro-batch 32, bf16 autocast,
    ``blocks_per_ckpt`` 1, 51 bins) and (b) the full pair stack (preset ``evoformer``, r = 129,
    c_z 64, micro-batch 4, ``chunk_size`` 32, ``blocks_per_ckpt`` 1, 4 blocks).
``memory_r2001``
    The same for :data:`evoformer.memory.spec.HVG2000` (r = 2001, ``chunk_size`` 64,
    checkpoint inputs offloaded to pinned host memory, per-op checkpoints) at micro-batch 4 (the
    configured 16 pins 128 GiB of host memory; this machine has 128 GiB in all), with the pinned
    host memory measured (``torch.cuda.host_memory_stats``) next to the traced and analytical.
``throughput``
    Samples/s of training steps of the journal configuration (warm-up, then a timed loop between
    ``torch.cuda.synchronize`` calls), bf16 autocast vs fp32 (a note when fp32 does not fit).
    With each: the step's FLOPs and memory traffic (:func:`evoformer.flops.count.count_step`,
    counted once per precision on fake tensors with the GPU's kernels emulated), the achieved
    model and executed TFLOP/s and their share of the device's datasheet peak
    (:mod:`evoformer.flops.peaks`), and the bytes per second the traffic estimate implies
    against the device's memory bandwidth.
``compile``
    The journal step in every ``train.compile`` mode (``eager``, ``fused``, ``blocks``,
    ``model``; :mod:`evoformer.model.fused`; the dry run times eager and fused), timed as
    ``throughput`` times a precision, with its first step (compilation included), model TFLOP/s,
    share of the peak and speedup over ``eager`` (issue 19's target: >= 3x on the same GPU).
``ddp_smoke``
    The real training entry point, ``python -m evoformer.launch -- ...`` (torchrun, one process
    per visible GPU), on a small binned dataset written here with numpy; passes if it exits 0
    and writes ``model.pt``; samples/s and peak memory from ``performance_summary.json``, world
    size from ``run_info.json``, backend from its log; the training's own TFLOP/s and share of
    the peak from the summary.
``nccl_ddp``
    An NCCL process group (gloo on CPU) under torchrun with one rank per GPU: an all-reduce and
    three DDP training steps of a tiny BioFormer (the trainer itself creates no process group
    when it runs as a single process, so ``ddp_smoke`` on one GPU does not touch NCCL).
``loader``
    The training data path at the journal shape: masked micro-batches of 32 cells x 500 genes
    from memory-mapped binned arrays (``evoformer.tasks.masked.TrainBatches`` through a
    ``DataLoader``) with 0, 2 and 4 worker processes (pinned memory on CUDA), in cells/s, next
    to the model's consumption from ``throughput``: the loader is not the bottleneck when its
    cells/s is well above the model's samples/s.
``sdpa``
    Which ``scaled_dot_product_attention`` backends run in one training step of each
    configuration (profiler op / kernel names), which one runs by default for the row-attention
    shapes ``[B*S, H, r, d]`` with the float bias the model passes, and which backends accept
    those inputs when forced alone (``torch.nn.attention.sdpa_kernel``, forward + backward). Runs
    last, so a forced backend that crashes the process costs no other item.

Modules: ``__main__`` (the driver), one per item (``env``, ``memory``, ``throughput``, ``compile``,
``ddp_smoke``, ``nccl_ddp``, ``loader``, ``sdpa``), and what they share: ``sizes`` (the
configurations; the journal's is :data:`evoformer.memory.spec.JOURNAL`), ``step`` (the
trainer's step and its FLOP accounting), ``common`` (formatting, results, context), ``data``,
``processes``, ``report`` (``gpu_check.md``).

Outputs in ``--out`` (default ``benchmarks/out/gpu_check``): ``gpu_check.md`` (Markdown tables
for BENCHMARKS.md), ``gpu_check.json`` (raw figures), ``ddp_smoke/`` (the training run's data,
outputs and log), ``nccl_ddp/``. Uses only numpy, pandas, torch and the ``evoformer`` modules that
import nothing else (no scanpy / anndata / jsonschema).
"""
