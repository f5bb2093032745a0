"""Atomic file writing: nothing is left half-written when a job dies or input is bad."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same directory (same filesystem), so the final
    ``os.replace`` is atomic. On any exception the temporary file is removed and
    ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the real suffix (np.save, anndata and matplotlib key off it).
    fd, tmp = tempfile.mkstemp(
        dir=path.parent,
        prefix=f".{path.name}.tmp-",
        suffix=suffix if suffix is not None else path.suffix,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically, byte-identical for identical objects.

    ``torch.save`` to a file stores the file's name inside the archive, so saving to a temporary
    name gives different bytes each time; saving to memory first does not.
    """
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


@contextlib.contextmanager
def npy_rows_writer(
    path: str | os.PathLike, shape: tuple[int, ...], dtype: Any
) -> Iterator[Callable[[np.ndarray], None]]:
    """Write the ``.npy`` file ``path`` of ``shape`` and ``dtype`` block by block, in order.

    Yields ``write(block)``: ``block`` [n, *shape[1:]] holds the next ``n`` rows. The file is
    written through a plain file handle, not a memory map, so the writing process holds one
    block, not the file's pages, and the bytes equal ``np.save`` of the whole array. The
    file appears atomically when every row has been written; fewer or more rows raise.
    """
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    written = 0

    def write(block: np.ndarray) -> None:
        nonlocal written
        block = np.ascontiguousarray(block, dtype=dtype)
        if block.shape[1:] != tuple(shape[1:]) or written + len(block) > shape[0]:
            raise ValueError(f"{path}: block {block.shape} does not continue {shape}")
        block.tofile(f)
        written += len(block)

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        yield write
        if written != shape[0]:
            raise ValueError(f"{path}: {written} of {shape[0]} rows written")


def json_safe(obj: Any, digits: int | None = None) -> Any:
    """NaN/inf -> None, numpy scalars -> Python (strict JSON); with ``digits``, floats rounded
    to that many significant digits."""
    if isinstance(obj, dict):
        return {k: json_safe(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v, digits) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return obj if digits is None else float(f"{obj:.{digits}g}")
    return obj


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks), as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
