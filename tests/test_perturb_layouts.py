"""Perturb-seq datasets: the perturbation block, both public layouts parsed to one spelling,
every bad input refused with one line, and the HVG stage of a screen.

One small screen (:func:`screen`) is written in both layouts: GEARS (``obs.condition``
``A+ctrl`` / ``ctrl+A`` / ``B+A`` / ``ctrl``, Ensembl ids in the var index and symbols in
``var.gene_name``, log1p values) and scPerturb (``obs.perturbation`` ``control`` / ``A`` /
``B_A``, symbols in the var index, counts, ``obs.perturbation_type``).
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from evoformer.data.datasets import DatasetSpec
from evoformer.data.hvg import run_hvg
from evoformer.errors import InputError
from evoformer.perturb.layouts import (
    PerturbSpec,
    canonical_condition,
    canonical_type,
    read_perturbation_obs,
)

N_GENES = 200
SYMBOLS = [f"g{j:02d}" for j in range(N_GENES - 1)] + ["g198"]  # one symbol twice
UNIQUE = SYMBOLS[:-1] + ["g198-1"]  # as var_names_make_unique names them
# canonical condition -> cells; g11's condition is below min_cells (10), ZZZ is not measured
CONDITIONS = {"ctrl": 40, "g03": 20, "g07": 15, "g03+g07": 12, "g11": 5, "ZZZ": 12, "ZZZ+g03": 11}
KEPT = ("ctrl", "g03", "g07", "g03+g07")
GEARS = {"condition": {"g03": ["g03+ctrl", "ctrl+g03"], "g07": ["g07+ctrl"]}, "sep": "+"}
SCPERTURB = {"ctrl": "control", "sep": "_"}
LOG1P = {"expression": "X", "value_type": "log1p", "label_key": None}
COUNTS = {"expression": "X", "value_type": "counts", "label_key": None}


def screen(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Counts [N, 200] and each cell's canonical condition: genes g30..g37 vary between two
    programs; a perturbed gene's rate drops to 30% in its cells."""
    rng = np.random.default_rng(seed)
    conditions = [c for c, n in CONDITIONS.items() for _ in range(n)]
    rate = np.tile(rng.lognormal(1.0, 0.3, N_GENES), (len(conditions), 1))
    program = rng.random(len(conditions)) < 0.5
    rate[np.ix_(program, np.arange(30, 38))] *= 12
    for i, c in enumerate(conditions):
        for g in c.split("+"):
            if g in UNIQUE:
                rate[i, UNIQUE.index(g)] *= 0.3
    return rng.poisson(rate).astype(np.float32), conditions


def gears_label(condition: str, i: int) -> str:
    """A GEARS spelling of a condition: singles padded with ctrl (either side), doubles
    unsorted."""
    if condition == "ctrl":
        return "ctrl"
    genes = condition.split("+")
    if len(genes) == 1:
        return f"{genes[0]}+ctrl" if i % 2 else f"ctrl+{genes[0]}"
    return "+".join(reversed(genes))


def scperturb_label(condition: str) -> str:
    return "control" if condition == "ctrl" else "_".join(reversed(condition.split("+")))


def write_gears(path, counts, conditions, cell_ids=None, **obs):
    log1p = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    cell_ids = cell_ids or [f"cell{i:03d}" for i in range(len(conditions))]
    frame = pd.DataFrame(
        {
            "condition": pd.Categorical([gears_label(c, i) for i, c in enumerate(conditions)]),
            "cell_type": "K562",
            **obs,
        },
        index=cell_ids,
    )
    var = pd.DataFrame({"gene_name": SYMBOLS}, index=[f"ENSG{j:011d}" for j in range(len(SYMBOLS))])
    ad.AnnData(X=sp.csr_matrix(log1p.astype(np.float32)), obs=frame, var=var).write_h5ad(path)
    return path


