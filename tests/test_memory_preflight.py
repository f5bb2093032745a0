"""Pre-flight (refuse / accept / auto micro-batch), memory report, summary table and CLI."""

from __future__ import annotations

import json
import pathlib

import pandas as pd
import pytest

from evoformer.errors import InputError
from evoformer.memory.__main__ import JOURNAL_AS_RUN, main
from evoformer.memory.measured import measure_step
from evoformer.memory.preflight import WORKSPACE_MIB, preflight, write_preflight
from evoformer.memory.report import memory_table_from_json, report
from evoformer.memory.spec import data_shape, resolve_data_shape, spec_from_config

GIB = 2**30


def journal(**train):
    return (
        dict(JOURNAL_AS_RUN["model"]),
        {**JOURNAL_AS_RUN["train"], "global_batch_size": 64, **train},
        dict(JOURNAL_AS_RUN["data"]),
    )


def test_preflight_refuses_the_journals_naive_configuration():
    model, train, shape = journal(precision="auto")  # auto: bf16 autocast on the GPU
    with pytest.raises(InputError) as err:
        preflight(model, train, shape, gpu_mem_gib=80, n_gpus=2, opm="naive")
    msg = str(err.value)
    assert "\n" not in msg
    assert "micro_batch_size" in msg and "does not fit" in msg
    assert "naive outer product" in msg  # the dominant term
    assert "would fit: micro_batch_size <= " in msg
    res = preflight(model, train, shape, 80, 2, opm="naive", raise_on_oom=False)
    assert not res.fits and res.requested_peak_bytes > 150 * GIB
    assert 1 <= res.largest_fitting_micro_batch < 32
    assert res.suggestions and all(s["peak_bytes"] <= res.budget_bytes for s in res.suggestions)


def test_preflight_accepts_ours_and_reports_the_peak():
    model, train, shape = journal(precision="fp32")
    res = preflight(model, train, shape, gpu_mem_gib=80, n_gpus=2)
    assert res.fits and not res.adjusted
    assert res.predicted_peak_bytes < res.budget_bytes == int(80 * GIB * 0.9)
    assert res.micro_batch_size == 32 and res.grad_accumulation == 1
    assert abs(res.analytical_peak_bytes / res.predicted_peak_bytes - 1) < 0.1
    json.dumps(res.to_dict())  # serialisable
    # the issue-3 target: bf16 + checkpointing under 40 GiB
    bf = preflight({**model, "blocks_per_ckpt": 1}, {**train, "precision": "bf16"}, shape, 80, 2)
    assert bf.predicted_peak_bytes < 40 * GIB


def test_auto_micro_batch_keeps_the_global_batch():
    model, train, shape = journal(precision="bf16", global_batch_size=96)
    res = preflight(
        model, train, shape, gpu_mem_gib=24, n_gpus=2, auto_micro_batch=True, opm="naive"
    )
    assert res.adjusted and res.fits
    assert res.micro_batch_size < 32
    assert res.micro_batch_size * res.grad_accumulation * 2 == 96
    assert res.predicted_peak_bytes <= res.budget_bytes
    assert "using micro_batch_size" in res.message()


def test_bad_input_is_one_line():
    model, train, shape = journal()
    with pytest.raises(InputError, match="memory.safety_margin"):
        preflight(model, train, shape, 80, safety_margin=1.5)
    with pytest.raises(InputError, match="'seq_len' is missing"):
        preflight(model, train, {"n_genes": 5, "n_bins": 5}, 80)
    with pytest.raises(InputError, match="train.micro_batch_size"):
        spec_from_config(model, {"micro_batch_size": 0}, shape)
    with pytest.raises(InputError, match="d_model. is unknown"):
        spec_from_config({"d_model": 3}, train, shape)


def test_data_shape(tmp_path):
    assert data_shape(500, 51)["seq_len"] == 500
    assert data_shape(500, 51, include_zero_genes=False, max_len=321)["seq_len"] == 321
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"max_len": 77, "n_genes": 500, "n_bins": 21}))
    assert resolve_data_shape(500, 51, False, meta) == {
        "seq_len": 77,
        "n_genes": 500,
        "n_bins": 21,
        "n_labels": 0,
        "prior": False,
    }


