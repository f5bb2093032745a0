"""The checkpoint folder of a training run: ``last.pt`` (resume), ``best.pt`` (the best weights
so far) and ``lock`` (one training per folder), and the RNG states that make a resumed run
continue bit for bit. See :mod:`evoformer.train` for when each is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from evoformer.errors import InputError
from evoformer.io import save_torch_atomic

log = logging.getLogger("evoformer.train")
#: Version of ``last.pt``'s layout (part of the config hash: another layout starts afresh).
CHECKPOINT_FORMAT = 2


def config_hash(spec: dict[str, Any], data_meta: dict[str, Any], world: int) -> str:
    """What a checkpoint must match to be resumed: model/train config, data shape, world size."""
    key = {"spec": spec, "data": data_meta, "world_size": world, "format": CHECKPOINT_FORMAT}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and write a probe file in it; InputError naming it if that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise InputError(
            f"{what} {folder} is not writable ({e.strerror or type(e).__name__})"
        ) from e


class CheckpointFolder:
    """``last.pt``, ``best.pt`` and the ``lock`` of one training run (see the module docstring)."""

    def __init__(self, path: Path, rank: int) -> None:
        self.path = Path(path)
        self.rank = rank
        self.last = self.path / "last.pt"
        self.best = self.path / "best.pt"
        self._lock_file: Any = None

    def lock(self) -> None:
        """Rank 0 takes an exclusive lock for the run's lifetime (released when it exits)."""
        if self.rank != 0:
            return
        f = open(self.path / "lock", "a+")  # noqa: SIM115 - held open until the process exits
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise InputError(
                f"checkpoint folder {self.path} is in use by another training ({holder}); "
                "stop that one (or wait for it) before starting this one"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"PID {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        """Release the lock before the process ends (a run that stopped on divergence)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def load(self, expected_hash: str) -> dict[str, Any] | None:
        """``last.pt`` if it was written for this configuration. One written for another is moved
        aside to ``last.<its hash>.pt`` (kept) and None returned; a corrupt one stops the run.
        Every rank reads, all ranks meet at a barrier, and only then does rank 0 move files (so
        no rank reads a file another has already moved)."""
        ckpt = None
        exists = self.last.exists()
        if exists:
            try:
                ckpt = torch.load(self.last, map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
                raise InputError(
                    f"checkpoint {self.last} is corrupt ({type(e).__name__}); delete it to restart"
                ) from e
        if dist.is_initialized():
            dist.barrier()
        if exists:
            got = ckpt.get("config_hash") if isinstance(ckpt, dict) else None
            if got != expected_hash:
                ckpt = None
                if self.rank == 0:
                    aside = self.path / f"last.{got or 'unknown'}.pt"
                    os.replace(self.last, aside)
                    self.best.unlink(missing_ok=True)
                    log.warning(
                        "checkpoint %s was written for other settings (hash %s, this run %s): "
                        "moved to %s, starting afresh",
                        self.last,
                        got,
                        expected_hash,
                        aside,
                    )
        if dist.is_initialized():
            dist.barrier()
        return ckpt

    def save(self, state: dict[str, Any], device: torch.device) -> None:
        """Gather every rank's RNG state and write ``last.pt`` atomically from rank 0."""
        states = [None] * dist.get_world_size() if dist.is_initialized() else None
        if states is not None:
            dist.all_gather_object(states, rng_state(device))
        else:
            states = [rng_state(device)]
        if self.rank == 0:
            save_torch_atomic({**state, "rng": states}, self.last)
        if dist.is_initialized():
            dist.barrier()

    def save_best(self, weights: dict[str, torch.Tensor]) -> None:
        if self.rank == 0:
            save_torch_atomic(weights, self.best)

    def load_best(self) -> dict[str, torch.Tensor]:
        try:
            return torch.load(self.best, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"checkpoint {self.best} is corrupt ({type(e).__name__})") from e

    def finish(self) -> None:
        """The run's outputs are written: a later rerun (e.g. new code) starts afresh."""
        if self.rank == 0:
            self.last.unlink(missing_ok=True)
            self.best.unlink(missing_ok=True)
