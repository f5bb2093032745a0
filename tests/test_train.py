"""Training stage: 2-process DDP (gloo, CPU) on the bundled PBMC data, resume, faults, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from evoformer.errors import InputError

pytestmark = pytest.mark.slow

MODEL = {
    "preset": "bioformer",
    "c_m": 16,
    "c_z": 8,
    "c_opm": 4,
    "n_heads_msa": 2,
    "c_hidden_msa": 8,
    "n_blocks": 1,
    "dropout_msa": 0.1,
    "dropout_pair": 0.1,
}
TRAIN = {
    "micro_batch_size": 4,
    "global_batch_size": 16,
    "epochs": 3,
    "lr": 3e-3,
    "warmup_steps": 2,
    "log_every": 1,
    "ckpt_every": 2,
    "seed": 0,
    "cpu_processes": 2,
}


def make_pbmc(d: Path) -> dict[str, Path]:
    """The bundled PBMC data through HVG selection, binning and splitting (package API)."""
    from evoformer.data import binning, datasets, hvg, split

    h5ad = d / "pbmc68k.h5ad"
    datasets.materialise_pbmc68k(h5ad)
    ds = {"expression": "raw", "value_type": "log1p", "label_key": "bulk_labels"}
    hvg.run_hvg(
        h5ad,
        "pbmc68k",
        ds,
        32,
        {"flavor": "seurat"},
        d / "hvg.h5ad",
        d / "genes.tsv",
        d / "hvg.png",
    )
    binning.bin_h5ad(d / "hvg.h5ad", d / "binned", n_bins=11, seed=0)
    sp = {"fractions": {"train": 0.8, "val": 0.1, "test": 0.1}, "n_folds": 2, "seed": 0}
    split.run_split(h5ad, "pbmc68k", "bulk_labels", sp, d / "split.tsv")
    return {"binned": d / "binned", "split": d / "split.tsv"}


@pytest.fixture(scope="module")
def pbmc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pbmc(tmp_path_factory.mktemp("pbmc"))


def launch(
    pbmc: dict[str, Path],
    out: Path,
    ckpt: Path,
    train: dict | None = None,
    env: dict[str, str] | None = None,
    **kw,
) -> subprocess.Popen:
    """Start ``python -m evoformer.launch`` (torchrun, 2 CPU processes) in the background;
    ``env``: entries added to the environment."""
    spec = {"model": MODEL, "train": {**TRAIN, **(train or {})}, "fold": -1, "final": False}
    cmd = [
        sys.executable,
        "-m",
        "evoformer.launch",
        "--cpu-processes",
        "2",
        "--",
        "--binned",
        str(pbmc["binned"]),
        "--split",
        str(pbmc["split"]),
        "--spec",
        json.dumps(spec),
        "--out",
        str(out),
        "--ckpt-dir",
        str(ckpt),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    log = open(out.parent / f"{out.name}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, **kw
    )


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to a process and all its descendants (as Slurm signals a whole job step)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def run(pbmc, out: Path, ckpt: Path, train: dict | None = None, timeout: float = 240) -> int:
    p = launch(pbmc, out, ckpt, train)
    return p.wait(timeout=timeout)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)["model"]


def logtext(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()


def wait_for_log(p: subprocess.Popen, out: Path, text: str, timeout: float = 120) -> None:
    """Wait until the run's log shows ``text`` (the run must still be going)."""
    deadline = time.time() + timeout
    log = out.parent / f"{out.name}.log"
    while text not in (log.read_text() if log.exists() else ""):
        assert p.poll() is None and time.time() < deadline, logtext(out)
        time.sleep(0.2)


def training_processes(p: subprocess.Popen) -> list[psutil.Process]:
    """The ``evoformer.train`` worker processes below the launcher ``p``."""
    return [
        c
        for c in psutil.Process(p.pid).children(recursive=True)
        if "evoformer.train" in " ".join(c.cmdline())
    ]


@pytest.fixture(scope="module")
def reference(pbmc, tmp_path_factory) -> Path:
    """One uninterrupted 2-process run: the reference for loss, determinism and resume."""
    d = tmp_path_factory.mktemp("ref")
    rc = run(pbmc, d / "out", d / "ckpt")
    assert rc == 0, logtext(d / "out")
    return d / "out"