def test_report_three_estimates_and_table(tmp_path):
    model = {"preset": "evoformer", "c_m": 32, "c_z": 16, "c_opm": 8, "n_blocks": 2}
    model.update(c_hidden_msa=8, c_hidden_pair=8, c_hidden_tri_mul=16)
    train = {"micro_batch_size": 2, "global_batch_size": 4, "precision": "auto"}
    shape = data_shape(47, 11)
    pf = write_preflight(tmp_path / "preflight.json", model, train, shape, gpu_mem_gib=80, n_gpus=2)
    assert pf.precision == "bf16"
    # the run fell back to one CPU process in fp32: measured with the profiler
    cpu = spec_from_config(model, train, shape, n_gpus=1, device="cpu")
    measured = measure_step(cpu)
    summary = {
        "peak_memory_bytes": measured.peak_bytes,
        "peak_memory_source": "profiler",
        "precision": "fp32",
        "config": {"model": model, "train": train},
        "system": {"device": "cpu", "world_size": 1},
    }
    (tmp_path / "performance_summary.json").write_text(json.dumps(summary))
    out = {k: tmp_path / f"memory.{k}" for k in ("md", "png", "html", "json")}
    row = report(
        tmp_path / "preflight.json",
        tmp_path / "performance_summary.json",
        out["md"],
        out["png"],
        out["html"],
        out["json"],
        experiment="tiny",
    )
    assert all(p.stat().st_size > 0 for p in out.values())
    assert pf.workspace_bytes == WORKSPACE_MIB * 2**20  # a GPU target: the default allowance
    assert row["workspace_allowance_bytes"] == pf.workspace_bytes
    assert row["traced_peak_bytes"] < 100 * 2**20 < pf.workspace_bytes  # not in the estimates
    assert row["device"] == "cpu" and row["precision"] == "fp32"
    assert abs(row["measured_over_traced"] - 1) < 0.1
    assert abs(row["traced_over_analytical"] - 1) < 0.1
    md = out["md"].read_text()
    assert "measured/traced" in md and "tri_att_start" in md and "memory.png" in md
    assert "Workspace allowance: 1.00 GiB (`memory.workspace_mib`" in md
    assert "+ workspace allowance 1.00 GiB (memory.workspace_mib)" in md  # in the verdict
    assert out["png"].read_bytes()[:4] == b"\x89PNG"
    # no summary yet: the measured column is empty, the report still renders
    row2 = report(
        tmp_path / "preflight.json", None, tmp_path / "b.md", tmp_path / "b.png", experiment="x"
    )
    assert row2["measured_peak_bytes"] is None and row2["measured_over_traced"] is None
    df = memory_table_from_json([out["json"]], tmp_path / "tables" / "memory.tsv")
    back = pd.read_csv(tmp_path / "tables" / "memory.tsv", sep="\t")
    assert list(back["experiment"]) == ["tiny"] and len(df) == 1
    assert {
        "traced_peak_gib",
        "analytical_peak_gib",
        "measured_peak_gib",
        "measured_over_traced",
        "workspace_allowance_gib",
    } <= set(back)


