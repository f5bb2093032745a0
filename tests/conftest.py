"""Shared test fixtures: a copy of the workflow in a temporary directory, run with Snakemake.

``Workflow`` wraps one copy (Snakefile, rules/, schemas/, workflow_scripts/, envs/,
config.yaml; the evoformer package comes from the installed environment) and runs
``snakemake`` there as a subprocess with ``--cores 2`` and the CI configuration
``tests/config/ci.yaml`` unless told otherwise. Fixtures:

``make_workflow``         a factory: ``make_workflow("name")`` -> a fresh copy.
``preprocessed_workflow`` (module scope) a copy on which the CI configuration has run.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_ITEMS = (
    "Snakefile",
    "rules",
    "schemas",
    "workflow_scripts",
    "envs",
    "config.yaml",
    "report",
    "slurm",
)
CI_CONFIG = REPO / "tests" / "config" / "ci.yaml"

# The longest test files, longest first. Under ``pytest -n N --dist loadfile`` (README's test
# command) each file runs on one worker in collection order, so these start first and the short
# files fill the other workers around them; the Slurm tests mostly wait on the scheduler.
LONG_FIRST = (
    "test_slurm.py",
    "test_workflow_experiments.py",
    "test_workflow_kill.py",
    "test_workflow_preprocess.py",
    "test_workflow_memory.py",
    "test_workflow_perturbation.py",
    "test_train.py",
    "test_gpu_check.py",
    "test_memory_preflight.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, one intra-op thread per worker for the models tests run in-process:
    three workers on two cores with two spinning OpenMP threads each slowed such tests ~10x.
    (Subprocess trainings set their own threads.)"""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the long files first (a stable sort: the order within a file is kept)."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))


def deep_update(base: dict, updates: Mapping[str, Any]) -> dict:
    """A copy of ``base`` with ``updates`` merged in recursively."""
    out = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def activated_env() -> dict[str, str]:
    """``os.environ`` with this interpreter's ``bin/`` first on PATH (an activated venv)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@dataclass
class Workflow:
    """A copy of the workflow in ``root``."""

    root: Path

    def config(self, name: str = "test", **updates: Any) -> Path:
        """Write the CI config with ``updates`` merged in to ``<root>/<name>.yaml``."""
        cfg = deep_update(yaml.safe_load(CI_CONFIG.read_text()), updates)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def run(
        self,
        *args: str,
        configfile: Path | None = CI_CONFIG,
        check: bool = True,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess:
        """``snakemake --cores 2 [--configfile F] ARGS`` in the copy; stdout+stderr in .stdout.

        Runs as a user would after activating the environment (README: ``. .venv/bin/activate``):
        the test interpreter's ``bin/`` first on PATH, so that jobs' ``python`` is that one.
        On failure the message ends with the last lines of each failed job's log.
        """
        cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--nolock", *args]
        if configfile is not None:  # last: --configfile takes several values
            cmd += ["--configfile", str(configfile)]
        proc = subprocess.run(
            cmd,
            cwd=self.root,
            env=activated_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-5000:]}"
                + self.failed_job_logs(proc.stdout)
            )
        return proc

    def failed_job_logs(self, output: str, lines: int = 30) -> str:
        """The last ``lines`` lines of each log Snakemake names as holding a job's error."""
        out = []
        for match in re.finditer(r"log: (.+?) \(check log file\(s\) for error details\)", output):
            for name in match.group(1).split(", "):
                path = self.root / name
                if path.is_file():
                    tail = path.read_text(errors="replace").splitlines()[-lines:]
                    out.append(f"\n--- {name} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "".join(out)

    def planned_jobs(self, *args: str, configfile: Path | None = CI_CONFIG) -> dict[str, int]:
        """Rule -> job count that a dry run plans ({} when nothing is to be done)."""
        out = self.run(*args, "--dry-run", "--quiet", "rules", configfile=configfile).stdout
        jobs: dict[str, int] = {}
        lines = out.splitlines()
        if "Job stats:" not in lines:
            return jobs
        for line in lines[lines.index("Job stats:") + 3 :]:
            parts = line.split()
            if len(parts) != 2 or parts[0] == "total":
                break
            jobs[parts[0]] = int(parts[1])
        return jobs


def copy_workflow(dest: Path) -> Workflow:
    """Copy the workflow files of the repository into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in WORKFLOW_ITEMS:
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / item)
    return Workflow(dest)


@pytest.fixture
def make_workflow(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Workflow]:
    """Factory for fresh workflow copies."""

    def make(name: str = "workflow") -> Workflow:
        return copy_workflow(tmp_path_factory.mktemp(name))

    return make


@pytest.fixture(scope="module")
def preprocessed_workflow(tmp_path_factory: pytest.TempPathFactory) -> Workflow:
    """A workflow copy on which the CI configuration's preprocessing has run."""
    wf = copy_workflow(tmp_path_factory.mktemp("preprocessed"))
    wf.run("preprocess")
    return wf
