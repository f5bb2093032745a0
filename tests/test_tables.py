"""Result tables: determinism, CV mean/std and selection, provenance, plots, the workflow script."""

from __future__ import annotations

import json
import math
import random
import runpy
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from evoformer.errors import InputError
from evoformer.flops.peaks import THROUGHPUT_FIELDS, throughput_fields
from evoformer.tables import (
    build_tables,
    fmt,
    lower_is_better,
    read_selected,
    select_best,
    selection,
)

SWEEP = ["n_bins", "ln_order"]
# a step's FLOP count (the fields throughput_fields reads), as a training's summary holds it
COST = SimpleNamespace(model_flops_per_sample=3e9, hardware_flops_per_sample=4e9)
ROOT = Path(__file__).resolve().parents[1]

# validation losses per (n_bins, ln_order) and fold; test metrics deliberately favour another point
VAL = {
    (11, "pre"): [0.90, 1.10],  # mean 1.00
    (11, "post"): [0.70, 0.80],  # mean 0.75  <- best by validation
    (21, "pre"): [1.20, 1.40],  # mean 1.30
    (21, "post"): [0.95, 0.85],  # mean 0.90
}
TEST_BIN_ACC = {(11, "pre"): 0.9, (11, "post"): 0.1, (21, "pre"): 0.99, (21, "post"): 0.2}
# expression-space test metrics: the model better on MSE, undecided on Pearson, worse on AUROC
EXPR = {
    "model_expr_mse": 0.5,
    "mean_expr_mse": 0.9,
    "diff_mean_expr_mse": -0.4,
    "diff_mean_expr_mse_lo": -0.45,
    "diff_mean_expr_mse_hi": -0.35,
    "model_expr_mse_lo": 0.45,
    "model_expr_mse_hi": 0.55,
    "ridge_expr_mse": 0.6,
    "ridge_expr_mse_lo": 0.55,
    "ridge_expr_mse_hi": 0.65,
    "best_baseline_expr_mse": "ridge",
    "diff_expr_mse": -0.1,
    "diff_expr_mse_lo": -0.15,
    "diff_expr_mse_hi": -0.05,
    "model_expr_pearson": 0.70,
    "knn_expr_pearson": 0.71,
    "best_baseline_expr_pearson": "knn",
    "diff_expr_pearson": -0.01,
    "diff_expr_pearson_lo": -0.04,
    "diff_expr_pearson_hi": 0.02,
    "model_expr_auroc_zero": 0.80,
    "mean_expr_auroc_zero": 0.90,
    "best_baseline_expr_auroc_zero": "mean",
    "diff_expr_auroc_zero": -0.1,
    "diff_expr_auroc_zero_lo": -0.12,
    "diff_expr_auroc_zero_hi": -0.08,
}


