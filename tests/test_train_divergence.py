"""Divergence: a non-finite loss or gradient norm skips that optimizer step (as if its update
never happened), is counted and logged; too many in a row stop the run with one line naming
the step and the last good checkpoint, which stays intact and resumes. NaNs are injected by
patching ``BioFormer.loss_terms`` (tests/nan_injection.py); in-process single-process runs, and
one 2-process gloo run where only rank 1 sees the NaN.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from evoformer.errors import InputError, TrainingDiverged
from evoformer.model.bioformer import BioFormer
from evoformer.train_config import TrainConfig
from tests.nan_injection import poisoned_loss_terms, subprocess_env
from tests.test_train import MODEL, launch, logtext, make_pbmc

# one process, 2 micro-batches per step, 8 steps; validation only at the end (the epoch has 70)
TRAIN = {
    "micro_batch_size": 4,
    "global_batch_size": 8,
    "epochs": 1,
    "max_steps": 8,
    "lr": 3e-3,
    "warmup_steps": 2,
    "log_every": 1,
    "ckpt_every": 2,
    "seed": 0,
}
ACCUM = 2


@pytest.fixture(scope="module")
def pbmc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pbmc(tmp_path_factory.mktemp("pbmc"))


def run(pbmc: dict[str, Path], d: Path, ckpt: Path | None = None, **train) -> Path:
    """Train in this process into ``d/out`` (checkpoints in ``ckpt``, default ``d/ckpt``)."""
    from evoformer.train import train as train_run

    spec = {"model": MODEL, "train": {**TRAIN, **train}, "fold": -1, "final": False}
    train_run(pbmc["binned"], pbmc["split"], spec, d / "out", ckpt or d / "ckpt")
    return d / "out"


def inject(monkeypatch: pytest.MonkeyPatch, **plan) -> None:
    orig = BioFormer.loss_terms
    monkeypatch.setattr(BioFormer, "loss_terms", poisoned_loss_terms(orig, ACCUM, **plan))


def model_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)["model"]


def all_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


@pytest.fixture(scope="module")
def skipped(pbmc, tmp_path_factory) -> Path:
    """A run whose step 2 has a NaN loss (and NaN gradients)."""
    d = tmp_path_factory.mktemp("skipped")
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, steps=[2])
        return run(pbmc, d)


@pytest.mark.slow
def test_a_nonfinite_step_is_skipped_as_if_its_update_never_happened(
    pbmc, skipped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = json.loads((skipped / "performance_summary.json").read_text())
    assert summary["n_nonfinite_steps"] == 1
    assert summary["total_steps"] == 8 and summary["total_samples"] == 8 * 8  # it counts
    m = pd.read_csv(skipped / "metrics.tsv", sep="\t")
    assert m.loc[m["kind"] == "nonfinite", "step"].tolist() == [2]
    assert m.loc[m["kind"] == "train", "loss"].notna().sum() == 7  # the skipped step has none
    # reference: no NaN, but AdamW's second step() call does nothing (no parameter or state
    # update); the schedule, data and dropout streams go on as usual
    calls = []
    adamw_step = torch.optim.AdamW.step

    def step_but_the_second(self, *args, **kwargs):
        calls.append(1)
        return None if len(calls) == 2 else adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_but_the_second)
    ref = run(pbmc, tmp_path)
    assert len(calls) == 8
    a, b = model_weights(skipped), model_weights(ref)
    assert all_finite(a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_nonfinite_steps_in_a_row_stop_the_run_and_the_last_good_checkpoint_resumes(
    pbmc, skipped: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NaN at step 2 and from step 5 on, at most 2 in a row: steps 5, 6 are skipped, step 7
    stops the run. The periodic checkpoints of steps 2 and 6 (skipped) wait for the next finite
    step: 3 gets one, 7 never comes, so last.pt stays at step 4."""
    caplog.set_level("INFO", logger="evoformer.train")
    ckpt = tmp_path / "ckpt"
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, steps=[2], from_step=5)
        with pytest.raises(TrainingDiverged) as err:
            run(pbmc, tmp_path, max_nonfinite_steps=2)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("training diverged at step 7: ")
    assert "3 optimizer steps in a row" in msg and "4 skipped in all" in msg
    assert f"last good checkpoint is {ckpt / 'last.pt'} (step 4)" in msg
    assert "train.max_nonfinite_steps = 2" in msg
    written = [r.getMessage() for r in caplog.records if "checkpoint written" in r.getMessage()]
    assert [w.split(" (")[0] for w in written] == [
        "checkpoint written at step 3",
        "checkpoint written at step 4",
    ]
    skipped_lines = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert [x.split(":")[0] for x in skipped_lines] == ["step 2", "step 5", "step 6", "step 7"]
    assert not (tmp_path / "out" / "model.pt").exists()  # nothing written
    last = torch.load(ckpt / "last.pt", map_location="cpu", weights_only=False)
    assert last["step"] == 4 and last["n_nonfinite_steps"] == 1 and last["nonfinite_streak"] == 0
    assert all_finite(last["model"])
    # the same settings without the NaNs resume from it and end with the weights of the run
    # whose only NaN was at step 2
    out = run(pbmc, tmp_path, max_nonfinite_steps=2)
    assert any("resumed from" in r.getMessage() for r in caplog.records)
    summary = json.loads((out / "performance_summary.json").read_text())
    assert summary["n_nonfinite_steps"] == 1  # carried by the checkpoint
    a, b = model_weights(skipped), model_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_zero_tolerance_stops_at_the_first_nonfinite_gradient_with_one_error_line(
    pbmc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_nonfinite_steps 0: a finite loss whose gradients are NaN (step 3) stops the run;
    ``python -m evoformer.train`` ends with one ``error:`` line. At step 1, before any
    checkpoint, the line says so."""
    from evoformer.train import main

    def argv(d: Path) -> list[str]:
        train = {**TRAIN, "max_nonfinite_steps": 0, "ckpt_every": 1}
        spec = {"model": MODEL, "train": train, "fold": -1, "final": False}
        return [
            *("--binned", str(pbmc["binned"]), "--split", str(pbmc["split"])),
            *("--spec", json.dumps(spec), "--out", str(d / "out"), "--ckpt-dir", str(d / "ckpt")),
        ]

    orig = BioFormer.loss_terms
    monkeypatch.setattr(
        BioFormer, "loss_terms", poisoned_loss_terms(orig, ACCUM, [3], None, "grad")
    )
    with pytest.raises(SystemExit) as err:
        main(argv(tmp_path / "a"))
    line = str(err.value.code)
    assert "\n" not in line and line.startswith("error: training diverged at step 3: ")
    assert f"{tmp_path / 'a' / 'ckpt' / 'last.pt'} (step 2)" in line
    last = torch.load(tmp_path / "a" / "ckpt" / "last.pt", weights_only=False)
    assert last["step"] == 2 and all_finite(last["model"])

    monkeypatch.setattr(
        BioFormer, "loss_terms", poisoned_loss_terms(orig, ACCUM, [1], None, "grad")
    )
    with pytest.raises(SystemExit) as err:
        main(argv(tmp_path / "b"))
    line = str(err.value.code)
    assert line.startswith("error: training diverged at step 1: ")
    assert "no checkpoint was written before it" in line
    assert not (tmp_path / "b" / "ckpt" / "last.pt").exists()


@pytest.mark.slow
def test_two_processes_agree_when_only_one_sees_a_nonfinite_loss(pbmc, tmp_path: Path) -> None:
    """Rank 1's loss value is NaN at step 2 and from step 5 on, its gradients finite: rank 0
    alone would see nothing wrong. Both skip step 2 (rank 0 counts it), both stop at step 6
    (max 1 in a row) without hanging, and the log has one ``error:`` line."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    env = subprocess_env(tmp_path / "site", accum=2, steps=[2], from_step=5, mode="value", rank=1)
    train = {"max_steps": 8, "max_nonfinite_steps": 1, "dist_timeout_s": 60}
    p = launch(pbmc, out, ckpt, train=train, env=env)
    rc = p.wait(timeout=200)
    text = logtext(out)
    assert rc != 0, text[-3000:]
    errors = [x for x in text.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, text[-3000:]
    assert errors[0].startswith("error: training diverged at step 6: ")
    assert f"{ckpt / 'last.pt'} (step 4)" in errors[0]
    assert "step 2: non-finite loss (nan)" in text  # rank 0 logs it
    last = torch.load(ckpt / "last.pt", weights_only=False)  # written by rank 0
    assert last["step"] == 4 and last["n_nonfinite_steps"] == 1
    assert [r["step"] for r in last["history"] if r["kind"] == "nonfinite"] == [2]
    assert all_finite(last["model"])
    assert not (out / "model.pt").exists()


def test_the_step_collective_flags_a_nonfinite_value() -> None:
    from evoformer.distributed import reduce_step

    one, nan = torch.tensor(1.0), torch.tensor(math.nan)
    assert reduce_step(one, torch.tensor(2.0), (0.0, 0.0)) == (1.0, True, False, False)
    assert not reduce_step(one, nan, (0.0, 0.0)).finite
    assert not reduce_step(torch.tensor(math.inf), one, (0.0, 0.0)).finite
    assert reduce_step(one, one, (1.0, 1.0))[2:] == (True, True)


def test_max_nonfinite_steps_is_a_checked_training_option() -> None:
    assert TrainConfig.from_dict({}).max_nonfinite_steps == 5
    assert TrainConfig.from_dict({"max_nonfinite_steps": 0}).max_nonfinite_steps == 0
    with pytest.raises(InputError, match=r"'train.max_nonfinite_steps' must be >= 0, got -1"):
        TrainConfig.from_dict({"max_nonfinite_steps": -1})
