"""The Slurm profile (slurm/config.yaml) on a real Slurm cluster.

A session fixture stands up a single-node Slurm 22.05 on this machine
(tests/slurm/setup_cluster.sh: Debian slurm-wlm + munge + slurmdbd/MariaDB, one node
with two fake A100s) and tears it down afterwards. The tests then run
``snakemake --profile slurm`` -- the profile exactly as shipped, in a temporary copy --
on:

- the probe workflow (tests/slurm/probe/): CPU job -> 2-process torchrun `train` job
  started like the real one (slurm/per_node.sh) -> CPU job. Runs now, whatever the real
  rules look like.
- the real workflow on the CI config (tests/config/ci.yaml), once it has a Snakefile.

Skipped (with the reason) only where Slurm cannot be stood up: not root, or neither
Slurm nor apt-get installed. With CI=true even that is a failure.
Run alone: ``pytest -m slurm tests/test_slurm.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tests" / "slurm" / "setup_cluster.sh"
TEARDOWN = REPO / "tests" / "slurm" / "teardown_cluster.sh"
PROBE = REPO / "tests" / "slurm" / "probe"
CI_CONFIG = REPO / "tests" / "config" / "ci.yaml"
ON_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
VENV_BIN = Path(sys.executable).parent

# Hard limits: a run that takes longer is a hang and fails the test.
PROBE_TIMEOUT_S = 300
WORKFLOW_TIMEOUT_S = 900

SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$")


# --------------------------------------------------------------------------- cluster


def _why_no_cluster() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root: standing up Slurm needs root (apt-get, /etc/slurm, daemons)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "neither Slurm (slurmctld) nor apt-get to install it is available"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node Slurm cluster with 2 fake A100s (started here if needed)."""
    reason = _why_no_cluster()
    if reason:
        if ON_CI:
            pytest.fail(f"CI=true but the real-Slurm tests cannot run: {reason}")
        pytest.skip(reason)
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SETUP)], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        pytest.fail(
            f"tests/slurm/setup_cluster.sh failed (rc={proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    started = "SLURM_CLUSTER=started" in proc.stdout
    print(f"\nSlurm cluster {'started' if started else 'reused'} in {time.monotonic() - t0:.1f}s")
    print(proc.stdout.strip())
    yield {"accounting": shutil.which("sacct") is not None}
    if started:
        subprocess.run(["bash", str(TEARDOWN)], capture_output=True, timeout=300)


# --------------------------------------------------------------------------- helpers


@dataclass
class Run:
    rc: int
    output: str
    seconds: float
    workdir: Path
    jobs: list[tuple[str, str, Path]] = field(default_factory=list)  # (rule, slurm id, log)

    def by_rule(self, rule: str) -> list[tuple[str, str, Path]]:
        return [j for j in self.jobs if j[0] == rule]

    def tail(self, n: int = 6000) -> str:
        return self.output[-n:]


def _env() -> dict[str, str]:
    """The submit environment: the venv first on PATH (jobs inherit it: --export=ALL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_snakemake(workdir: Path, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """Start `snakemake --profile slurm ARGS` in workdir (output to workdir/snakemake.out)."""
    exe = VENV_BIN / "snakemake"
    cmd = [
        *([str(exe)] if exe.is_file() else [sys.executable, "-m", "snakemake"]),
        "--profile",
        "slurm",
        # poll Slurm every few seconds instead of the profile's 20 s (CI time)
        "--slurm-init-seconds-before-status-checks",
        "2",
        *args,
    ]
    with (workdir / "snakemake.out").open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.started = time.monotonic()  # type: ignore[attr-defined]
    return proc, cmd


def finish_snakemake(proc: subprocess.Popen, cmd: list[str], workdir: Path, timeout: float) -> Run:
    """Wait for a started run; a run past `timeout` (since its start) fails the test."""
    left = timeout - (time.monotonic() - proc.started)  # type: ignore[attr-defined]
    try:
        proc.wait(timeout=max(left, 1))
    except subprocess.TimeoutExpired:
        stop(proc)
        out = (workdir / "snakemake.out").read_text()
        pytest.fail(f"`{' '.join(cmd)}` hung: no result after {timeout}s\n{out[-6000:]}")
    out = (workdir / "snakemake.out").read_text()
    run = Run(proc.returncode, out, time.monotonic() - proc.started, workdir)  # type: ignore[attr-defined]
    for line in out.splitlines():
        m = SUBMITTED.search(line.strip())
        if m:
            log = Path(m.group(3))
            rule = next((p[5:] for p in log.parts if p.startswith("rule_")), "?")
            run.jobs.append((rule, m.group(2), log))
    args = cmd[cmd.index("--slurm-init-seconds-before-status-checks") + 2 :]
    print(f"snakemake {' '.join(args)}: rc={run.rc} in {run.seconds:.1f}s, {len(run.jobs)} jobs")
    return run


def stop(proc: subprocess.Popen) -> None:
    """End a Snakemake run started here (SIGTERM: it cancels its Slurm jobs)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_snakemake(workdir: Path, *args: str, timeout: float) -> Run:
    """`snakemake --profile slurm ARGS` in workdir; a run past `timeout` fails the test."""
    proc, cmd = start_snakemake(workdir, *args)
    return finish_snakemake(proc, cmd, workdir, timeout)


def wait_for(what, predicate, timeout, proc=None, workdir=None):
    """Poll predicate() until it returns something truthy (and return that) or fail;
    also fail if the Snakemake run `proc` (output in workdir) ends meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = (workdir / "snakemake.out").read_text() if workdir else ""
            pytest.fail(f"snakemake ended (rc={proc.returncode}) before {what}\n{out[-6000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def slurm_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -d` as a dict (jobs stay visible for MinJobAge = 3600 s)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-d", "--oneliner", job_id],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(re.findall(r"(\S+?)=(\S*)", out))


def copy_profile(dst: Path, **train_overrides) -> None:
    """Copy slurm/ to dst/slurm, optionally changing resources of the train rule."""
    shutil.copytree(REPO / "slurm", dst / "slurm")
    if train_overrides:
        path = dst / "slurm" / "config.yaml"
        profile = yaml.safe_load(path.read_text())
        profile["set-resources"]["train"].update(train_overrides)
        path.write_text(yaml.safe_dump(profile, sort_keys=False))


def probe_workdir(tmp: Path, input_text: str = "PROBE-INPUT ok\n", **train_overrides) -> Path:
    for f in ("Snakefile", "probe.py"):
        shutil.copy(PROBE / f, tmp / f)
    copy_profile(tmp, **train_overrides)
    (tmp / "input.txt").write_text(input_text)
    return tmp


def assert_ran_as_slurm_job(run: Run, rule: str, rule_log: Path) -> str:
    """One Slurm job ran `rule`: its Slurm log exists and says so, and the rule's own log
    records the same SLURM_JOB_ID. Returns the Slurm job id."""
    jobs = run.by_rule(rule)
    assert len(jobs) == 1, f"rule {rule}: expected 1 Slurm job, got {jobs}\n{run.tail()}"
    _, job_id, slurm_log = jobs[0]
    assert slurm_log.name == f"{job_id}.log" and slurm_log.is_file(), slurm_log
    text = slurm_log.read_text()
    assert f"rule {rule}:" in text and "Finished jobid" in text, text[-3000:]
    assert f"SLURM_JOB_ID={job_id}" in rule_log.read_text(), rule_log.read_text()[-2000:]
    return job_id


# --------------------------------------------------------------------------- probe


@pytest.fixture(scope="module")
def probe_run(slurm_cluster, tmp_path_factory) -> Run:
    wd = probe_workdir(tmp_path_factory.mktemp("probe"))
    return run_snakemake(wd, "--config", "input=input.txt", timeout=PROBE_TIMEOUT_S)


def test_probe_every_stage_is_a_slurm_job(probe_run: Run):
    assert probe_run.rc == 0, probe_run.tail()
    wd = probe_run.workdir
    ids = {
        rule: assert_ran_as_slurm_job(probe_run, rule, wd / "logs" / f"{rule}.log")
        for rule in ("prep", "train", "table")
    }
    assert len(set(ids.values())) == 3, ids
    rows = (wd / "results" / "table.tsv").read_text().split()
    assert rows == [
        "stage",
        "slurm_job_id",
        "prep",
        ids["prep"],
        "train",
        ids["train"],
        "table",
        ids["table"],
    ]
    for job_id in ids.values():
        assert slurm_job(job_id)["JobState"] == "COMPLETED"


def test_probe_training_gets_two_gpus_and_two_processes(probe_run: Run):
    assert probe_run.rc == 0, probe_run.tail()
    (_, job_id, _) = probe_run.by_rule("train")[0]
    job = slurm_job(job_id)
    # the allocation: 2 A100s, cpus_per_gpu x 2 CPUs, one node
    assert job["JOB_GRES"] == "gpu:a100:2", job
    assert "gres/gpu=2" in job["TRES"], job
    assert job["NumNodes"] == "1" and job["NumCPUs"] == "16", job
    info = json.loads((probe_run.workdir / "results" / "train" / "run_info.json").read_text())
    assert info["SLURM_JOB_ID"] == job_id
    assert info["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert info["world_size"] == 2
    assert sorted(r["local_rank"] for r in info["ranks"]) == [0, 1]
    assert len({r["pid"] for r in info["ranks"]}) == 2
    assert all(r["SLURM_JOB_ID"] == job_id for r in info["ranks"])
    # the plugin did not wrap the rule in `srun -n1` (mpi mode); per_node.sh started
    # exactly one job step with the job's CPUs
    log = (probe_run.workdir / "logs" / "train.log").read_text()
    assert "1 node(s), 16 CPUs per node" in log, log


def test_probe_second_invocation_submits_nothing(probe_run: Run):
    assert probe_run.rc == 0, probe_run.tail()
    again = run_snakemake(probe_run.workdir, "--config", "input=input.txt", timeout=PROBE_TIMEOUT_S)
    assert again.rc == 0, again.tail()
    assert again.jobs == [], again.tail()
    assert "Nothing to be done" in again.output, again.tail()


def test_failing_job_is_reported(slurm_cluster, tmp_path):
    """A corrupt input: the job fails in Slurm and Snakemake exits non-zero, naming the
    rule and showing its log, within a bounded time (no silent hang). Retries are off
    here (each costs the plugin's growing status-check interval); resubmission with
    more runtime is tested by test_time_limit_checkpoint_and_resume. Job states come from
    squeue here, as on a cluster without accounting."""
    wd = probe_workdir(tmp_path, input_text="\x00\x01 not a probe input\n")
    # status via squeue, as on a cluster without accounting (the other tests use sacct)
    run = run_snakemake(
        wd,
        "--config",
        "input=input.txt",
        "--retries",
        "0",
        "--slurm-status-command",
        "squeue",
        timeout=PROBE_TIMEOUT_S,
    )
    assert run.rc != 0, run.tail()
    assert "Error in rule prep" in run.output, run.tail()
    assert re.search(r"SLURM-job '\d+' failed, SLURM status is: 'FAILED'", run.output), run.tail()
    assert "corrupt input" in run.output, run.tail()  # show-failed-logs: the rule's log
    jobs = run.by_rule("prep")
    assert len(jobs) == 1, run.tail()
    job = slurm_job(jobs[0][1])
    assert job["JobState"] == "FAILED", job
    assert job["TimeLimit"] == "01:00:00", job  # default-resources runtime, attempt 1
    assert not run.by_rule("train") and not run.by_rule("table")


def test_time_limit_checkpoint_and_resume(slurm_cluster, tmp_path):
    """Training that outlives its time limit (runtime 1 min here): SIGUSR1 -- sent the
    way Slurm's --signal sends it, to every process of the job's steps -- reaches the
    training processes and does not end the job; SIGTERM at the limit makes them
    checkpoint; Slurm reports TIMEOUT; Snakemake resubmits with twice the runtime; the
    retry resumes from the checkpoint."""
    wd = probe_workdir(tmp_path, runtime="1 * attempt")
    target = "results/train/run_info.json"
    proc, cmd = start_snakemake(wd, target, "--config", "input=input.txt", "hold=true")
    state = wd / "results" / "train"

    def holding():
        files = sorted(state.glob("holding.*"))
        return files if len(files) == 2 else None

    try:
        files = wait_for("both training processes to hold", holding, 120, proc, wd)
        job_id = files[0].read_text()
        # (the profile's --signal=USR1@600 is longer than this 1-min job: Slurm sent it
        # at the job's start, before the step existed.) Send SIGUSR1 now the way Slurm
        # does: to the job's steps, where proctrack/cgroup signals only each task's
        # first process -- per_node.sh, which must pass it on to the training processes.
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
        wait_for(
            "SIGUSR1 in both training processes", lambda: len(list(state.glob("usr1.*"))) == 2, 30
        )
        assert slurm_job(job_id)["JobState"] == "RUNNING"  # SIGUSR1 did not end the job
    except BaseException:
        stop(proc)
        raise
    run = finish_snakemake(proc, cmd, wd, timeout=PROBE_TIMEOUT_S)
    assert run.rc == 0, run.tail()
    jobs = [j[1] for j in run.by_rule("train")]
    assert len(jobs) == 2 and jobs[0] == job_id, run.tail()
    first, second = slurm_job(jobs[0]), slurm_job(jobs[1])
    assert first["JobState"] == "TIMEOUT", first
    assert (first["TimeLimit"], second["TimeLimit"]) == ("00:01:00", "00:02:00")
    assert re.search(r"SLURM status is: 'TIMEOUT'", run.output), run.tail()
    assert sorted(p.name for p in state.glob("ckpt.*")) == ["ckpt.0", "ckpt.1"]
    assert (state / "ckpt.0").read_text() == job_id
    info = json.loads((state / "run_info.json").read_text())
    assert info["resumed"] is True and info["SLURM_JOB_ID"] == jobs[1]


# --------------------------------------------------------------------------- workflow

WORKFLOW_PARTS = ("Snakefile", "rules", "schemas", "workflow_scripts", "envs", "config.yaml")


def workflow_workdir(tmp: Path) -> Path:
    """A copy of the workflow (the evoformer package comes from the venv) with the profile."""
    if not (REPO / "Snakefile").is_file() or not CI_CONFIG.is_file():
        pytest.skip("the workflow (Snakefile) or tests/config/ci.yaml does not exist yet")
    for part in WORKFLOW_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, tmp / part, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy(src, tmp / part)
    copy_profile(tmp)
    shutil.copytree(REPO / "tests" / "config", tmp / "tests" / "config")
    return tmp


# The CI config cut to one grid point without cross-validation: every stage still runs as a
# Slurm job (CV's extra trainings only repeat the train rule, at ~15 s of scheduling each).
SLURM_CONFIG = "slurm_ci.yaml"


def write_slurm_config(wd: Path) -> None:
    config = yaml.safe_load(CI_CONFIG.read_text())
    config["sweep"] = {"n_bins": [11], "preset": ["bioformer"]}
    config["cv"] = {"enabled": False}
    config["split"]["n_folds"] = 0
    (wd / SLURM_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def workflow_run(slurm_cluster, tmp_path_factory) -> Run:
    wd = workflow_workdir(tmp_path_factory.mktemp("workflow"))
    write_slurm_config(wd)
    return run_snakemake(wd, "--configfile", SLURM_CONFIG, timeout=WORKFLOW_TIMEOUT_S)


def _texts_under(*dirs: Path) -> str:
    chunks = []
    for d in dirs:
        for p in sorted(d.rglob("*")) if d.is_dir() else []:
            if p.is_file() and p.suffix in {".log", ".json", ".txt", ".tsv", ".csv", ".yaml"}:
                if p.stat().st_size < 5_000_000:
                    chunks.append(p.read_text(errors="replace"))
    return "\n".join(chunks)


def test_workflow_every_stage_is_a_slurm_job(workflow_run: Run):
    run = workflow_run
    assert run.rc == 0, run.tail()
    assert run.jobs, f"no Slurm job was submitted\n{run.tail()}"
    assert len({job_id for _, job_id, _ in run.jobs}) == len(run.jobs)
    for rule, job_id, slurm_log in run.jobs:
        assert slurm_log.name == f"{job_id}.log" and slurm_log.is_file(), f"{rule}: {slurm_log}"
        text = slurm_log.read_text()
        # checkpoint rules (cv_select) are announced as "localcheckpoint <rule>:"
        assert re.search(rf"(rule|checkpoint) {re.escape(rule)}:", text), text[-3000:]
        assert "Finished jobid" in text, text[-3000:]
        assert slurm_job(job_id)["JobState"] == "COMPLETED"


def test_workflow_stages_record_their_slurm_job_id(workflow_run: Run):
    """Each stage writes the SLURM_JOB_ID it ran in into its log (``SLURM_JOB_ID=<id>``) or
    outputs (train's run_info.json: ``"SLURM_JOB_ID": "<id>"``)."""
    run, wd = workflow_run, workflow_run.workdir
    assert run.rc == 0, run.tail()
    recorded = _texts_under(wd / "logs", wd / "results")
    if "SLURM_JOB_ID" not in recorded:
        pytest.skip(
            "no workflow step records SLURM_JOB_ID yet (evoformer.data.step.run_step "
            "should log it); this test checks every step once one does"
        )
    for rule, job_id, _ in run.jobs:
        assert re.search(rf"SLURM_JOB_ID\W+{job_id}\b", recorded), (
            f"rule {rule} (Slurm job {job_id}) recorded no SLURM_JOB_ID={job_id} under "
            "logs/ or results/"
        )


def test_workflow_result_tables_exist(workflow_run: Run):
    assert workflow_run.rc == 0, workflow_run.tail()
    if not any(r in {"evaluate", "tables", "table"} for r, _, _ in workflow_run.jobs):
        pytest.skip("no evaluation/table rule in the workflow yet")
    tables = [
        p for p in (workflow_run.workdir / "results").rglob("*") if p.suffix in {".tsv", ".csv"}
    ]
    assert tables, "no result table (.tsv/.csv) under results/"
    assert all(p.stat().st_size > 0 for p in tables)


def test_workflow_training_gets_two_gpus_and_two_processes(workflow_run: Run):
    assert workflow_run.rc == 0, workflow_run.tail()
    train = workflow_run.by_rule("train")
    if not train:
        pytest.skip("no `train` rule in the workflow yet")
    infos = sorted((workflow_run.workdir / "results").rglob("train/run_info.json"))
    assert infos, "train ran but wrote no results/**/train/run_info.json"
    by_job = {json.loads(p.read_text())["SLURM_JOB_ID"]: json.loads(p.read_text()) for p in infos}
    for _, job_id, _ in train:
        job = slurm_job(job_id)
        assert job["JOB_GRES"] == "gpu:a100:2" and "gres/gpu=2" in job["TRES"], job
        info = by_job[job_id]
        assert info["CUDA_VISIBLE_DEVICES"] == "0,1", info
        assert info["world_size"] == 2, info


def test_workflow_second_invocation_submits_nothing(workflow_run: Run):
    assert workflow_run.rc == 0, workflow_run.tail()
    again = run_snakemake(
        workflow_run.workdir, "--configfile", SLURM_CONFIG, timeout=WORKFLOW_TIMEOUT_S
    )
    assert again.rc == 0, again.tail()
    assert again.jobs == [], again.tail()


def test_workflow_corrupt_h5ad_fails_the_run(slurm_cluster, tmp_path):
    """A dataset pointing at a corrupt .h5ad: the first job reading it fails in Slurm and
    `snakemake --profile slurm` exits non-zero, naming the rule, in bounded time."""
    wd = workflow_workdir(tmp_path)
    (wd / "broken.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n but then garbage " * 10)
    config = yaml.safe_load(CI_CONFIG.read_text())
    config["datasets"] = {"broken": {"kind": "h5ad", "path": "broken.h5ad"}}
    config["experiment"]["dataset"] = "broken"
    (wd / "broken.yaml").write_text(yaml.safe_dump(config))
    run = run_snakemake(
        wd, "--configfile", "broken.yaml", "--retries", "0", timeout=WORKFLOW_TIMEOUT_S
    )
    assert run.rc != 0, run.tail()
    failed = re.findall(r"SLURM-job '(\d+)' failed, SLURM status is: 'FAILED'", run.output)
    assert failed, run.tail()  # hvg and split both read the dataset
    for job_id in failed:
        rule = next(r for r, j, _ in run.jobs if j == job_id)
        assert f"Error in rule {rule}" in run.output, run.tail()
        assert slurm_job(job_id)["JobState"] == "FAILED"