def write_scperturb(path, counts, conditions, types="CRISPRi", labels=None, var_names=None):
    frame = pd.DataFrame(
        {
            "perturbation": pd.Categorical(labels or [scperturb_label(c) for c in conditions]),
            "perturbation_type": types,
            "nperts": [0 if c == "ctrl" else len(c.split("+")) for c in conditions],
        },
        index=[f"cell{i:03d}" for i in range(len(conditions))],
    )
    var = pd.DataFrame(index=var_names or UNIQUE)
    ad.AnnData(X=sp.csr_matrix(counts), obs=frame, var=var).write_h5ad(path)
    return path


def dataset(layout: str, value_type: str = "log1p", **block) -> DatasetSpec:
    return DatasetSpec.expression_only(
        "screen",
        {"value_type": value_type, "perturbation": {"layout": layout, **block}},
    )


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def data():
    return screen()


@pytest.fixture(scope="module")
def gears_file(tmp_path_factory, data):
    return write_gears(tmp_path_factory.mktemp("gears") / "norman.h5ad", *data)


@pytest.fixture(scope="module")
def scperturb_file(tmp_path_factory, data):
    return write_scperturb(tmp_path_factory.mktemp("scperturb") / "norman.h5ad", *data)


# ---------------------------------------------------------------- the block
def test_layout_defaults_and_overrides():
    gears = PerturbSpec.from_config("s", {"layout": "gears", "type": "activation"})
    assert (gears.column, gears.control, gears.separator, gears.gene_column) == (
        "condition",
        ("ctrl",),
        "+",
        "gene_name",
    )
    assert (gears.type, gears.type_column, gears.min_cells, gears.strict) == (
        "activation",
        None,
        10,
        False,
    )
    sc = PerturbSpec.from_config("s", {"layout": "scperturb"})
    assert (sc.column, sc.control, sc.separator, sc.gene_column, sc.type_column) == (
        "perturbation",
        ("control",),
        "_",
        None,
        "perturbation_type",
    )
    custom = PerturbSpec.from_config(
        "s",
        {"layout": "scperturb", "control": ["NT", "non-targeting"], "separator": ",",
         "gene_column": None, "min_cells": 3, "strict": True},
    )  # fmt: skip
    assert (custom.control, custom.separator, custom.min_cells, custom.strict) == (
        ("NT", "non-targeting"),
        ",",
        3,
        True,
    )
    # the block reaches DatasetSpec from both constructors
    assert DatasetSpec.from_config("s", {"path": "x.h5ad"}).perturbation is None
    full = DatasetSpec.from_config("s", {"path": "x.h5ad", "perturbation": {"layout": "scperturb"}})
    assert full.perturbation == sc == dataset("scperturb").perturbation


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({}, "datasets.s.perturbation.layout: missing, expected one of gears, scperturb"),
        ({"layout": "norman"}, "datasets.s.perturbation.layout: got 'norman'"),
        ({"layout": "gears"}, "datasets.s.perturbation.type: the perturbation type is neither"),
        (
            {"layout": "scperturb", "type_column": None},
            "datasets.s.perturbation.type: the perturbation type is neither",
        ),
        ({"layout": "scperturb", "type": "CRISPRi"}, "datasets.s.perturbation.type: got 'CRISPRi'"),
        ({"layout": "scperturb", "columns": "x"}, "datasets.s.perturbation.columns: unknown key"),
        (
            {"layout": "scperturb", "control": "control"},
            "datasets.s.perturbation.control: expected",
        ),
        ({"layout": "scperturb", "control": []}, "datasets.s.perturbation.control: expected"),
        ({"layout": "scperturb", "separator": ""}, "datasets.s.perturbation.separator: got ''"),
        ({"layout": "scperturb", "column": None}, "datasets.s.perturbation.column: got None"),
        ({"layout": "scperturb", "gene_column": 3}, "datasets.s.perturbation.gene_column: got 3"),
        ({"layout": "scperturb", "min_cells": 0}, "datasets.s.perturbation.min_cells: got 0"),
        ({"layout": "scperturb", "min_cells": True}, "datasets.s.perturbation.min_cells: got True"),
        ({"layout": "scperturb", "strict": "yes"}, "datasets.s.perturbation.strict: got 'yes'"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 50 else None,
)
def test_bad_block_names_the_key(block, message):
    with pytest.raises(InputError) as exc:
        PerturbSpec.from_config("s", block)
    assert one_line(exc).startswith(message), one_line(exc)


