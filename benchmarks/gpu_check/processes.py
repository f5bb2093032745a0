"""Child processes: their environment, a process group with a timeout, their log."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from benchmarks.gpu_check.common import ROOT, Context


def child_env(ctx: Context) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if ctx.dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on the CPU even on a GPU machine
    return env


def run_group(
    cmd: list[str], log_path: Path, env: dict[str, str], timeout: float
) -> tuple[int, float]:
    """Run ``cmd`` in its own process group with output to ``log_path``; on timeout end that
    group (torchrun and its workers). Returns (exit code, seconds); exit code 124 on timeout."""
    t0 = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = 124
    return rc, time.perf_counter() - t0


def log_tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
