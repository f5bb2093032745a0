"""evoformer.launch: torchrun's arguments for a laptop, a GPU allocation without usable CUDA,
and a multi-node Slurm job (no torchrun is started here)."""

from __future__ import annotations

import pytest

from evoformer import launch


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: False)


def test_cpu_processes_without_a_gpu_allocation():
    assert launch.torchrun_args(3, {}) == ["--standalone", "--nproc-per-node=3"]


def test_one_cpu_process_per_allocated_gpu_when_cuda_is_unusable():
    args = launch.torchrun_args(5, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert args == ["--standalone", "--nproc-per-node=2"]


def test_multi_node_rendezvous_on_the_first_node_with_a_per_job_port(monkeypatch):
    monkeypatch.setattr(launch, "first_node", lambda nodelist: f"first-of-{nodelist}")
    env = {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_JOB_ID": "123456",
    }
    assert launch.torchrun_args(2, env) == [
        "--nnodes=2",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=first-of-gpu[01-02]:29956",
        "--rdzv-id=123456",
    ]
    # two jobs sharing a first node get different ports
    assert launch.rendezvous_port("123456") != launch.rendezvous_port("123457")