# ---------------------------------------------------------------- labels and types
def test_labels_parse_to_one_spelling():
    gears = PerturbSpec.from_config("s", {"layout": "gears", "type": "knockdown"})
    sc = PerturbSpec.from_config("s", {"layout": "scperturb", "control": ["control", "NT"]})
    for label, expected in [("ctrl", "ctrl"), ("A+ctrl", "A"), ("ctrl+A", "A"), ("A+B", "A+B")]:
        assert canonical_condition(label, gears) == expected
    assert canonical_condition("B+A", gears) == canonical_condition("A+B", gears) == "A+B"
    assert canonical_condition("B+ctrl+A", gears) == "A+B"
    for label, expected in [("control", "ctrl"), ("NT", "ctrl"), ("A", "A"), ("B_A", "A+B")]:
        assert canonical_condition(label, sc) == expected
    assert canonical_condition("C_A_B", sc) == "A+B+C"


@pytest.mark.parametrize(
    ("label", "reason"),
    [
        ("A++B", "an empty part between '+' separators"),
        ("+A", "an empty part between '+' separators"),
        ("", "an empty part between '+' separators"),
        ("ctrl+ctrl", "only control parts, no perturbed gene"),
        ("ctrl+A+ctrl", "more than one control part"),
        ("A+A", "a gene named twice"),
        ("A +B", "part 'A ' contains white space"),
    ],
)
def test_unparseable_gears_labels(label, reason):
    gears = PerturbSpec.from_config("s", {"layout": "gears", "type": "knockdown"})
    with pytest.raises(InputError) as exc:
        canonical_condition(label, gears)
    assert one_line(exc) == reason


def test_tokens_that_are_not_gene_names():
    sc = PerturbSpec.from_config("s", {"layout": "scperturb"})
    with pytest.raises(InputError, match="part 'ctrl' is not a gene name"):
        canonical_condition("ctrl", sc)  # a control label missing from control
    with pytest.raises(InputError, match=r"part 'A\+B' is not a gene name"):
        canonical_condition("A+B", sc)  # GEARS labels read with scPerturb's separator


def test_type_table():
    assert [canonical_type(v) for v in ("CRISPRi", "crispra", "CRISPR", "CRISPR-cas9")] == [
        "knockdown",
        "activation",
        "knockout",
        "knockout",
    ]
    assert canonical_type(" Knockdown ") == "knockdown"
    with pytest.raises(InputError, match="unknown perturbation type 'drug'"):
        canonical_type("drug")


# ---------------------------------------------------------------- reading the cells
def test_both_layouts_give_the_same_cells(gears_file, scperturb_file, data, caplog):
    _, conditions = data
    with caplog.at_level(logging.INFO):
        gears = read_perturbation_obs(gears_file, dataset("gears", type="knockdown"))
    sc = read_perturbation_obs(scperturb_file, dataset("scperturb", "counts"))
    for obs in (gears, sc):
        assert list(obs.condition.astype(str)) == conditions
        assert list(obs.cell_ids) == [f"cell{i:03d}" for i in range(len(conditions))]
        assert list(obs.genes) == UNIQUE  # Ensembl index + gene_name == symbol index
        assert set(obs.perturbation_type) == {"knockdown"}
        assert obs.perturbed_genes == ("g03", "g07") and obs.unmeasured_genes == ("ZZZ",)
        assert obs.dropped_conditions == {"g11": 5}
        assert obs.n_unmeasured_cells == 23 and obs.n_missing_label == 0
        assert obs.conditions.to_dict() == {c: CONDITIONS[c] for c in KEPT}
    np.testing.assert_array_equal(gears.keep, sc.keep)
    assert gears.keep.sum() == sum(CONDITIONS[c] for c in KEPT)
    assert "1 conditions with fewer than 10 cells dropped (5 cells): g11 (5)" in caplog.text
    assert "1 perturbed genes are not measured; 23 cells of the 2 conditions" in caplog.text
    assert "naming them dropped: ZZZ" in caplog.text


