"""benchmarks/gpu_check (``python -m benchmarks.gpu_check``): the no-CUDA exit, the budget, bad input, and the whole CPU dry run
(every item at tiny sizes, gloo for the training run) with scanpy / anndata / jsonschema /
umap / snakemake made unimportable, as on the GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ITEMS = (
    "env",
    "memory_journal",
    "memory_pair_stack",
    "memory_r2001",
    "throughput",
    "compile",
    "sdpa",
    "ddp_smoke",
    "nccl_ddp",
    "loader",
)
MISSING_ON_GPU_MACHINE = ("anndata", "scanpy", "jsonschema", "umap", "snakemake")


def blocked_env(tmp_path: Path) -> dict[str, str]:
    """Environment whose PYTHONPATH makes the packages the GPU machine lacks fail to import."""
    blocked = tmp_path / "blocked"
    for name in MISSING_ON_GPU_MACHINE:
        pkg = blocked / name
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed on the GPU machine (blocked by the test)')\n"
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(blocked), str(REPO)])
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "out"
    proc = run(["--out", str(out)], blocked_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "needs a CUDA device" in proc.stdout
    assert not out.exists()


def test_bad_only_item_is_one_line_error(tmp_path):
    proc = run(["--cpu-dry-run", "--only", "bogus", "--out", str(tmp_path)], blocked_env(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--only 'bogus'" in lines[0] and "memory_journal" in lines[0]


def test_spent_budget_skips_items_with_a_note(tmp_path):
    out = tmp_path / "out"
    proc = run(
        ["--cpu-dry-run", "--budget-s", "1e-6", "--only", "memory,ddp_smoke", "--out", str(out)],
        blocked_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    items = json.loads((out / "gpu_check.json").read_text())["items"]
    assert set(items) == {"memory_journal", "memory_pair_stack", "memory_r2001", "ddp_smoke"}
    for entry in items.values():
        assert entry["status"] == "skipped" and "budget" in entry["note"]
    md = (out / "gpu_check.md").read_text()
    assert "**skipped**" in md and "Not run: env" in md


@pytest.mark.slow
def test_cpu_dry_run_end_to_end(tmp_path):
    env = blocked_env(tmp_path)
    probe = subprocess.run(
        [sys.executable, "-c", "import anndata"], env=env, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr

    out = tmp_path / "out"
    proc = run(["--cpu-dry-run", "--out", str(out)], env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check summary" in proc.stdout

    data = json.loads((out / "gpu_check.json").read_text())
    items = data["items"]
    assert data["meta"]["mode"] == "cpu-dry-run"
    assert set(items) == set(ITEMS)
    failed = {k: v.get("error") or v.get("errors") for k, v in items.items() if v["status"] != "ok"}
    assert not failed, failed

    assert items["env"]["info"]["cuda_available"] is False
    for name in ("memory_journal", "memory_pair_stack", "memory_r2001"):
        e = items[name]
        assert e["measured_source"] == "profiler"
        assert e["measured_peak_bytes"] > 0 and e["traced_peak_bytes"] > 0
        assert e["analytical_peak_bytes"] > 0
        # the same step measured and traced: same order of magnitude, not a timing
        assert 0.5 < e["measured_over_traced"] < 2.0
        # a CPU trace carries no workspace allowance: the prediction is the traced peak
        assert e["workspace_allowance_bytes"] == 0
        assert e["predicted_peak_bytes"] == e["traced_peak_bytes"]
    # offloading is a GPU's: a CPU step keeps its checkpoint inputs where they are
    assert items["memory_r2001"]["traced_host_bytes"] == 0
    assert "offloaded" in items["memory_r2001"]["config"]
    rows = {r["precision"]: r for r in items["throughput"]["rows"]}
    assert set(rows) == {"bf16", "fp32"}
    assert all(r["status"] == "ok" and r["samples_per_s"] > 0 for r in rows.values())
    for r in rows.values():  # the FLOP accounting of the timed steps (checkpointed: recompute)
        assert 0 < r["model_flops_per_sample"] < r["hardware_flops_per_sample"]
        assert r["model_tflops_per_s"] == pytest.approx(
            r["model_flops_per_sample"] * r["samples_per_s"] / 1e12
        )
        assert r["model_flops_utilization"] is None  # no peak for a CPU
        assert r["traffic_bytes_per_step"] > 0 and 0 < r["pair_traffic_share"] < 1
    assert rows["bf16"]["traffic_bytes_per_step"] < rows["fp32"]["traffic_bytes_per_step"]
    compiled = items["compile"]
    assert [r["mode"] for r in compiled["rows"]] == ["eager", "fused"]
    assert compiled["fastest"] in ("eager", "fused") and compiled["auto"] == "fused"  # CPU
    for r in compiled["rows"]:
        assert r["status"] == "ok" and r["samples_per_s"] > 0 and r["speedup"] > 0
        assert r["model_tflops_per_s"] == pytest.approx(
            r["model_flops_per_sample"] * r["samples_per_s"] / 1e12
        )
    sdpa = items["sdpa"]
    assert sdpa["probes"]["float32"]["MATH"] == "ok"
    assert set(sdpa["training_step"]) == {"journal", "pair_stack"}
    # on CPU the model's attention is an explicit softmax (SDPA's CPU backward is wrong for
    # fully masked rows), so only a GPU run lists SDPA kernels here
    assert all(isinstance(s["backends"], list) for s in sdpa["training_step"].values())
    smoke = items["ddp_smoke"]
    assert smoke["passed"] and smoke["exit_code"] == 0
    assert smoke["world_size"] == 2 and smoke["backend"] == "gloo"
    assert smoke["total_steps"] == 3 and smoke["samples_per_s"] > 0
    assert smoke["model_tflops_per_s"] > 0 and smoke["model_flops_utilization"] is None
    assert (out / "ddp_smoke" / "train" / "model.pt").is_file()
    nccl = items["nccl_ddp"]
    assert nccl["passed"] and nccl["backend"] == "gloo" and nccl["params_in_sync"]
    loader = items["loader"]
    assert [r["workers"] for r in loader["rows"]] == [0, 2, 4]
    assert all(r["cells"] == 256 and r["cells_per_s"] > 0 for r in loader["rows"])
    assert loader["model_samples_per_s"] > 0 and loader["headroom"] > 0

    md = (out / "gpu_check.md").read_text()
    for heading in (
        "## Environment",
        "## Peak memory of one training step",
        "| traced + allowance >= measured |",
        "## Training throughput",
        "## Eager vs fused vs compiled step",
        "## SDPA backends",
        "## Training entry point smoke run",
        "## Process group + DDP",
        "## Data loader at the journal shape",
        "| model TFLOP/s | of peak |",
    ):
        assert heading in md
    assert "Not run" not in md

    # --only reruns one item and keeps the others
    before = items["memory_journal"]["recorded_at"]
    proc = run(["--cpu-dry-run", "--only", "env", "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((out / "gpu_check.json").read_text())["items"]
    assert set(again) == set(ITEMS)
    assert again["memory_journal"]["recorded_at"] == before
    assert again["env"]["status"] == "ok"
