"""Run one workflow step with its log file: the thin ``workflow_scripts`` call this.

Log records and warnings go to the rule's log file. Bad user input
(:class:`evoformer.errors.InputError`) ends the step with exit status 1 and one line,
``error: <message>``, in the log and on stderr (so it shows in Snakemake's output);
any other exception keeps its traceback in the log.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evoformer.errors import InputError


def log_slurm_job() -> None:
    """Record which Slurm job (if any) ran this step: ``SLURM_JOB_ID=<id> host=<name>``."""
    import socket

    logging.getLogger("evoformer.step").info(
        "SLURM_JOB_ID=%s host=%s", os.environ.get("SLURM_JOB_ID", "-"), socket.gethostname()
    )


def run_step(log_path: str | os.PathLike, func: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Call ``func(**kwargs)`` with logging to ``log_path``; exit 1 on bad input."""
    root = logging.getLogger()
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    name = getattr(func, "__name__", str(func))
    log_slurm_job()
    logging.getLogger("evoformer.step").info(
        "%s(%s)", name, ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    )
    try:
        return func(**kwargs)
    except InputError as exc:
        message = f"error: {exc}"
        handler.stream.write(message + "\n")
        handler.flush()
        print(message, file=sys.stderr)
        sys.exit(1)
    except Exception:
        handler.stream.write(traceback.format_exc())
        handler.flush()
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
