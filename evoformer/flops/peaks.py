"""The devices' peak throughput and the achieved figures of a run (no torch import).

**Peaks** (:data:`PEAKS`, :func:`device_peak`): dense bf16 tensor-core and fp32 TFLOP/s and
HBM bandwidth per GPU, from NVIDIA's datasheets (A100: "NVIDIA A100 Tensor Core GPU" datasheet;
H100: "NVIDIA H100 Tensor Core GPU" datasheet; H200: "NVIDIA H200 Tensor Core GPU" datasheet).
The datasheets print bf16 *with sparsity*; dense is half of it. fp32 is the CUDA-core FP32
figure: the trainer leaves TF32 off (PyTorch's default ``float32_matmul_precision`` "highest"),
so fp32 matrix products do not run on the tensor cores. A device not in the table (a CPU, any
other GPU) has no peak unless one is given (``train.peak_tflops``): nothing is invented.

**Achieved** (:func:`throughput_fields`): TFLOP/s = FLOPs per sample x samples/s / 1e12, over
the whole run (all processes); utilisation = achieved / (peak per device x processes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evoformer.errors import InputError

if TYPE_CHECKING:
    from evoformer.flops.count import StepCost

TERA = 1e12


# ----------------------------------------------------------------------------- peaks
@dataclass(frozen=True)
class DevicePeak:
    """One GPU's datasheet peaks.

    Attributes:
        name: the product (``NVIDIA H100 SXM``).
        pattern: regular expression matched (case-insensitively) against
            ``torch.cuda.get_device_name`` (``NVIDIA H100 80GB HBM3`` is the SXM part).
        bf16_tflops: dense bf16 tensor-core TFLOP/s (half the datasheet's sparsity figure).
        fp32_tflops: FP32 (CUDA-core) TFLOP/s.
        hbm_tb_per_s: memory bandwidth, TB/s (10^12 bytes/s).
        source: the datasheet.
    """

    name: str
    pattern: str
    bf16_tflops: float
    fp32_tflops: float
    hbm_tb_per_s: float
    source: str

    def tflops(self, precision: str) -> float:
        """Dense peak for ``precision`` (``bf16`` or ``fp32``)."""
        if precision not in ("bf16", "fp32"):
            raise InputError(f"precision: got {precision!r}, expected bf16 or fp32")
        return self.bf16_tflops if precision == "bf16" else self.fp32_tflops


_A100 = "NVIDIA A100 Tensor Core GPU datasheet (BF16 312 dense / 624 sparse, FP32 19.5)"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet"
#: First match wins: the specific form factors before the SXM default of each name.
PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("NVIDIA H200 NVL", r"\bH200\b.*\bNVL\b", 835.5, 60.0, 4.8, _H200 + " (H200 NVL)"),
    DevicePeak("NVIDIA H200 SXM", r"\bH200\b", 989.5, 67.0, 4.8, _H200 + " (H200 SXM)"),
    DevicePeak("NVIDIA H100 NVL", r"\bH100\b.*\bNVL\b", 835.5, 60.0, 3.9, _H100 + " (H100 NVL)"),
    DevicePeak("NVIDIA H100 PCIe", r"\bH100\b.*\bPCIe\b", 756.5, 51.0, 2.0, _H100 + " (H100 PCIe)"),
    DevicePeak("NVIDIA H100 SXM", r"\bH100\b", 989.5, 67.0, 3.35, _H100 + " (H100 SXM)"),
    DevicePeak("NVIDIA A100 40GB", r"\bA100\b.*\b40GB\b", 312.0, 19.5, 1.555, _A100),
    DevicePeak("NVIDIA A100 80GB PCIe", r"\bA100\b.*\bPCIe\b", 312.0, 19.5, 1.935, _A100),
    DevicePeak("NVIDIA A100 80GB SXM", r"\bA100\b", 312.0, 19.5, 2.039, _A100),
)


def lookup_device(device_name: str | None) -> DevicePeak | None:
    """The table's entry for a device name (``torch.cuda.get_device_name``); None if unknown."""
    if not device_name:
        return None
    for entry in PEAKS:
        if re.search(entry.pattern, device_name, flags=re.IGNORECASE):
            return entry
    return None


def device_peak(
    device_name: str | None, precision: str, override: float | None = None
) -> tuple[float | None, str | None]:
    """``(peak TFLOP/s per device, where it comes from)`` for a run's device and precision.

    ``override`` (``train.peak_tflops``) wins; else the table's dense figure for ``precision``;
    else ``(None, None)`` (a CPU, an unknown GPU).
    """
    if override is not None:
        if isinstance(override, bool) or not override > 0:
            raise InputError(f"config key 'train.peak_tflops': got {override!r}, expected > 0")
        return float(override), "train.peak_tflops"
    entry = lookup_device(device_name)
    if entry is None:
        return None, None
    return entry.tflops(precision), f"{entry.name} {precision} dense: {entry.source}"


# ----------------------------------------------------------------------------- achieved
#: The fields :func:`throughput_fields` returns (``performance_summary.json`` /
#: ``performance.tsv``), in order.
THROUGHPUT_FIELDS = (
    "model_flops_per_sample",
    "hardware_flops_per_sample",
    "model_tflops_per_s",
    "hardware_tflops_per_s",
    "peak_tflops_per_device",
    "peak_tflops_source",
    "model_flops_utilization",
    "hardware_flops_utilization",
)


def throughput_fields(
    cost: StepCost | None,
    samples_per_s: float,
    n_devices: int,
    peak_tflops: float | None,
    peak_source: str | None,
) -> dict[str, Any]:
    """Achieved TFLOP/s and the share of the devices' peak, from a count and a throughput.

    Args:
        cost: the step's count (None when it could not be made: every figure is None).
        samples_per_s: samples per second over the whole run (all processes).
        n_devices: processes (each on its own device).
        peak_tflops: peak per device for the run's precision (None: unknown).
        peak_source: where the peak comes from.

    Returns:
        :data:`THROUGHPUT_FIELDS`: FLOPs per sample, achieved TFLOP/s (``flops_per_sample x
        samples_per_s / 1e12``), the peak and its source, utilisations (achieved / (peak x
        n_devices); None without a peak).
    """
    out: dict[str, Any] = dict.fromkeys(THROUGHPUT_FIELDS)
    out["peak_tflops_per_device"] = peak_tflops
    out["peak_tflops_source"] = peak_source
    if cost is None:
        return out
    ok = math.isfinite(samples_per_s) and samples_per_s > 0
    for kind in ("model", "hardware"):
        per_sample = getattr(cost, f"{kind}_flops_per_sample")
        out[f"{kind}_flops_per_sample"] = per_sample
        if not ok:
            continue
        achieved = per_sample * samples_per_s / TERA
        out[f"{kind}_tflops_per_s"] = achieved
        if peak_tflops:
            out[f"{kind}_flops_utilization"] = achieved / (peak_tflops * n_devices)
    return out
