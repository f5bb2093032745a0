"""Tasks (evoformer.tasks): the trainer and the evaluation know no task; the perturbation task's
batches, model inputs, training, resume and predictions; fine-tuning from a pretrained model."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from evoformer.data.arrays import BinnedData
from evoformer.errors import InputError
from evoformer.model import BioFormer, ModelConfig
from evoformer.model.saved import init_from_pretrained, load_model
from evoformer.perturb.conditions import CONTROL, condition_genes
from evoformer.perturb.splits import read_split
from evoformer.perturb.stats import read_hvg_types
from evoformer.tasks import TASKS, TaskInputs
from evoformer.tasks.perturbation import (
    TYPE_INDEX,
    PerturbationBatches,
    ScreenCells,
    predict_file,
    read_predictions,
)
from evoformer.train import train
from evoformer.train_config import RunSpec
from tests.perturb_screen import make_screen

REPO = Path(__file__).resolve().parents[1]
MODEL = {"preset": "bioformer", "c_m": 16, "c_z": 8, "c_opm": 4, "n_heads_msa": 2,
         "c_hidden_msa": 8, "n_blocks": 1}  # fmt: skip
TRAIN = {"micro_batch_size": 8, "global_batch_size": 16, "epochs": 2, "lr": 0.003,
         "warmup_steps": 2, "log_every": 5, "patience": None, "ckpt_every": 4,
         "cpu_processes": 1, "monitor": "val_pearson_delta"}  # fmt: skip


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_screen(tmp_path_factory.mktemp("screen"))


def perturbation_spec(**changes) -> dict:
    spec = {
        "task": "perturbation",
        "model": MODEL,
        "train": TRAIN,
        "perturbation": {"target": "mean", "n_eval_controls": 8},
    }
    return {**spec, **changes}


def cells_of(screen) -> ScreenCells:
    return ScreenCells(
        BinnedData.open(screen["binned"]),
        read_split(screen["split"]),
        read_hvg_types(screen["hvg"]),
        str(screen["split"]),
    )


# ----------------------------------------------------------------------------- structure
@pytest.mark.parametrize("module", ["evoformer/train.py", "evoformer/evaluate.py"])
def test_the_trainer_and_the_evaluation_name_no_task(module: str) -> None:
    """The trainer asks its task for everything task-specific: no task module is imported and
    no task's batch keys or metrics are spelled in it (the masked task's test evaluation,
    evaluate.py, imports only the masked task)."""
    source = (REPO / module).read_text()
    tree = ast.parse(source)
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    if module.endswith("train.py"):
        assert not {m for m in imported if m.startswith("evoformer.tasks.")}
        for word in ("loss_mask", "perturbed", "label_names", "val_expr", "pearson_delta"):
            assert word not in source, word
        assert "task ==" not in source and "task !=" not in source
    else:
        assert "evoformer.tasks.perturbation" not in imported


def test_every_task_is_registered_with_its_metrics() -> None:
    from evoformer.train_config import TASK_METRICS

    assert set(TASKS) == set(TASK_METRICS)
    with pytest.raises(InputError, match="train.monitor"):
        RunSpec.from_dict(perturbation_spec(train={**TRAIN, "monitor": "val_expr_mse"}))
    with pytest.raises(InputError, match="task"):
        RunSpec.from_dict(perturbation_spec(task="imputation"))


def test_a_masked_expression_spec_is_what_it_was_before_tasks() -> None:
    d = RunSpec.from_dict({"model": MODEL, "train": {**TRAIN, "monitor": "val_expr_mse"}}).to_dict()
    assert not {"task", "perturbation", "init"} & set(d)


# ----------------------------------------------------------------------------- the batch
def test_the_perturbation_batch(screen) -> None:
    cells = cells_of(screen)
    plan = [(np.arange(8), 3, 1), (np.arange(8, 16), 4, 0)]
    batches = PerturbationBatches(cells, plan, seed=5, epoch=1, rank=0, target="mean")
    b = batches[0]
    assert b["values"].shape == b["perturbed"].shape == b["target"].shape == (8, 1, 40)
    # the same batch whenever it is asked for (workers, resume); another step draws others
    again = PerturbationBatches(cells, plan, seed=5, epoch=1, rank=0, target="mean")[0]
    assert all(torch.equal(b[k], again[k]) for k in b)
    other = PerturbationBatches(cells, plan, seed=5, epoch=2, rank=0, target="mean")[0]
    assert not torch.equal(b["values"], other["values"])
    rows = cells.train_items[np.arange(8)]
    train_controls = set(cells.train_controls.tolist())
    values = np.asarray(cells.data.values)
    for i, row in enumerate(rows):
        cond = cells.condition[row]
        # the input is one of the training controls (never a val/test control)
        matches = [r for r in train_controls if np.array_equal(values[r], b["values"][i, 0])]
        assert matches and all(cells.condition[r] == CONTROL for r in matches)
        # flags: the type index at the perturbed genes' tokens, 0 elsewhere
        flagged = {cells.tokens[j] for j in np.flatnonzero(b["perturbed"][i, 0].numpy())}
        assert flagged == set(condition_genes(cond))
        assert set(b["perturbed"][i, 0].unique().tolist()) == {0, TYPE_INDEX["knockdown"]}
        # target: the mean of the condition's training cells
        mine = np.flatnonzero(cells.condition == cond)
        expected = np.asarray(cells.data.expression[mine], np.float64).mean(0)
        np.testing.assert_allclose(b["target"][i, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    cell_target = PerturbationBatches(cells, plan, seed=5, epoch=1, rank=0, target="cell")[0]
    np.testing.assert_array_equal(
        cell_target["target"][:, 0].numpy(), np.asarray(cells.data.expression[rows], np.float32)
    )


def test_the_flags_enter_m_and_z_at_the_perturbed_genes_only() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(MODEL)
    model = BioFormer(
        cfg, n_genes=10, n_bins=5, n_perturbation_types=3, output="expression",
        expression_baseline=torch.linspace(0, 1, 10),
    )  # fmt: skip
    gene_ids = torch.arange(10).view(1, 1, 10)
    values = torch.randint(0, 5, (1, 1, 10))
    pad = torch.ones(1, 1, 10, dtype=torch.bool)
    none = torch.zeros(1, 1, 10, dtype=torch.long)
    flag = none.clone()
    flag[0, 0, 3] = 2
    m0, z0, _, _ = model.embed(gene_ids, values, pad, none)
    m1, z1, _, _ = model.embed(gene_ids, values, pad, flag)
    changed_m = (m1 - m0).abs().sum(-1)[0, 0]  # [r]
    assert torch.nonzero(changed_m).flatten().tolist() == [4]  # token 3 = position 4 (CLS 0)
    changed_z = (z1 - z0).abs().sum(-1)[0] > 0  # [r, r]
    expect = torch.zeros(11, 11, dtype=torch.bool)
    expect[4, :] = expect[:, 4] = True
    assert torch.equal(changed_z, expect)
    # untrained, the expression head predicts the baseline: no change
    out = model(gene_ids, values, pad, flag)
    torch.testing.assert_close(out["expression"][0, 0], torch.linspace(0, 1, 10))
    assert out["pred"] is None


# ----------------------------------------------------------------------------- training
def run_training(screen, tmp: Path, spec: dict, name: str = "run") -> Path:
    out = tmp / name
    train(screen["binned"], screen["split"], spec, out / "train", out / "ckpt", screen["hvg"])
    return out / "train"


def test_the_perturbation_task_trains_resumes_bit_for_bit_and_predicts(
    screen, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = perturbation_spec()
    ref = run_training(screen, tmp_path, spec, "ref")
    summary = json.loads((ref / "performance_summary.json").read_text())
    assert summary["task"] == "perturbation" and summary["monitor"] == "val_pearson_delta"
    metrics = pd.read_csv(ref / "metrics.tsv", sep="\t")
    assert {"val_loss", "val_mse", "val_pearson_delta"} <= set(metrics.columns)

    # interrupted after the step-4 checkpoint, then resumed: the same weights
    import evoformer.train as trainer

    calls = {"n": 0}
    original = trainer.reduce_step

    def stop_at_step_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "reduce_step", stop_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run_training(screen, tmp_path, spec, "resumed")
    monkeypatch.setattr(trainer, "reduce_step", original)
    assert (tmp_path / "resumed" / "ckpt" / "last.pt").exists()
    resumed = run_training(screen, tmp_path, spec, "resumed")
    a = torch.load(ref / "model.pt", weights_only=True)["model"]
    b = torch.load(resumed / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    table = predict_file(ref / "model.pt", screen["binned"], screen["split"], screen["hvg"],
                         tmp_path / "pred.tsv")  # fmt: skip
    split = read_split(screen["split"])
    held_out = set(split.loc[split["set"].isin(["val", "test"]), "condition"]) - {CONTROL}
    assert set(table.index) == held_out
    back = read_predictions(tmp_path / "pred.tsv")
    assert list(back.columns) == list(table.columns)
    np.testing.assert_allclose(back.to_numpy(), table.to_numpy(), rtol=1e-5)
    model, saved = load_model(
        ref / "model.pt", list(BinnedData.open(screen["binned"]).genes["gene_id"])
    )
    assert saved["task"] == "perturbation" and model.expression_head is not None


def test_the_masked_task_pretrains_on_a_perturbation_split_and_finetuning_loads_it(
    screen, tmp_path: Path
) -> None:
    masked = {"model": MODEL, "train": {**TRAIN, "monitor": "val_expr_mse", "epochs": 1}}
    pre = run_training(screen, tmp_path, masked, "pre")
    info = json.loads((pre / "run_info.json").read_text())
    cells = cells_of(screen)
    split = read_split(screen["split"])
    # pretrained on the training cells only (controls and training conditions)
    assert info["n_train_items"] == int((split["set"] == "train").sum())
    genes = BinnedData.open(screen["binned"]).genes["gene_id"].astype(str).tolist()
    assert len(cells.tokens) == len(genes)

    spec = perturbation_spec(init=str(pre / "model.pt"), train={**TRAIN, "max_steps": 1})
    fine = run_training(screen, tmp_path, spec, "fine")
    report = json.loads((fine / "performance_summary.json").read_text())["init"]
    assert "gene_embedding.weight" in report["copied"]
    assert any(n.startswith("value_head") for n in report["unused"])
    assert any(n.startswith("perturbation_embedding") for n in report["new"])

    # exactly the named weights: every copied tensor equals the pretrained one
    task = TASKS["perturbation"](RunSpec.from_dict(spec), TaskInputs(
        screen["binned"], screen["split"], screen["hvg"]))  # fmt: skip
    model = task.build_model()
    report = init_from_pretrained(model, pre / "model.pt", task.genes)
    src = torch.load(pre / "model.pt", weights_only=True)["model"]
    own = dict(model.named_parameters())
    assert all(torch.equal(own[n], src[n]) for n in report["copied"])


def test_finetuning_refuses_other_genes_and_shapes(screen, tmp_path: Path) -> None:
    torch.manual_seed(0)
    genes = [f"G{i}" for i in range(10)]
    small = BioFormer(ModelConfig.from_dict(MODEL), n_genes=10, n_bins=11)
    path = tmp_path / "model.pt"
    torch.save({"model": small.state_dict(), "model_config": MODEL, "n_genes": 10, "n_bins": 11,
                "genes": genes}, path)  # fmt: skip
    target = BioFormer(ModelConfig.from_dict(MODEL), n_genes=10, n_bins=11)
    with pytest.raises(InputError, match="knows 2 of this model's 10 genes"):
        init_from_pretrained(target, path, ["G0", "G1", *[f"X{i}" for i in range(8)]])
    # genes matched by name, in another order
    shuffled = genes[::-1]
    init_from_pretrained(target, path, shuffled)
    torch.testing.assert_close(target.gene_embedding.weight[0], small.gene_embedding.weight[9])
    wider = BioFormer(ModelConfig.from_dict({**MODEL, "c_z": 16}), n_genes=10, n_bins=11)
    with pytest.raises(InputError, match=r"parameter pair_left.weight is \[8, 16\]"):
        init_from_pretrained(wider, path, genes)
    deeper = BioFormer(ModelConfig.from_dict({**MODEL, "n_blocks": 2}), n_genes=10, n_bins=11)
    with pytest.raises(InputError, match=r"architecture \(parameter stack.blocks"):
        init_from_pretrained(deeper, path, genes)
    plain = BioFormer(ModelConfig.from_dict({**MODEL, "preset": "none"}), n_genes=10, n_bins=11)
    with pytest.raises(InputError, match="architecture"):
        init_from_pretrained(plain, path, genes)
    other_bins = BioFormer(ModelConfig.from_dict(MODEL), n_genes=10, n_bins=21)
    with pytest.raises(InputError, match="pretrained with n_bins 11, this model has 21"):
        init_from_pretrained(other_bins, path, genes)