def write_run(
    d: Path, point: tuple, fold: int | str, val_loss: float | None, test_acc: float, speed: float
) -> dict:
    """Files of one fake trained + evaluated model; returns its record."""
    d.mkdir(parents=True)
    rows = [
        {"kind": "train", "step": s, "epoch": 0, "loss": 2.0 - 0.1 * s, "lr": 1e-3}
        for s in (1, 2, 3)
    ]
    if val_loss is not None:
        rows += [
            {
                "kind": "val",
                "step": 2,
                "epoch": 0,
                "val_loss": val_loss + 0.5,
                "val_bin_acc": 0.3,
                "val_expr_mse": val_loss + 0.5,
            },
            {
                "kind": "val",
                "step": 3,
                "epoch": 1,
                "val_loss": val_loss,
                "val_bin_acc": 1 - val_loss / 2,
                "val_expr_mse": val_loss,
            },
        ]
    pd.DataFrame(rows).to_csv(d / "metrics.tsv", sep="\t", index=False)
    perf = {
        "total_samples": 48,
        "total_steps": 3,
        "average_speed_samples_per_s": speed,
        **throughput_fields(COST, speed, 2, None, None),
        "average_batch_time_ms": 1000 / speed,
        "peak_memory_bytes": 123456789,
        "peak_memory_source": "rss",
        "precision": "fp32",
        "n_parameters": 1234,
        "selected_step": 3,
        "selected_epochs": 1.5 if fold != 1 else 2.5,
        "config": {"model": {"n_bins": point[0], "ln_order": point[1]}, "fold": str(fold)},
        "system": {
            "hostname": f"node{speed:.0f}",
            "torch": "2.13.0",
            "device": "cpu",
            "world_size": 2,
        },
    }
    (d / "performance_summary.json").write_text(json.dumps(perf))
    ev = {
        "metrics": {
            "n_masked": 100,
            "n_masked_nonzero": 40,
            "model_bin_acc": test_acc,
            "mean_bin_acc": 0.25,
            "model_bin_pearson": float("nan"),
            "probe_cls_logreg_accuracy": None,
            **EXPR,
        },
        "versions": {"evoformer": "0.1.0", "scanpy": "1.11.5", "torch": "2.13.0"},
    }
    (d / "eval_metrics.json").write_text(json.dumps(ev))
    rec = {
        "id": f"n_bins~{point[0]}/ln_order~{point[1]}",
        "n_bins": point[0],
        "ln_order": point[1],
        "fold": fold,
        "eval_metrics": str(d / "eval_metrics.json"),
        "performance_summary": str(d / "performance_summary.json"),
        "train_metrics": str(d / "metrics.tsv"),
    }
    return rec


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    d = tmp_path_factory.mktemp("runs")
    recs, speed = [], 100.0
    for point, losses in VAL.items():
        for fold, loss in enumerate(losses):
            speed += 7.3
            recs.append(
                write_run(
                    d / f"{point[0]}_{point[1]}_{fold}",
                    point,
                    fold,
                    loss,
                    TEST_BIN_ACC[point],
                    speed,
                )
            )
    recs.append(write_run(d / "final", (11, "post"), "final", None, 0.5, 99.0))
    return recs


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=False, dtype=str)


def test_tables_byte_identical_whatever_the_record_order(
    records: list[dict], tmp_path: Path
) -> None:
    prov = {"git_commit": "abc123"}
    a = build_tables(records, SWEEP, tmp_path / "a", prov)
    shuffled = list(records)
    random.Random(3).shuffle(shuffled)
    assert shuffled != records
    b = build_tables(shuffled, SWEEP, tmp_path / "b", prov)
    for key in ("metrics", "cv_summary", "performance"):
        assert a[key].read_bytes() == b[key].read_bytes(), key
    m = read(a["metrics"])
    assert len(m) == 9
    # sorted by n_bins (numerically), ln_order, fold
    keys = list(zip(m["n_bins"].astype(int), m["ln_order"], m["fold"], strict=True))
    assert keys == [
        (11, "post", "0"),
        (11, "post", "1"),
        (11, "post", "final"),
        (11, "pre", "0"),
        (11, "pre", "1"),
        (21, "post", "0"),
        (21, "post", "1"),
        (21, "pre", "0"),
        (21, "pre", "1"),
    ]


def test_metrics_table_content_and_provenance(records: list[dict], tmp_path: Path) -> None:
    paths = build_tables(records, SWEEP, tmp_path, {"git_commit": "abc123"})
    m = read(paths["metrics"])
    row = m[(m["n_bins"] == "21") & (m["ln_order"] == "post") & (m["fold"] == "1")].iloc[0]
    assert row["val_loss"] == "0.85"  # the last validation row, not the earlier one
    assert row["val_bin_acc"] == fmt(1 - 0.85 / 2)
    assert row["train_loss"] == "1.7"
    assert row["model_bin_acc"] == "0.2" and row["mean_bin_acc"] == "0.25"
    assert row["model_bin_pearson"] == "NA" and row["probe_cls_logreg_accuracy"] == "NA"
    assert row["n_parameters"] == "1234" and row["diff_expr_mse_lo"] == "-0.15"
    assert row["n_masked"] == "100"
    assert row["git_commit"] == "abc123" and row["torch"] == "2.13.0" and row["scanpy"] == "1.11.5"
    assert row["device"] == "cpu" and len(row["config_hash"]) == 12
    final = m[m["fold"] == "final"].iloc[0]
    assert final["val_loss"] == "NA"
    # run-to-run measurements stay out of metrics.tsv and cv_summary.tsv
    text = paths["metrics"].read_text() + paths["cv_summary"].read_text()
    for word in ("hostname", "node", "speed", "time_ms", "peak_memory", "flops"):
        assert word not in text
    perf = read(paths["performance"])
    assert {"average_speed_samples_per_s", "peak_memory_bytes", "hostname", "world_size"} <= set(
        perf
    )
    assert perf["peak_memory_bytes"].eq("123456789").all()
    # the efficiency columns right after the speed; no peak on CPU: no utilisation
    cols = list(perf)
    at = cols.index("average_speed_samples_per_s")
    assert cols[at + 1 : at + 1 + len(THROUGHPUT_FIELDS)] == list(THROUGHPUT_FIELDS)
    assert perf["model_flops_per_sample"].eq("3e+09").all()
    speed = perf["average_speed_samples_per_s"].astype(float)
    tflops = perf["model_tflops_per_s"].astype(float)
    assert (abs(tflops - 3e9 * speed / 1e12) <= 1e-5 * tflops).all()
    assert perf["model_flops_utilization"].eq("NA").all()
    assert perf["peak_tflops_per_device"].eq("NA").all()
    assert len(perf) == len(records)


