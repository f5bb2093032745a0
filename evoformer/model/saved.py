"""``model.pt`` files: rebuild a trained model (:func:`load_model`) and start a model from
another's weights (:func:`init_from_pretrained`, the fine-tuning of a perturbation model from a
masked-expression model).

A ``model.pt`` (written by :mod:`evoformer.train`) holds ``model`` (the state dict),
``model_config``, ``n_genes``, ``n_bins``, ``genes`` (the gene vocabulary, in embedding order;
absent from files written before fine-tuning existed), ``task`` and the task's extras
(``n_labels`` ...; ``output``, ``n_perturbation_types`` for the perturbation task).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from evoformer.errors import InputError
from evoformer.model.bioformer import BioFormer
from evoformer.model.config import ModelConfig
from evoformer.model.prior import load_prior_network, prior_mode_of_state

log = logging.getLogger(__name__)
#: Buffers are data, not weights: they come from the data of the run that loads them.
BUFFERS = ("prior", "expression_baseline")
#: What a fine-tuned model may have that its pretrained model lacks (the task's own parts), and
#: what it may leave out of the pretrained model (the pretraining task's heads); any other
#: difference means another architecture and stops the run.
NEW_OK = ("perturbation_", "expression_head.")
UNUSED_OK = ("value_head.", "label_head.")


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """The dict of a ``model.pt``; one-line InputError for a missing, unreadable or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise InputError(f"{path}: cannot read the model ({type(e).__name__})") from e
    missing = [k for k in ("model", "model_config", "n_genes", "n_bins") if k not in d]
    if not isinstance(d, dict) or missing:
        raise InputError(f"{path}: not an evoformer model file (missing {missing})")
    return d


def load_model(
    model_path: str | os.PathLike, gene_names: list[str], prior: str | os.PathLike | None = None
) -> tuple[BioFormer, dict[str, Any]]:
    """Rebuild the BioFormer of a ``model.pt`` written by ``evoformer.train``; (model, the dict).

    The prior network (if the model used one) is read from ``prior`` when given, else taken from
    the saved weights (it is a buffer of the model); how it enters the model (``init``, ``bias``,
    ``both``) is read from which prior parameters the weights hold.
    """
    d = read_model_file(model_path)
    if int(d["n_genes"]) != len(gene_names):
        raise InputError(
            f"{model_path}: model has {d['n_genes']} genes but the binned data has {len(gene_names)}"
        )
    state = d["model"]
    prior_t = None
    if prior is not None:
        prior_t = load_prior_network(prior, gene_names)
    elif "prior" in state:
        prior_t = state["prior"]
    model = BioFormer(
        ModelConfig.from_dict(d["model_config"]),
        n_genes=int(d["n_genes"]),
        n_bins=int(d["n_bins"]),
        n_labels=int(d.get("n_labels", 0)),
        prior=prior_t,
        prior_mode=prior_mode_of_state(state) or "init",
        n_perturbation_types=int(d.get("n_perturbation_types", 0)),
        output=str(d.get("output", "bins")),
        expression_baseline=state.get("expression_baseline"),
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"{model_path}: weights do not fit the saved config ({first})") from e
    model.eval()
    return model, d


def init_from_pretrained(
    model: BioFormer,
    path: str | os.PathLike,
    genes: list[str],
    min_gene_overlap: float = 0.5,
) -> dict[str, Any]:
    """Copy the weights of the pretrained ``model.pt`` at ``path`` into ``model`` (in place).

    Every parameter the two models share by name is copied; a shared parameter of another shape
    is a one-line InputError naming it. The gene embedding is matched by gene name: rows of the
    genes of ``genes`` (``model``'s vocabulary, in embedding order) that the pretrained model
    knows are copied, the others keep their initialisation; fewer than ``min_gene_overlap`` of
    ``genes`` known is an InputError. Parameters only the pretrained model has are left out if
    they are its heads (:data:`UNUSED_OK`: bin head, label head); parameters only ``model`` has
    keep their initialisation if they are the task's own (:data:`NEW_OK`: the perturbation
    embeddings and expression head). Any other difference (another preset, number of blocks,
    prior mode) or another ``n_bins`` is a one-line InputError: the model must be the one that
    was pretrained. Buffers (:data:`BUFFERS`) are never copied.

    Returns:
        ``{"path", "copied": [names], "new": [names], "unused": [names], "genes_known": n,
        "genes": G}``: what was loaded, for the run's summary.
    """
    d = read_model_file(path)
    if int(d["n_bins"]) != model.n_bins:
        raise InputError(
            f"{path}: pretrained with n_bins {d['n_bins']}, this model has {model.n_bins}"
        )
    src: dict[str, torch.Tensor] = d["model"]
    own = dict(model.named_parameters())
    saved_genes = d.get("genes")
    if saved_genes is None:
        if int(d["n_genes"]) != len(genes):
            raise InputError(
                f"{path}: pretrained on {d['n_genes']} genes without their names; this model "
                f"has {len(genes)} genes"
            )
        saved_genes = list(genes)  # written before gene names were kept: same vocabulary
    position = {g: i for i, g in enumerate(saved_genes)}
    known = [(i, position[g]) for i, g in enumerate(genes) if g in position]
    if len(known) < min_gene_overlap * len(genes):
        raise InputError(
            f"{path}: the pretrained model knows {len(known)} of this model's {len(genes)} genes "
            f"(fewer than {min_gene_overlap:.0%}); pretrain on data with these genes"
        )
    copied, unused = [], []
    with torch.no_grad():
        for name, value in src.items():
            if name.split(".")[-1] in BUFFERS and name not in own:
                continue
            if name not in own:
                unused.append(name)
                continue
            target = own[name]
            if name == "gene_embedding.weight":
                if value.shape[1:] != target.shape[1:]:
                    raise InputError(
                        f"{path}: parameter {name} is {list(value.shape)}, this model's is "
                        f"{list(target.shape)} (another c_m?)"
                    )
                dst_rows = torch.tensor([i for i, _ in known], dtype=torch.long)
                src_rows = torch.tensor([j for _, j in known], dtype=torch.long)
                target[dst_rows] = value[src_rows].to(target.dtype)
            else:
                if value.shape != target.shape:
                    raise InputError(
                        f"{path}: parameter {name} is {list(value.shape)}, this model's is "
                        f"{list(target.shape)}; fine-tune with the pretrained model's settings"
                    )
                target.copy_(value.to(target.dtype))
            copied.append(name)
    new = [n for n in own if n not in set(copied)]
    foreign = [n for n in new if not n.startswith(NEW_OK)]
    foreign += [n for n in unused if not n.startswith(UNUSED_OK)]
    if foreign:
        raise InputError(
            f"{path}: the pretrained model does not match this model's architecture "
            f"(parameter {foreign[0]} is in one of them only); fine-tune with the pretrained "
            "model's settings"
        )
    log.info(
        "initialised from %s: %d parameter tensors copied (%d of %d genes known), %d new, "
        "%d of the pretrained model unused (%s)",
        path,
        len(copied),
        len(known),
        len(genes),
        len(new),
        len(unused),
        ", ".join(sorted({n.split(".")[0] for n in unused})) or "none",
    )
    return {
        "path": str(path),
        "copied": copied,
        "new": new,
        "unused": unused,
        "genes_known": len(known),
        "genes": len(genes),
    }