def test_min_cells_and_strict(gears_file):
    obs = read_perturbation_obs(gears_file, dataset("gears", type="knockdown", min_cells=5))
    assert obs.dropped_conditions == {} and "g11" in obs.conditions
    assert obs.perturbed_genes == ("g03", "g07", "g11")
    obs = read_perturbation_obs(gears_file, dataset("gears", type="knockdown", min_cells=13))
    assert obs.dropped_conditions == {"g03+g07": 12, "g11": 5}
    assert obs.perturbed_genes == ("g03", "g07")
    with pytest.raises(InputError) as exc:
        read_perturbation_obs(gears_file, dataset("gears", type="knockdown", strict=True))
    assert one_line(exc) == (
        f"{gears_file}: 1 perturbed genes are not among the 200 measured genes "
        "(datasets.screen.perturbation.strict is true): ZZZ"
    )


def test_per_cell_types_and_missing_labels(tmp_path, data):
    counts, conditions = data
    types = ["CRISPRa" if c.startswith("g07") else "CRISPRi" for c in conditions]
    labels = [scperturb_label(c) for c in conditions]
    labels[-3:] = [np.nan] * 3  # undetermined guide calls
    path = write_scperturb(tmp_path / "s.h5ad", counts, conditions, types=types, labels=labels)
    obs = read_perturbation_obs(path, dataset("scperturb", "counts"))
    by_cell = pd.Series(np.asarray(obs.perturbation_type), index=conditions)
    assert set(by_cell["g07"]) == {"activation"} and set(by_cell["g03"]) == {"knockdown"}
    assert obs.n_missing_label == 3 and pd.isna(obs.condition[-3:]).all()
    assert not obs.keep[-3:].any()
    # a declared type wins over the column
    declared = read_perturbation_obs(path, dataset("scperturb", "counts", type="knockout"))
    assert set(declared.perturbation_type.dropna()) == {"knockout"}


def test_several_files_are_one_dataset(tmp_path, data, gears_file):
    counts, conditions = data
    ids = [f"cell{i:03d}" for i in range(len(conditions))]
    half = 60
    a = write_gears(tmp_path / "a.h5ad", counts[:half], conditions[:half], ids[:half])
    b = write_gears(tmp_path / "b.h5ad", counts[half:], conditions[half:], ids[half:])
    spec = dataset("gears", type="knockdown")
    both = read_perturbation_obs([a, b], spec)
    one = read_perturbation_obs(gears_file, spec)
    assert list(both.cell_ids) == list(one.cell_ids) and list(both.genes) == list(one.genes)
    assert list(both.condition) == list(one.condition)
    np.testing.assert_array_equal(both.keep, one.keep)
    # duplicate cell ids across the files
    c = write_gears(tmp_path / "c.h5ad", counts[:5], conditions[:5], ids[:5])
    with pytest.raises(InputError) as exc:
        read_perturbation_obs([a, c], spec)
    assert one_line(exc).startswith(
        "datasets.screen.paths: 5 cell ids occur in more than one file (e.g. 'cell000' in "
        f"{a} and {c})"
    )