def test_the_workspace_allowance_is_part_of_the_verdict_on_gpu_targets_only():
    """A step that fits without the allowance and not with it is refused naming the allowance;
    the traced peak stays the trace's; a CPU target carries no allowance."""
    model = {"preset": "bioformer", "c_m": 32, "c_z": 16, "c_opm": 8, "n_blocks": 2}
    train = {"micro_batch_size": 8, "global_batch_size": 8, "precision": "fp32"}
    shape = data_shape(127, 11)  # ~55 MiB traced at micro-batch 8, ~7 MiB per cell
    mib = 2**20
    bare = preflight(model, train, shape, 80, workspace_mib=0)
    assert bare.fits and bare.workspace_bytes == 0
    # usable memory: the traced peak + 8 MiB; with an allowance of 16 MiB it no longer fits
    gib = (bare.predicted_peak_bytes + 8 * mib) / (0.9 * GIB)
    res = preflight(model, train, shape, gib, workspace_mib=16, raise_on_oom=False)
    assert not res.fits and res.workspace_bytes == 16 * mib
    assert res.requested_peak_bytes == bare.predicted_peak_bytes  # reported apart
    assert res.requested_peak_bytes <= res.budget_bytes < res.requested_peak_bytes + 16 * mib
    msg = res.message()  # what the pipeline's InputError says (raise_on_oom=True)
    assert msg.startswith("does not fit: ") and "\n" not in msg
    assert "+ workspace allowance 16.0 MiB (memory.workspace_mib) = " in msg
    # the micro-batch search leaves room for the allowance too
    assert 1 <= res.largest_fitting_micro_batch < 8
    assert f"would fit: micro_batch_size <= {res.largest_fitting_micro_batch}" in msg
    # a CPU run: no CUDA workspaces, the allowance does not apply however large
    cpu = preflight(model, train, shape, 80, workspace_mib=10**6, device="cpu")
    assert cpu.fits and cpu.workspace_bytes == 0
    assert "workspace allowance" not in cpu.message()
    with pytest.raises(InputError, match="'memory.workspace_mib': got -1"):
        preflight(model, train, shape, 80, workspace_mib=-1)


