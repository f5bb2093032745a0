"""`kill -9` of Snakemake mid-training: no training process outlives it, and the rerun the
messages suggest (`--unlock`, then the same command) resumes from the checkpoint with exactly
one training and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import activated_env

pytestmark = pytest.mark.slow

MODEL = "results/pbmc68k/exp/n_hvg~32_n_bins~11_preset~bioformer/fold~holdout/train/model.pt"
ONE_POINT = {
    "sweep": {"n_bins": [11], "preset": ["bioformer"]},
    "cv": {"enabled": False},
    "experiment": {
        # 10 epochs (350 steps): the kill lands mid-training even on a loaded machine (with 3,
        # a training could finish between its first checkpoint and the kill)
        "train": {"epochs": 10, "ckpt_every": 2, "patience": None, "log_every": 1},
    },
}


def trainings(root: Path, kinds: tuple[str, ...] = ("evoformer.train", "evoformer.launch")) -> int:
    """How many Python training processes (``-m evoformer.train`` workers, ``-m
    evoformer.launch`` launchers; not the shells around them, nor a launcher's short-lived
    forks, which carry its command line until they exec) run in the workflow copy ``root``."""

    def kind(cmd: list[str]) -> str | None:
        pairs = set(zip(cmd, cmd[1:], strict=False))
        return next((k for k in kinds if ("-m", k) in pairs), None)

    n = 0
    for p in psutil.process_iter(["cmdline", "cwd"]):
        k = kind(p.info["cmdline"] or [])
        if k is None or p.info["cwd"] != str(root):
            continue
        try:
            parent = p.parent()
            if parent is not None and kind(parent.cmdline()) == k:
                continue
        except psutil.Error:
            continue
        n += 1
    return n


def model_weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / MODEL, weights_only=True)["model"]


def test_kill9_of_snakemake_then_rerun_resumes_to_identical_weights(make_workflow):
    ref = make_workflow("uninterrupted")
    ref.run(MODEL, configfile=ref.config("one", **ONE_POINT))

    wf = make_workflow("killed")
    cfg = wf.config("one", **ONE_POINT)
    wf.run("preprocess", configfile=cfg)
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", MODEL, "--configfile", str(cfg)]
    log = open(wf.root / "killed.log", "w")  # noqa: SIM115 - closed below
    snake = subprocess.Popen(
        cmd, cwd=wf.root, env=activated_env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    ckpts = wf.root / "checkpoints"
    deadline = time.time() + 300
    while not list(ckpts.rglob("last.pt")):  # training is under way and has checkpointed
        assert snake.poll() is None, (wf.root / "killed.log").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    assert trainings(wf.root)
    os.kill(snake.pid, signal.SIGKILL)  # Snakemake alone: its jobs get no signal from it
    snake.wait()
    log.close()
    deadline = time.time() + 90
    while trainings(wf.root):
        assert time.time() < deadline, "training processes outlived the killed Snakemake"
        time.sleep(0.5)
    (train_log,) = wf.root.glob("logs/train/*.log")
    assert "stopping the training" in train_log.read_text()

    # the rerun the messages suggest: unlock, then the same command
    locked = subprocess.run(
        cmd, cwd=wf.root, env=activated_env(), capture_output=True, text=True, timeout=300
    )
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    subprocess.run([*cmd, "--unlock"], cwd=wf.root, env=activated_env(), check=True, timeout=300)
    rerun = subprocess.Popen(
        cmd, cwd=wf.root, env=activated_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    launchers = 0
    while rerun.poll() is None:
        launchers = max(launchers, trainings(wf.root, ("evoformer.launch",)))
        time.sleep(0.5)
    output = rerun.stdout.read()
    assert rerun.returncode == 0, output[-3000:]
    assert launchers <= 1
    assert "resumed from" in train_log.read_text()
    a, b = model_weights(ref.root), model_weights(wf.root)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_training_prints_its_error_line_in_snakemakes_output(make_workflow):
    """The train rule's log is not the only place a training error shows: Snakemake's own
    output carries its one-line `error:` (here: a corrupt checkpoint, named with its path)."""
    wf = make_workflow("train_error")
    cfg = wf.config("one", **ONE_POINT)
    wf.run("preprocess", configfile=cfg)
    ckpt = wf.root / "checkpoints/pbmc68k/n_hvg~32_n_bins~11_preset~bioformer/holdout"
    ckpt.mkdir(parents=True)
    (ckpt / "last.pt").write_bytes(b"not a checkpoint")
    proc = wf.run(MODEL, configfile=cfg, check=False)
    assert proc.returncode != 0
    lines = [x for x in proc.stdout.splitlines() if x.startswith("error: ")]
    assert lines and "last.pt is corrupt" in lines[0], proc.stdout[-3000:]