def test_two_process_training_learns_and_reports(pbmc, reference: Path) -> None:
    import pandas as pd

    m = pd.read_csv(reference / "metrics.tsv", sep="\t")
    tr = m[m["kind"] == "train"]
    first, last = tr["loss"].iloc[:3].mean(), tr["loss"].iloc[-3:].mean()
    assert last < first * 0.9, f"loss did not decrease: {first:.3f} -> {last:.3f}"
    assert (m["kind"] == "val").sum() == 3  # one validation per epoch
    summary = json.loads((reference / "performance_summary.json").read_text())
    assert summary["system"]["world_size"] == 2
    # train.compile left at auto: on a CPU the fused step, recorded as what ran
    assert summary["config"]["train"]["compile"] == "auto" and summary["compile"] == "fused"
    # on CPU: the profiler's allocator peak of one step (tensors only), far below the RSS
    assert summary["peak_memory_source"] == "profiler"
    assert 0 < summary["peak_memory_bytes"] < summary["peak_rss_bytes"]
    assert summary["total_samples"] == summary["total_steps"] * TRAIN["global_batch_size"]
    for k in ("average_forward_time_ms", "average_backward_time_ms", "average_optimizer_time_ms"):
        assert summary[k] > 0
    # efficiency: the model FLOPs of this run's step, counted once; no peak on a CPU
    cost = expected_cost(reference, pbmc["binned"])
    assert summary["model_flops_per_sample"] == cost.model_flops_per_sample > 0
    assert summary["flops"]["hardware_flops"] == cost.hardware_flops
    speed = summary["average_speed_samples_per_s"]
    assert summary["model_tflops_per_s"] == pytest.approx(
        cost.model_flops_per_sample * speed / 1e12
    )
    assert summary["peak_tflops_per_device"] is None and summary["model_flops_utilization"] is None
    log = logtext(reference)
    assert "model FLOPs per sample:" in log
    assert "CPU fallback with gloo, 2 processes" in log and "step fused" in log
    assert "Step 1/" in log and "| Loss:" in log and "samples/sec" in log
    assert "\r" not in log  # no progress-bar carriage returns in a non-terminal log
    assert (reference / "learning_curve.png").stat().st_size > 0
    assert not (reference.parent / "ckpt" / "last.pt").exists()  # removed after success


def expected_cost(out: Path, binned: Path):
    """``count_step`` of the step a run in ``out`` trained on ``binned`` (CPU, fp32)."""
    from evoformer.flops.count import count_step
    from evoformer.memory.spec import StepSpec
    from evoformer.model import ModelConfig

    summary = json.loads((out / "performance_summary.json").read_text())
    meta = json.loads((binned / "meta.json").read_text())
    return count_step(
        StepSpec(
            model=ModelConfig.from_dict(summary["config"]["model"]),
            batch_size=summary["config"]["train"]["micro_batch_size"],
            seq_len=meta["max_len"],
            n_genes=meta["n_genes"],
            n_bins=meta["n_bins"],
            precision="fp32",
            device="cpu",
        ),
        traffic=False,
    )


def test_rerun_is_bit_identical(pbmc, reference: Path, tmp_path: Path) -> None:
    assert run(pbmc, tmp_path / "out", tmp_path / "ckpt") == 0
    a, b = weights(reference), weights(tmp_path / "out")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the file itself, not only the tensors (torch.save to a temp name used to differ)
    assert (reference / "model.pt").read_bytes() == (tmp_path / "out" / "model.pt").read_bytes()


def test_kill9_then_resume_equals_uninterrupted(pbmc, reference: Path, tmp_path: Path) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    p = launch(pbmc, out, ckpt)
    deadline = time.time() + 180
    while not (ckpt / "last.pt").exists():  # wait for the step-2 (or later) checkpoint
        assert p.poll() is None, logtext(out)
        assert time.time() < deadline
        time.sleep(0.2)
    signal_tree(p.pid, signal.SIGKILL)  # the launcher and both workers, no chance to clean up
    p.wait()
    assert not (out / "model.pt").exists()
    assert run(pbmc, out, ckpt) == 0, logtext(out)
    assert "resumed from" in logtext(out)
    a, b = weights(reference), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rank_failure_stops_the_job(pbmc, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = launch(pbmc, out, tmp_path / "ckpt", train={"epochs": 50})
    wait_for_log(p, out, "Step 2/")
    workers = training_processes(p)
    assert len(workers) == 2
    workers[1].kill()
    t0 = time.time()
    rc = p.wait(timeout=90)  # bounded: torchrun tears down the surviving rank
    assert rc != 0
    assert time.time() - t0 < 90
    assert not (out / "model.pt").exists()


def test_sigusr1_checkpoints_and_continues(pbmc, tmp_path: Path) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    p = launch(pbmc, out, ckpt, train={"ckpt_every": 1000})
    wait_for_log(p, out, "Step 2/")
    signal_tree(p.pid, signal.SIGUSR1)  # as Slurm does: every process of the step
    assert p.wait(timeout=240) == 0, logtext(out)
    assert "checkpoint written at step" in logtext(out) and "(signal)" in logtext(out)
    assert (out / "model.pt").exists()


def test_corrupt_checkpoints_stop_and_foreign_ones_are_moved_aside(pbmc, tmp_path: Path) -> None:
    from evoformer.checkpoint import CheckpointFolder

    folder = CheckpointFolder(tmp_path / "c", rank=0)
    folder.path.mkdir()
    folder.last.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"c/last.pt is corrupt"):
        folder.load("abc")
    torch.save({"config_hash": "other"}, folder.last)
    assert folder.load("abc") is None
    assert (folder.path / "last.other.pt").exists() and not folder.last.exists()
    # end to end: an interrupted run's checkpoint for other settings (e.g. another lr) is kept
    # aside, logged, and the rerun trains afresh instead of stopping
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"config_hash": "stale"}, ckpt / "last.pt")
    assert run(pbmc, tmp_path / "out", ckpt) == 0, logtext(tmp_path / "out")
    assert "written for other settings" in logtext(tmp_path / "out")
    assert (ckpt / "last.stale.pt").exists()