def _bad_label(conditions, label):
    labels = [gears_label(c, i) for i, c in enumerate(conditions)]
    return [label if c == "g07" else x for c, x in zip(conditions, labels, strict=True)]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "ctrl+ctrl",
            "obs column 'condition' (datasets.screen.perturbation.column): cannot parse label "
            "'ctrl+ctrl' (15 cells): only control parts, no perturbed gene",
        ),
        ("g07++ctrl", "cannot parse label 'g07++ctrl' (15 cells): an empty part"),
        ("g07+g07", "cannot parse label 'g07+g07' (15 cells): a gene named twice"),
        ("no_control", "no control cells (labels ['ctrl'] in obs column 'condition'; "),
        ("few_controls", "3 control cells, fewer than datasets.screen.perturbation.min_cells=10"),
        ("all_dropped", "no perturbed condition left with at least datasets.screen.perturbation"),
        ("duplicate_cells", "1 duplicate cell ids (e.g. 'cell000'); cell ids must be unique"),
        ("no_column", "obs column 'guide' (datasets.screen.perturbation.column) not found; obs"),
        ("no_gene_column", "var column 'symbol' (datasets.screen.perturbation.gene_column) not"),
    ],
)
def test_bad_gears_input_names_the_file(tmp_path, data, case, message):
    counts, conditions = data
    path = tmp_path / "bad.h5ad"
    block = {"type": "knockdown"}
    ids = None
    if case in ("ctrl+ctrl", "g07++ctrl", "g07+g07"):
        write_gears(path, counts, conditions)
        labels = _bad_label(conditions, case)
        adata = ad.read_h5ad(path)
        adata.obs["condition"] = pd.Categorical(labels)
        adata.write_h5ad(path)
    elif case == "no_control":
        keep = [i for i, c in enumerate(conditions) if c != "ctrl"]
        write_gears(path, counts[keep], [conditions[i] for i in keep])
    elif case == "few_controls":
        keep = [i for i, c in enumerate(conditions) if c != "ctrl" or i < 3]
        write_gears(path, counts[keep], [conditions[i] for i in keep])
    elif case == "all_dropped":
        write_gears(path, counts, conditions)
        block["min_cells"] = 40
    elif case == "duplicate_cells":
        ids = [f"cell{i:03d}" for i in range(len(conditions))]
        ids[1] = "cell000"
        write_gears(path, counts, conditions, cell_ids=ids)
    elif case == "no_column":
        write_gears(path, counts, conditions)
        block["column"] = "guide"
    elif case == "no_gene_column":
        write_gears(path, counts, conditions)
        block["gene_column"] = "symbol"
    with pytest.raises(InputError) as exc:
        read_perturbation_obs(path, dataset("gears", **block))
    text = one_line(exc)
    assert text.startswith(f"{path}: ") and message in text, text


@pytest.mark.parametrize(
    ("types", "block", "message"),
    [
        ("drug", {}, "obs column 'perturbation_type' (datasets.screen.perturbation.type_column): "),
        ("drug", {}, "unknown perturbation type 'drug' (115 cells); known: activation, crispr"),
        ("some missing", {}, "has no value for 2 labelled cells; declare the type instead"),
        (
            "CRISPRi",
            {"type_column": "modality"},
            "obs column 'modality' (datasets.screen.perturbation.type_column) not found and "
            "datasets.screen.perturbation.type is not declared",
        ),
    ],
)
def test_bad_scperturb_types(tmp_path, data, types, block, message):
    if types == "some missing":
        types = pd.Categorical(["CRISPRi"] * 113 + [None] * 2)
    path = write_scperturb(tmp_path / "bad.h5ad", *data, types=types)
    with pytest.raises(InputError) as exc:
        read_perturbation_obs(path, dataset("scperturb", "counts", **block))
    text = one_line(exc)
    assert text.startswith(f"{path}: ") and message in text, text


def test_missing_gene_names_are_refused(tmp_path, data):
    path = write_gears(tmp_path / "g.h5ad", *data)
    adata = ad.read_h5ad(path)
    adata.var["gene_name"] = pd.Categorical([None] + SYMBOLS[1:])
    adata.write_h5ad(path)
    with pytest.raises(InputError) as exc:
        read_perturbation_obs(path, dataset("gears", type="knockdown"))
    assert one_line(exc) == (
        f"{path}: var column 'gene_name' (datasets.screen.perturbation.gene_column) has 1 "
        "missing gene names (e.g. gene 'ENSG00000000000')"
    )


