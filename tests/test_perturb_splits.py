"""Perturbation-level splits: no leakage, subgroup rules, the GEARS simulation and double splits,
custom lists, control cells, reproducibility, order independence, the TSV, bad input."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from evoformer.errors import InputError
from evoformer.perturb.conditions import CONTROL, condition_genes, n_perturbed
from evoformer.perturb.splits import (
    ControlFractions,
    PerturbSplitParams,
    assign_conditions,
    check_split,
    read_split,
    run_perturbation_split,
    split_perturbation_cells,
    split_summary,
    subgroup_of,
    write_split,
)

GENES = [f"G{i:02d}" for i in range(16)]
# every gene's single and every third pair of genes as a double
SCREEN = GENES + [f"{a}+{b}" for a, b in itertools.combinations(GENES, 2)][::3]


def make_cells(conditions, cells_per_condition=4, n_ctrl=60, seed=0):
    """A shuffled cell table: ``cells_per_condition`` cells per condition plus controls."""
    conds = [c for c in conditions for _ in range(cells_per_condition)] + [CONTROL] * n_ctrl
    ids = [f"cell{i:05d}" for i in range(len(conds))]
    order = np.random.default_rng(seed).permutation(len(conds))
    return pd.DataFrame({"cell_id": np.array(ids)[order], "condition": np.array(conds)[order]})


def assert_no_leakage(table):
    train_conditions = set(table.condition[table.set == "train"]) - {CONTROL}
    held = table[(table.set != "train") & (table.condition != CONTROL)]
    assert len(held) and not set(held.condition) & train_conditions
    assert table.cell_id.is_unique


@pytest.mark.parametrize(
    "params",
    [
        PerturbSplitParams(kind="simulation", seed=2),
        PerturbSplitParams(kind="double", seed=2),
        PerturbSplitParams(kind="custom", test=("G00", "G01+G05"), val=("G05",)),
        PerturbSplitParams(kind="custom", test=("G00+G01",)),
    ],
    ids=["simulation", "double", "custom", "custom-drawn-val"],
)
def test_no_leakage_every_cell_once(params):
    cells = make_cells(SCREEN)
    table = split_perturbation_cells(cells, params)
    assert list(table.columns) == ["cell_id", "condition", "set", "subgroup"]
    assert list(table.cell_id) == list(cells.cell_id)  # input order, every cell once
    assert_no_leakage(table)
    assert set(table.set) == {"train", "val", "test"}
    assert (table.subgroup[table.condition == CONTROL] == "control").all()
    pert_train = (table.set == "train") & (table.condition != CONTROL)
    assert (table.subgroup[pert_train] == "train").all()
    # the guarantees are checked: moving one test cell into training is refused
    leaked = table.copy()
    leaked.loc[leaked.index[(leaked.set == "test") & (leaked.condition != CONTROL)][0], "set"] = (
        "train"
    )
    with pytest.raises(InputError, match="several sets"):
        check_split(leaked, "x")


def test_subgroup_rules_on_a_hand_built_screen():
    screen = ["A", "B", "C", "D", "F", "A+B", "A+C", "A+E", "B+E", "C+D", "C+E", "D+E"]
    params = PerturbSplitParams.from_dict(
        {"kind": "custom", "test": ["B+A", "C", "D+E", "C+E", "F"], "val": ["A+E"]}
    )
    got = assign_conditions(screen + [CONTROL], params).set_index("condition")
    # training: A, B, D, A+C, B+E, C+D -> seen genes (single in training): A, B, D
    expected = {
        "A": ("train", "train"),
        "B": ("train", "train"),
        "D": ("train", "train"),
        "A+C": ("train", "train"),
        "B+E": ("train", "train"),
        "C+D": ("train", "train"),
        "A+B": ("test", "combo_seen2"),  # both singles trained on
        "D+E": ("test", "combo_seen1"),  # E has no single at all
        "C+E": ("test", "combo_seen0"),  # C's single is a test condition: not seen
        "C": ("test", "seen_single"),  # C is perturbed in training doubles A+C, C+D
        "F": ("test", "unseen_single"),  # F is in no training condition
        "A+E": ("val", "combo_seen1"),
    }
    assert {c: (r.set, r.subgroup) for c, r in got.iterrows()} == expected
    assert subgroup_of(CONTROL, ["A"]) == "control"
    assert subgroup_of("A+B", ["A+B"]) == "train"


def test_simulation_split_follows_gears():
    params = PerturbSplitParams(kind="simulation", seed=5, val_fraction=0.0)
    got = assign_conditions(SCREEN, params)
    set_of = dict(zip(got.condition, got.set, strict=True))
    # every gene has a single: the held-out genes are those of the test singles
    held = {c for c in GENES if set_of[c] == "test"}
    assert len(held) == len(GENES) - math.floor(len(GENES) * 0.75)
    train_genes = set(GENES) - held
    doubles = [c for c in SCREEN if n_perturbed(c) == 2]
    pool = [c for c in doubles if set(condition_genes(c)) <= train_genes]
    for c in doubles:
        n_seen = sum(g in train_genes for g in condition_genes(c))
        if n_seen < 2:  # a double with a held-out gene is never trained on
            assert set_of[c] == "test"
        row = got[got.condition == c].iloc[0]
        if row.set == "test":
            assert row.subgroup == f"combo_seen{n_seen}"
    n_pool_test = sum(set_of[c] == "test" for c in pool)
    assert n_pool_test == len(pool) - math.floor(len(pool) * 0.75)
    assert set(got.subgroup[got.set == "test"]) == {
        "unseen_single",
        "combo_seen0",
        "combo_seen1",
        "combo_seen2",
    }


def test_simulation_validation_drawn_from_training_and_subgroups_after_it():
    test_only = assign_conditions(SCREEN, PerturbSplitParams(seed=5, val_fraction=0.0))
    full = assign_conditions(SCREEN, PerturbSplitParams(seed=5, val_fraction=0.25))
    # the validation draw only moves training conditions; the test conditions stay
    assert list(full.condition[full.set == "test"]) == list(
        test_only.condition[test_only.set == "test"]
    )
    val = full[full.set == "val"]
    assert set(val.condition) <= set(test_only.condition[test_only.set == "train"])
    assert (val.subgroup == "unseen_single").any() and len(val) > 0
    # seen genes are those whose single survived both draws
    seen = {c for c in GENES if full.set[full.condition == c].iloc[0] == "train"}
    for r in full[full.set != "train"].itertuples():
        if n_perturbed(r.condition) == 2:
            assert r.subgroup == f"combo_seen{sum(g in seen for g in condition_genes(r.condition))}"
    # GEARS's procedure again on the training conditions: of the doubles of two genes kept in
    # training, floor(n * (1 - val_fraction)) stay, the others are validation conditions
    first_train = set(test_only.condition[test_only.set == "train"])
    pool = [c for c in first_train if n_perturbed(c) == 2 and set(condition_genes(c)) <= seen]
    n_pool_val = sum(c in set(val.condition) for c in pool)
    assert n_pool_val == len(pool) - math.floor(len(pool) * 0.75) > 0
    # a test double whose gene's single went to validation is not combo_seen2 any more
    val_genes = {c for c in val.condition if n_perturbed(c) == 1}
    assert all(
        r.subgroup != "combo_seen2"
        for r in full[full.set == "test"].itertuples()
        if set(condition_genes(r.condition)) & val_genes
    )


def test_double_split_keeps_singles_and_half_the_doubles():
    doubles = [c for c in SCREEN if n_perturbed(c) == 2]
    got = assign_conditions(SCREEN, PerturbSplitParams(kind="double", seed=1))
    by = got.set_index("condition")
    assert (by.loc[GENES, "set"] == "train").all()
    test = got[got.set == "test"]
    val = got[got.set == "val"]
    n_train = math.floor(len(doubles) * 0.5)
    assert len(test) == len(doubles) - n_train
    assert len(val) == n_train - math.floor(n_train * 0.9) and len(val) > 0
    assert all(n_perturbed(c) == 2 for c in list(test.condition) + list(val.condition))
    assert (test.subgroup == "combo_seen2").all() and (val.subgroup == "combo_seen2").all()
    other = assign_conditions(SCREEN, PerturbSplitParams(kind="double", double_train_frac=0.8))
    assert (other.set == "test").sum() == len(doubles) - math.floor(len(doubles) * 0.8)


def test_reproducible_bytes_and_seed_sensitive(tmp_path):
    cells = make_cells(SCREEN)
    paths = []
    for i, seed in enumerate([3, 3, 4]):
        params = PerturbSplitParams.from_dict({"kind": "simulation", "seed": seed})
        paths.append(tmp_path / f"split{i}.tsv")
        run_perturbation_split(cells, params, paths[-1], tmp_path / f"summary{i}.tsv")
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert (tmp_path / "summary0.tsv").read_bytes() == (tmp_path / "summary1.tsv").read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    a, c = read_split(paths[0]), read_split(paths[2])
    held = a.condition != CONTROL
    assert not a.set[held].equals(c.set[held])  # the seed moves conditions, not only controls


@pytest.mark.parametrize("kind", ["simulation", "double", "custom"])
def test_independent_of_cell_order(kind):
    params = PerturbSplitParams(kind=kind, seed=7, test=("G02+G07",) if kind == "custom" else None)
    cells = make_cells(SCREEN, seed=0)
    shuffled = cells.sample(frac=1.0, random_state=1).reset_index(drop=True)
    a = split_perturbation_cells(cells, params).set_index("cell_id")
    b = split_perturbation_cells(shuffled, params).set_index("cell_id")
    assert not cells.cell_id.equals(shuffled.cell_id)
    pd.testing.assert_frame_equal(a.sort_index(), b.sort_index())


def test_control_cells_split_by_fractions():
    cells = make_cells(["A", "B", "A+B"], n_ctrl=1000)
    params = PerturbSplitParams(kind="custom", test=("A+B",), val=())
    table = split_perturbation_cells(cells, params)
    ctrl = table[table.condition == CONTROL]
    assert ctrl.set.value_counts().to_dict() == {"train": 800, "val": 100, "test": 100}
    odd = PerturbSplitParams(
        kind="custom", test=("A+B",), control_fractions=ControlFractions(1, 0, 0)
    )
    assert (split_perturbation_cells(cells, odd).set[table.condition == CONTROL] == "train").all()
    # the control split does not depend on the perturbed conditions
    other = split_perturbation_cells(
        make_cells(["A", "B", "A+B"], n_ctrl=1000),
        PerturbSplitParams(kind="custom", test=("A",), val=("B",)),
    )
    assert other.set[other.condition == CONTROL].equals(ctrl.set)
    few = make_cells(["A", "B", "A+B"], n_ctrl=2)
    bad = PerturbSplitParams(
        kind="custom", test=("A+B",), control_fractions=ControlFractions(0.5, 0.25, 0.25)
    )
    with pytest.raises(InputError, match=r"split\.perturbation\.control_fractions"):
        split_perturbation_cells(few, bad)


def test_tsv_round_trip_and_summary(tmp_path):
    cells = make_cells(SCREEN, cells_per_condition=3)
    table = split_perturbation_cells(cells, PerturbSplitParams(kind="double"))
    path = tmp_path / "split.tsv"
    write_split(table, path)
    assert path.read_text().splitlines()[0] == "cell_id\tcondition\tset\tsubgroup"
    pd.testing.assert_frame_equal(read_split(path), table)
    summary = split_summary(table)
    assert list(summary.columns) == ["condition", "set", "subgroup", "n_cells"]
    assert summary.n_cells.sum() == len(cells)
    assert (summary.n_cells[summary.condition != CONTROL] == 3).all()
    assert list(summary.set.drop_duplicates()) == ["train", "val", "test"]
    ctrl = summary[summary.condition == CONTROL].set_index("set").n_cells
    assert ctrl.to_dict() == table[table.condition == CONTROL].set.value_counts().to_dict()
    # a tampered file is refused, naming it
    text = path.read_text().replace("combo_seen2", "combo_seen0")
    path.write_text(text)
    with pytest.raises(InputError, match="split.tsv.*expected 'combo_seen2'"):
        read_split(path)


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"kind": "custom", "test": ["A+B", "Z"]}, r"'split\.perturbation\.test'.*'Z' is not in"),
        ({"kind": "custom", "test": ["A"], "val": ["C+B"]}, r"'split\.perturbation\.val'.*'B\+C'"),
        ({"kind": "custom", "test": ["A+B", "B"], "val": ["B"]}, r"perturbation\.val'.*also in"),
        ({"kind": "custom", "test": ["ctrl"]}, r"perturbation\.test'.*'ctrl' is not a perturbed"),
        ({"kind": "custom", "test": ["A+ctrl"]}, r"perturbation\.test'.*'A\+ctrl' is not"),
        ({"kind": "custom", "test": "A+B"}, r"perturbation\.test'.*expected a list"),
        ({"kind": "custom"}, r"perturbation\.test'.*non-empty"),
        ({"kind": "custom", "test": ["A", "B", "A+B"], "val": []}, r"no perturbed condition in"),
        ({"kind": "simulation", "test": ["A"]}, r"perturbation\.test'.*need kind: custom"),
        ({"kind": "random"}, r"perturbation\.kind'.*expected one of"),
        ({"seed": -1}, r"perturbation\.seed'"),
        ({"seed": 1.5}, r"perturbation\.seed'.*integer"),
        ({"train_gene_set_size": 1.0}, r"perturbation\.train_gene_set_size'"),
        ({"val_fraction": "1e-1", "double_train_frac": 0}, r"perturbation\.double_train_frac'"),
        ({"control_fractions": {"train": 0.8, "val": 0.2}}, r"control_fractions': .*sum to 1"),
        ({"control_fractions": {"train": 0.9, "tst": 0.1}}, r"control_fractions\.tst' is unknown"),
        ({"contol_fractions": {}}, r"'split\.perturbation\.contol_fractions' is unknown"),
    ],
)
def test_bad_params_name_the_key(d, match):
    with pytest.raises(InputError, match=match):
        params = PerturbSplitParams.from_dict(d)
        assign_conditions(["A", "B", "A+B", CONTROL], params)


def test_from_dict_defaults_and_where():
    p = PerturbSplitParams.from_dict({"val_fraction": "1e-1", "kind": "double"})
    assert p == PerturbSplitParams(kind="double", val_fraction=0.1)
    assert PerturbSplitParams.from_dict(None) == PerturbSplitParams()
    with pytest.raises(InputError, match=r"'perturb\.split\.seed'"):
        PerturbSplitParams.from_dict({"seed": "0"}, "perturb.split")


@pytest.mark.parametrize(
    ("conditions", "params", "match"),
    [
        (["A", "B"], PerturbSplitParams(kind="double"), r"'double', but the screen has no double"),
        (["A"], PerturbSplitParams(kind="simulation"), r"no perturbed condition in training"),
        (["A", "B+A"], PerturbSplitParams(), r"'B\+A' is not canonical"),
        (["A", "A+B+C"], PerturbSplitParams(), r"'A\+B\+C' perturbs 3 genes"),
        ([CONTROL], PerturbSplitParams(), r"no perturbed condition"),
    ],
)
def test_infeasible_kinds_and_bad_conditions(conditions, params, match):
    with pytest.raises(InputError, match=match):
        assign_conditions(conditions, params)


def test_bad_cell_tables():
    cells = make_cells(["A", "B", "A+B"])
    with pytest.raises(InputError, match="duplicate cell ids"):
        split_perturbation_cells(pd.concat([cells, cells.iloc[:1]]), PerturbSplitParams())
    with pytest.raises(InputError, match="no control cells"):
        split_perturbation_cells(cells[cells.condition != CONTROL], PerturbSplitParams())
    with pytest.raises(InputError, match="no 'condition' column"):
        split_perturbation_cells(cells[["cell_id"]], PerturbSplitParams())


def test_same_split_in_another_process():
    """No draw depends on Python's per-process string hashing (set iteration order)."""
    params = PerturbSplitParams(kind="double", seed=3)
    here = assign_conditions(SCREEN, params).to_csv(index=False)
    code = (
        "import sys; from evoformer.perturb.splits import PerturbSplitParams, assign_conditions; "
        f"print(assign_conditions({SCREEN!r}, PerturbSplitParams(kind='double', seed=3))"
        ".to_csv(index=False), end='')"
    )
    ours = os.environ.get("PYTHONHASHSEED", "")
    env = dict(os.environ, PYTHONHASHSEED=str(int(ours) + 1) if ours.isdigit() else "1")
    there = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert there == here