def test_cli(capsys):
    assert main(["--journal", "--gpus", "2", "--gpu-mem-gib", "80", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["fits"] and res["predicted_peak_bytes"] < 72 * GIB
    assert res["workspace_bytes"] == WORKSPACE_MIB * 2**20
    # the journal step (69.6 GiB analytical in fp32) on one 80 GiB GPU (72 GiB usable) fits
    # without the allowance, not with 4 GiB of it
    args = ["--journal", "--gpu-mem-gib", "80", "--method", "analytical"]
    assert main([*args, "--workspace-mib", "0"]) == 0
    assert main([*args, "--workspace-mib", "4096"]) == 1
    assert "workspace allowance 4.00 GiB" in capsys.readouterr().out
    assert main([*args, "--workspace-mib", "-5"]) == 2
    assert "memory.workspace_mib" in capsys.readouterr().err
    assert (
        main(["--journal", "--opm", "naive", "--gpu-mem-gib", "80", "--method", "analytical"]) == 1
    )
    out = capsys.readouterr().out
    assert "does not fit" in out and "PEAK per GPU" in out
    assert main(["--journal-table"]) == 0
    assert "524,288 MB" in capsys.readouterr().out
    assert main(["--preset", "bioformer", "--B", "0"]) == 2
    assert "micro_batch_size" in capsys.readouterr().err


def test_cli_takes_the_gene_count_from_the_binned_meta(tmp_path, capsys):
    """A Perturb-seq dataset's HVG set holds its perturbed genes beyond n_hvg: with the binned
    meta.json the CLI sizes the step by its n_genes (here 40 > n_hvg 32), not by n_hvg."""
    ci = pathlib.Path(__file__).parent / "config" / "ci.yaml"
    peaks = {}
    for n_genes in (None, 32, 40):
        args = ["--config", str(ci), "--experiment", "1", "--method", "analytical", "--json"]
        if n_genes is not None:
            meta = tmp_path / f"meta{n_genes}.json"
            meta.write_text(json.dumps({"max_len": n_genes, "n_genes": n_genes, "n_bins": 11}))
            args += ["--binned-meta", str(meta)]
        main(args)
        peaks[n_genes] = json.loads(capsys.readouterr().out)["analytical"]["peak_bytes"]
    assert peaks[None] == peaks[32] < peaks[40]


class _Named(dict):
    """Stand-in for Snakemake's Namedlist: attribute access, .get, positional [0]."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


def _run_script(name, tmp_path, **sections):
    import runpy
    from pathlib import Path
    from types import SimpleNamespace

    root = Path(__file__).resolve().parents[1]
    smk = SimpleNamespace(
        scriptdir=str(root / "workflow_scripts"),
        log=_Named(log=str(tmp_path / f"{name}.log")),
        **{k: _Named(v) for k, v in sections.items()},
    )
    runpy.run_path(str(root / "workflow_scripts" / f"{name}.py"), init_globals={"snakemake": smk})


def test_workflow_scripts(tmp_path):
    model = {"preset": "bioformer", "c_m": 32, "c_z": 16, "c_opm": 8, "n_blocks": 2}
    preflight = dict(
        model=model,
        train={"micro_batch_size": 2, "global_batch_size": 4, "label_head": True},
        n_hvg=40,
        n_bins=11,
        include_zero_genes=False,
        prior=False,
        gpu_mem_gib=80,
        safety_margin=0.1,
        workspace_mib=1024,
        auto_micro_batch=False,
        n_gpus=2,
    )
    binned = tmp_path / "binned"
    binned.mkdir()
    (binned / "meta.json").write_text(json.dumps({"max_len": 31, "n_genes": 40, "n_bins": 11}))
    pd.DataFrame({"cell_id": list("abcd"), "label": ["B", "T", "T", None]}).to_csv(
        binned / "cells.tsv", sep="\t", index=False
    )
    inputs = {"meta": str(binned / "meta.json"), "cells": str(binned / "cells.tsv")}
    out = tmp_path / "exp" / "preflight.json"
    _run_script(
        "preflight",
        tmp_path,
        input=inputs,
        output={"json": str(out)},
        params={"preflight": preflight},
    )
    pf = json.loads(out.read_text())
    # the sequence length is the binned data's longest cell; two label classes
    assert pf["fits"] and pf["spec"]["seq_len"] == 31 and pf["n_gpus"] == 2
    assert pf["spec"]["n_labels"] == 2
    # does not fit: exit 1, one line in the log, no output
    bad = tmp_path / "bad" / "preflight.json"
    with pytest.raises(SystemExit):
        _run_script(
            "preflight",
            tmp_path,
            input=inputs,
            output={"json": str(bad)},
            params={"preflight": {**preflight, "gpu_mem_gib": 0.001}},
        )
    assert not bad.exists()
    assert (
        "error: config 'experiment.train.micro_batch_size': does not fit"
        in (tmp_path / "preflight.log").read_text()
    )
    outputs = {k: str(tmp_path / "exp" / f"memory.{k}") for k in ("md", "png", "json")}
    _run_script(
        "memory_report",
        tmp_path,
        input={"preflight": str(out)},
        output=outputs,
        params={"experiment": "exp"},
    )
    assert json.loads(pathlib.Path(outputs["json"]).read_text())["experiment"] == "exp"
    tsv = tmp_path / "tables" / "memory.tsv"
    _run_script(
        "memory_report",
        tmp_path,
        input={"reports": [outputs["json"]]},
        output={"tsv": str(tsv)},
        params={},
    )
    assert len(pd.read_csv(tsv, sep="\t")) == 1


def test_training_takes_the_micro_batch_only_when_the_preflight_lowered_it(tmp_path):
    from evoformer.train import apply_preflight

    spec = {"model": {}, "train": {"micro_batch_size": 8, "global_batch_size": 16}, "fold": 0}
    pf = tmp_path / "preflight.json"
    pf.write_text(json.dumps({"adjusted": False, "micro_batch_size": 8}))
    assert apply_preflight(spec, pf) == spec
    pf.write_text(json.dumps({"adjusted": True, "micro_batch_size": 2}))
    out = apply_preflight(spec, pf)
    assert out["train"] == {"micro_batch_size": 2, "global_batch_size": 16}
    assert spec["train"]["micro_batch_size"] == 8  # not modified in place
    pf.write_text("{not json")
    with pytest.raises(InputError, match="preflight.json: cannot read the pre-flight result"):
        apply_preflight(spec, pf)


def test_memory_snapshot_is_a_training_option():
    from evoformer.train_config import TrainConfig

    assert TrainConfig.from_dict({"memory_snapshot": True}).memory_snapshot is True
    assert TrainConfig.from_dict({}).memory_snapshot is False
    with pytest.raises(InputError, match="memory_snapshots"):
        TrainConfig.from_dict({"memory_snapshots": True})