# ---------------------------------------------------------------- the HVG stage
def _run(tmp_path, path, ds, n_hvg, hvg=None):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    outs = [out / n for n in ("hvg.h5ad", "genes.tsv", "hvg.png")]
    run_hvg(path, "screen", ds, n_hvg, hvg or {"flavor": "seurat"}, *outs)
    return ad.read_h5ad(outs[0]), pd.read_csv(outs[1], sep="\t", index_col="gene_id")


def test_hvg_keeps_the_perturbed_genes(tmp_path, gears_file, scperturb_file, data, caplog):
    _, conditions = data
    block = {"layout": "gears", "type": "knockdown"}
    with caplog.at_level(logging.INFO):
        hvg, genes = _run(tmp_path, gears_file, {**LOG1P, "perturbation": block}, 6)
    top = genes.index[genes.hvg_rank.between(1, 6)]
    assert len(top) == 6 and not {"g03", "g07"} & set(top)  # not variable enough on their own
    assert list(hvg.var_names) == sorted([*top, "g03", "g07"], key=UNIQUE.index)
    assert genes.loc[["g03", "g07"], "hvg_rank"].tolist() in ([7, 8], [8, 7])
    assert genes["perturbed"].sum() == 2 and "g11" not in hvg.var_names  # g11's cells dropped
    assert hvg.uns["hvg"]["n_perturbed_genes_added"] == 2
    assert hvg.uns["hvg"]["n_cells_perturbation_dropped"] == 5 + 23
    assert "2 perturbed genes added to the top 6 HVGs (0 of the 2 measured perturbed" in caplog.text
    assert "1 perturbed genes not measured: ZZZ" in caplog.text
    assert "8 of 200 genes selected" in caplog.text
    # the dropped cells are not written; condition and type per cell
    kept = [i for i, c in enumerate(conditions) if c in KEPT]
    assert list(hvg.obs_names) == [f"cell{i:03d}" for i in kept]
    assert list(hvg.obs.columns) == ["condition", "perturbation_type"]
    assert list(hvg.obs["condition"].astype(str)) == [conditions[i] for i in kept]
    assert set(hvg.obs["perturbation_type"]) == {"knockdown"}
    assert list(hvg.obs["condition"].cat.categories) == sorted(KEPT)
    # the scPerturb layout of the same screen (counts): the same cells, conditions and genes
    (tmp_path / "sc").mkdir()
    sc_block = {"layout": "scperturb"}
    sc, sc_genes = _run(
        tmp_path / "sc",
        scperturb_file,
        {**COUNTS, "perturbation": sc_block},
        6,
        {"flavor": "seurat_v3"},
    )
    assert list(sc.obs_names) == list(hvg.obs_names)
    assert list(sc.obs["condition"]) == list(hvg.obs["condition"])
    assert {"g03", "g07"} <= set(sc.var_names) and sc_genes["perturbed"].sum() == 2
    assert sc.n_vars == 6 + sc.uns["hvg"]["n_perturbed_genes_added"]
    assert sorted(sc_genes.hvg_rank[sc_genes.highly_variable]) == list(range(1, sc.n_vars + 1))


def test_hvg_of_a_screen_is_that_of_its_kept_cells(tmp_path, gears_file, data):
    """Dropped cells take no part: the top genes, their statistics and values equal a plain
    (non-perturbation) run on a file holding only the kept cells, genes named by symbol."""
    counts, conditions = data
    block = {"layout": "gears", "type": "knockdown"}
    hvg, genes = _run(tmp_path, gears_file, {**LOG1P, "perturbation": block}, 6)
    kept = [i for i, c in enumerate(conditions) if c in KEPT]
    plain = ad.read_h5ad(gears_file)[kept].copy()
    plain.var_names = UNIQUE
    plain.write_h5ad(tmp_path / "plain.h5ad")
    (tmp_path / "ref").mkdir()
    ref, ref_genes = _run(tmp_path / "ref", tmp_path / "plain.h5ad", LOG1P, 6)
    stats = ["means", "dispersions", "dispersions_norm"]
    pd.testing.assert_frame_equal(genes[stats], ref_genes[stats], check_exact=True)
    top = genes.index[genes.hvg_rank.between(1, 6)]
    assert list(top) == list(ref_genes.index[ref_genes.highly_variable])
    assert (hvg[:, top].X != ref.X).nnz == 0 and list(hvg.obs_names) == list(ref.obs_names)