def test_a_second_training_on_the_same_checkpoint_folder_stops_at_once(
    pbmc, tmp_path: Path
) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    p = launch(pbmc, out, ckpt, train={"epochs": 50})
    wait_for_log(p, out, "Step 1/")
    t0 = time.time()
    rc = run(pbmc, tmp_path / "second", ckpt, timeout=120)
    assert rc != 0 and time.time() - t0 < 90
    errors = [x for x in logtext(tmp_path / "second").splitlines() if x.startswith("error: ")]
    assert errors and "is in use by another training (PID" in errors[0] and "on host" in errors[0]
    assert p.poll() is None  # the first training goes on
    signal_tree(p.pid, signal.SIGKILL)
    p.wait()


def test_workers_die_with_their_launcher(pbmc, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = launch(pbmc, out, tmp_path / "ckpt", train={"epochs": 50})
    wait_for_log(p, out, "Step 2/")
    workers = training_processes(p)
    assert len(workers) == 2
    p.kill()  # the launcher (torchrun's agent) alone, no chance to clean up
    p.wait()
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, "training processes outlived their launcher"


def test_early_stopping_keeps_the_best_weights(pbmc, tmp_path: Path) -> None:
    """With min_delta huge nothing after the first validation counts as better: training stops
    after `patience` validations and model.pt holds the first validation's weights."""
    out = tmp_path / "out"
    # (and a given device peak: the FLOPs utilisation, even on a CPU)
    train = {"epochs": 20, "val_every": 2, "patience": 2, "min_delta": 1e9, "peak_tflops": 0.5}
    assert run(pbmc, out, tmp_path / "ckpt", train=train) == 0, logtext(out)
    summary = json.loads((out / "performance_summary.json").read_text())
    assert summary["peak_tflops_per_device"] == 0.5
    assert summary["peak_tflops_source"] == "train.peak_tflops"
    assert summary["model_flops_utilization"] == pytest.approx(summary["model_tflops_per_s"] / 1.0)
    assert summary["stopped_early"] and summary["selected_step"] == 2
    assert summary["total_steps"] == 6  # validations at 2 (best), 4, 6 -> stop
    assert summary["selected_weights"] == "best"
    assert "early stopping at step 6" in logtext(out)
    assert torch.load(out / "model.pt", weights_only=True)["selected_step"] == 2


def test_outputs_that_cannot_be_written_keep_the_final_checkpoint(pbmc, tmp_path: Path) -> None:
    """A failure while writing the outputs loses no training: the final state is checkpointed
    first, and the rerun only writes the outputs."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    (out / "model.pt").mkdir(parents=True)  # os.replace onto a folder fails
    assert run(pbmc, out, ckpt) != 0
    assert (ckpt / "last.pt").exists()
    (out / "model.pt").rmdir()
    assert run(pbmc, out, ckpt) == 0, logtext(out)
    text = logtext(out)
    assert "resumed from" in text and text.count("Step 1/") == 1  # no step trained twice
    assert (out / "model.pt").is_file()


def test_an_unwritable_output_folder_fails_before_training(pbmc, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out"  # a folder below a file: cannot be created, even as root
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    spec = {"model": MODEL, "train": TRAIN, "fold": -1, "final": False}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "evoformer.train",
            "--binned",
            str(pbmc["binned"]),
            "--split",
            str(pbmc["split"]),
            "--spec",
            json.dumps(spec),
            "--out",
            str(out),
            "--ckpt-dir",
            str(tmp_path / "ckpt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "output folder" in errors[0] and "not writable" in errors[0]
    assert "Step 1/" not in proc.stderr