def test_cv_summary_mean_std_and_selection_ignore_test_metrics(
    records: list[dict], tmp_path: Path
) -> None:
    paths = build_tables(records, SWEEP, tmp_path, {"git_commit": "x"})
    cv = pd.read_csv(paths["cv_summary"], sep="\t")
    assert len(cv) == 4  # grid points, final retrain not among them
    for (nb, ln), losses in VAL.items():
        row = cv[(cv["n_bins"] == nb) & (cv["ln_order"] == ln)].iloc[0]
        mean = sum(losses) / 2
        std = math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1))
        assert row["val_loss_mean"] == pytest.approx(mean, rel=1e-5)
        assert row["val_loss_std"] == pytest.approx(std, rel=1e-5)
        assert row["n_folds"] == 2 and row["folds"] == "0,1"
    best = cv[cv["selected"]]
    assert len(best) == 1
    # lowest mean validation loss, although (21, pre) has by far the best test accuracy
    assert (best["n_bins"].item(), best["ln_order"].item()) == (11, "post")
    assert list(cv.sort_values("rank")["val_loss_mean"]) == sorted(cv["val_loss_mean"])
    assert "model_bin_acc" not in " ".join(cv.columns)
    assert read_selected(paths["cv_summary"], SWEEP) == {"n_bins": "11", "ln_order": "post"}
    assert select_best(records, SWEEP) == {"n_bins": 11, "ln_order": "post"}
    assert select_best(records, SWEEP, "val_loss") == {"n_bins": 11, "ln_order": "post"}
    # the final retrain trains for the mean of the epochs early stopping chose in the folds
    chosen = selection(records, SWEEP)
    assert chosen["selected"] == {"n_bins": 11, "ln_order": "post"}
    assert chosen["final_epochs"] == pytest.approx((1.5 + 2.5) / 2)
    # maximising the validation bin accuracy picks the same point (acc = 1 - loss / 2)
    assert select_best(records, SWEEP, "val_bin_acc") == {"n_bins": 11, "ln_order": "post"}
    assert select_best(records, SWEEP, "val_loss", higher_is_better=True) == {
        "n_bins": 21,
        "ln_order": "pre",
    }


def test_summary_states_model_baseline_difference_and_verdict(
    records: list[dict], tmp_path: Path
) -> None:
    paths = build_tables(records, SWEEP, tmp_path, {"git_commit": "abc123"})
    text = paths["summary"].read_text()
    assert "Commit `abc123`" in text
    final = text.split("## n_bins=11, ln_order=post (final retrain")[1].split("##")[0]
    mse = next(line for line in final.splitlines() if "masked expression MSE (all" in line)
    assert "the model scores 0.5 (95% CI 0.45 to 0.55)" in mse
    assert "ridge co-expression" in mse and "scores 0.6 (95% CI 0.55 to 0.65)" in mse
    assert "Difference -0.1 (95% CI -0.15 to -0.05): the model is better." in mse
    assert (
        "Against the per-gene mean (0.9): difference -0.4 (95% CI -0.45 to -0.35), the model" in mse
    )
    pearson = next(line for line in final.splitlines() if "Pearson correlation of" in line)
    assert "no clear difference" in pearson and "kNN" in pearson
    auroc = next(line for line in final.splitlines() if "AUROC" in line)
    assert auroc.endswith("the baseline is better.")
    assert "beats the strongest baseline on 1 of the 6 metrics and loses on 1" in final
    selection_part = text.split("## Model selection")[1]
    assert "1. n_bins=11, ln_order=post: val_expr_mse 0.75" in selection_part
    assert "(selected)" in selection_part.splitlines()[2]