def test_hvg_exempts_perturbed_genes_from_min_cells_per_gene(tmp_path, data):
    """A perturbed gene expressed in too few cells for hvg.min_cells_per_gene is kept."""
    counts, conditions = data
    counts = counts.copy()
    counts[:, UNIQUE.index("g07")] = 0
    counts[0, UNIQUE.index("g07")] = 1  # one cell expresses it
    path = write_gears(tmp_path / "g.h5ad", counts, conditions)
    block = {"layout": "gears", "type": "knockdown"}
    hvg, genes = _run(
        tmp_path, path, {**LOG1P, "perturbation": block}, 6, {"min_cells_per_gene": 3}
    )
    assert "g07" in hvg.var_names and genes.loc["g07", "perturbed"]


def test_non_perturbation_datasets_are_unchanged(tmp_path, gears_file):
    """Without the block the var index names the genes and no obs column is added."""
    hvg, genes = _run(tmp_path, gears_file, LOG1P, 6)
    assert hvg.n_vars == 6 and hvg.var_names[0].startswith("ENSG")
    assert list(hvg.obs.columns) == [] and "perturbed" not in genes
    assert "n_perturbed_genes_added" not in hvg.uns["hvg"]


# ---------------------------------------------------------------- through Snakemake
@pytest.mark.slow
def test_workflow_reads_a_screen_and_refuses_bad_settings(make_workflow, data):
    """The hvg rule gets the block (obs.condition written, perturbed genes kept); changing it
    reruns the hvg stage; a dry run refuses bad perturbation settings with one line naming
    the key."""
    wf = make_workflow("screen")
    (wf.root / "data").mkdir()
    write_gears(wf.root / "data/screen.h5ad", *data)
    entry = {"path": "data/screen.h5ad", "value_type": "log1p"}
    block = {"layout": "gears", "type": "knockdown"}
    config = wf.config("screen", datasets={"screen": {**entry, "perturbation": block}})
    target = "results/screen/hvg6/hvg.h5ad"
    wf.run(target, configfile=config)
    hvg = ad.read_h5ad(wf.root / target)
    assert set(hvg.obs["condition"]) == set(KEPT) and {"g03", "g07"} <= set(hvg.var_names)
    assert wf.planned_jobs(target, configfile=config) == {}
    changed = {"screen": {**entry, "perturbation": {**block, "min_cells": 5}}}
    assert wf.planned_jobs(target, configfile=wf.config("changed", datasets=changed)) == {"hvg": 1}

    for bad, message in [
        (
            {"layout": "gears"},
            "invalid config: datasets.screen.perturbation.type: the perturbation type is neither "
            "declared nor read",
        ),
        (
            {"layout": "gears", "type": "CRISPRa"},
            "invalid config: datasets.screen.perturbation.type: 'CRISPRa' is not one of",
        ),
        ({"type": "knockdown"}, "invalid config: datasets.screen.perturbation: 'layout' is a"),
    ]:
        config = wf.config("bad", datasets={"screen": {**entry, "perturbation": bad}})
        proc = wf.run("--dry-run", target, configfile=config, check=False)
        lines = [line for line in proc.stdout.splitlines() if "invalid config" in line]
        assert proc.returncode != 0 and len(lines) == 1, proc.stdout[-2000:]
        assert lines[0].startswith(message), lines[0]