def test_selection_direction_from_name() -> None:
    assert lower_is_better("val_loss") and lower_is_better("model_mre")
    assert not lower_is_better("val_bin_acc") and not lower_is_better("val_balance")


def test_holdout_runs_stand_in_without_cv(records: list[dict], tmp_path: Path) -> None:
    holdout = [{**r, "fold": -1} for r in records if r["fold"] == 0]
    paths = build_tables(holdout, SWEEP, tmp_path, {})
    cv = read(paths["cv_summary"])
    assert set(cv["n_folds"]) == {"1"} and set(cv["val_loss_std"]) == {"NA"}
    assert set(read(paths["metrics"])["fold"]) == {"holdout"}
    assert read(paths["metrics"])["git_commit"].eq("unknown").all()
    sel = cv[cv["selected"] == "true"]
    assert (sel["n_bins"].item(), sel["ln_order"].item()) == ("11", "post")  # 0.70 is lowest


def test_plots_are_pngs(records: list[dict], tmp_path: Path) -> None:
    paths = build_tables(records, SWEEP, tmp_path, {})
    for key in ("metric_plot", "learning_curves"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_records_raise_input_error(records: list[dict], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing sweep key"):
        build_tables([{k: v for k, v in records[0].items() if k != "ln_order"}], SWEEP, tmp_path)
    with pytest.raises(InputError, match="listed twice"):
        build_tables([records[0], dict(records[0])], SWEEP, tmp_path)
    with pytest.raises(InputError, match="not found"):
        build_tables([{**records[0], "eval_metrics": str(tmp_path / "nope.json")}], SWEEP, tmp_path)
    with pytest.raises(InputError, match="fold"):
        build_tables([{**records[0], "fold": "third"}], SWEEP, tmp_path)
    with pytest.raises(InputError, match="selection metric"):
        build_tables(records, SWEEP, tmp_path, selection_metric="val_nonsense")
    assert not (tmp_path / "metrics.tsv").exists()


def test_workflow_script_writes_outputs_and_one_line_errors(
    records: list[dict], tmp_path: Path
) -> None:
    from snakemake.iocontainers import Namedlist

    class Snake:
        pass

    def snake(recs: list[dict], out: Path) -> Snake:
        s = Snake()
        s.scriptdir = str(ROOT / "workflow_scripts")
        s.input = Namedlist()
        s.output = Namedlist(
            fromdict={
                k: str(out / f"{k}.out")
                for k in (
                    "summary",
                    "metrics",
                    "cv_summary",
                    "performance",
                    "metric_plot",
                    "learning_curves",
                )
            }
        )
        s.params = Namedlist(
            fromdict={"records": recs, "sweep_keys": SWEEP, "git_commit": "c0ffee"}
        )
        s.log = Namedlist(fromdict={"log": str(out / "tables.log")})
        return s

    script = str(ROOT / "workflow_scripts" / "tables.py")
    runpy.run_path(script, init_globals={"snakemake": snake(records, tmp_path / "ok")})
    m = read(tmp_path / "ok" / "metrics.out")
    assert m["git_commit"].eq("c0ffee").all() and len(m) == len(records)
    bad = [{**records[0], "train_metrics": str(tmp_path / "missing.tsv")}]
    with pytest.raises(SystemExit):
        runpy.run_path(script, init_globals={"snakemake": snake(bad, tmp_path / "bad")})
    log = (tmp_path / "bad" / "tables.log").read_text().strip().splitlines()
    lines = [line for line in log if line.startswith("error: ")]
    assert len(lines) == 1 and "missing.tsv" in lines[0] and "not found" in lines[0]
