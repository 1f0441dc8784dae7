"""``mlmi-zoo evaluate``: measure the task and the five elements of interpretability of one model.

The evaluation runs a model over one split of a data set and writes the results document of
:mod:`mlmi_zoo.evaluation.results` (model cards are generated from it). What is measured follows
the framework of Wang et al., "A Framework for Interpretability in Machine Learning for Medical
Imaging" (arXiv 2310.01685; IEEE Access 2024) and DESIGN.md, per family:

* ProtoPNet (Chen et al., NeurIPS 2019): localization of the top prototype's similarity map
  (activation precision and pointing game against lesion masks; Barnett et al., Nat Mach Intell
  2021), prototype purity on training patches, quantities in units with Bland–Altman agreement and
  spacing invariance, the exact decomposition, prototype switch-off, deletion curves (Petsiuk et
  al., BMVC 2018).
* Concept bottlenecks (Koh et al., ICML 2020): localization of concept maps, per-concept accuracy
  (and, on LIDC-IDRI, model-reader beside inter-reader agreement), continuous concepts in units,
  the exact decomposition, intervention curves with three policies against an oracle.
* Attention / additive MIL (Ilse et al., ICML 2018; Javed et al., NeurIPS 2022): instance AUROC of
  attention / contributions, tumour share of the top instances, tumour area in mm², the exact
  decomposition (additive only), instance exclusion and instance deletion curves.
* Black-box baseline: the task only (and physical quantities when it has a head).

What we chose: expensive parts run on a documented number of cases (:class:`EvaluationLimits`);
the task metrics use a percentile bootstrap over patients when the data name them, else over
cases. Numbers that cannot be measured on the given data (no lesion masks, no pixel spacing) are
reported as "not applicable" with the reason, never estimated.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlmi_zoo._version import __version__
from mlmi_zoo.evaluation import figures as figs
from mlmi_zoo.evaluation._annotated import annotated_bag_localization, annotated_localization
from mlmi_zoo.evaluation._collect import _run_bags, _run_images
from mlmi_zoo.evaluation._common import EvaluationLimits, _cat, _ci, _clean, _Context, _Figures, _subset
from mlmi_zoo.evaluation._data import check_split_overlap, data_spec_to_text, load_data_spec
from mlmi_zoo.evaluation._elements import _not_applicable
from mlmi_zoo.evaluation._evidence_blocks import add_evidence, task_evidence, verdicts
from mlmi_zoo.evaluation._reference import _ImageControls, cascading_randomisation, training_reference
from mlmi_zoo.evaluation.task import task_metrics
from mlmi_zoo.evaluation.results import ELEMENTS, SCHEMA_VERSION, validate_results
from mlmi_zoo.families import family_of
from mlmi_zoo.training.data_spec import DataSpec, build_dataset, collate_for, describe
from mlmi_zoo.training.datasets.catalog import source_for

__all__ = ["evaluate", "EvaluationLimits", "load_data_spec", "check_split_overlap", "data_spec_to_text"]

log = logging.getLogger(__name__)
IMAGE_CROP = 0.25  # the side fraction figures show of images that may not be shared whole

# ---------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------

def _predict(model: Any, loader: Iterable[Mapping[str, Any]], ids: list[str] | None = None,
             names: list[str] | None = None) -> torch.Tensor:
    """(N, C) probabilities of any zoo model over a loader; each batch's patient ids appended to ``ids`` and its
    case names (where the batch has them) to ``names``, if given."""
    from mlmi_zoo.architectures.blocks.stages import training_for

    adapter = training_for(model)
    probs = []
    with torch.no_grad():
        for batch in loader:
            inputs = adapter.inputs(model, batch)
            logits = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            probs.append(logits.softmax(-1).cpu())
            if ids is not None:
                ids += [str(p) for p in batch["patient_id"]]
            if names is not None and batch.get("name") is not None:
                names += [str(n) for n in batch["name"]]
    return torch.cat(probs)


def _baseline_probs(base_model: Any, baseline_uri: str, model: Any, dataset: Any, collate: Any, split: str,
                    batch_size: int, groups: np.ndarray | None, names: Sequence[str] | None = None) -> torch.Tensor:
    """(N, C) the black-box baseline's probabilities on the evaluated cases, in their order.

    A baseline that takes the evaluated model's inputs (images of the same size, or bags) reads the
    evaluated cases. A baseline of images beside a model of bags cut from the same photographs, or of
    images at another size, reads the same split of its own training data (its config.json's recipe)
    and is matched to the evaluated cases by patient id; every evaluated case must be found. Where a patient
    has several cases (a woman's two mammograms), each case is matched by patient and case name (``names``,
    the evaluated cases' ``"name"``).
    """
    from mlmi_zoo.hub import resolve
    from mlmi_zoo.registry import read_config

    model_inputs = family_of(model).inputs
    same_size = model_inputs == "bags" or tuple(base_model.input_spec.size) == tuple(model.input_spec.size)
    if family_of(base_model).inputs == model_inputs and same_size:
        return _predict(base_model, DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate))
    base_spec = _train_spec_from_config(read_config(resolve(baseline_uri)))
    if base_spec is None or groups is None:
        raise ValueError(f"the baseline {baseline_uri} takes other inputs than the evaluated model ({model_inputs}); "
                         "matching them needs the baseline's recorded training data and patient ids")
    base_data = build_dataset(base_spec, split)
    loader = DataLoader(base_data, batch_size=batch_size, shuffle=False, collate_fn=collate_for(base_spec))
    ids: list[str] = []
    base_names: list[str] = []
    probs = _predict(base_model, loader, ids, base_names)
    keys = [str(g) for g in groups]
    if len(set(ids)) < len(ids):  # several cases per patient: the patient alone does not say which
        if len(base_names) != len(ids) or names is None or len(names) != len(keys):
            raise ValueError(f"the baseline's {split!r} data hold several cases per patient; matching them to the "
                             "evaluated cases needs a 'name' per case in both data sets")
        ids = [f"{p}/{n}" for p, n in zip(ids, base_names)]
        keys = [f"{p}/{n}" for p, n in zip(keys, names)]
    where = {p: i for i, p in enumerate(ids)}
    missing = [k for k in keys if k not in where]
    if missing:
        raise ValueError(f"the baseline's {split!r} data ({base_spec.kind}) lack {len(missing)} evaluated case(s), "
                         f"e.g. {missing[:3]}; the two must hold the same patients")
    return probs[[where[k] for k in keys]]


def _off_centre_localization(model: Any, ctx: _Context, centred: Mapping[str, Any]) -> dict[str, Any]:
    """Localization again on the same cases, each shifted to a seeded random position
    (:class:`~mlmi_zoo.evaluation.controls.OffCentre`), where a centre prior cannot help."""
    from mlmi_zoo.evaluation._elements import _localization_block
    from mlmi_zoo.evaluation.controls import OffCentre

    shifted = OffCentre(_subset(ctx.dataset, ctx.limits.off_centre_cases), seed=ctx.seed)
    loader = DataLoader(shifted, batch_size=ctx.batch_size, shuffle=False, collate_fn=ctx.collate)
    with torch.no_grad():
        col = _run_images(model, loader, ctx.limits, _ImageControls(model, ctx.reference, ctx.seed))
    block = _localization_block(col, centred.get("details", {}).get("map", "evidence map"), "", None, ctx)
    block["details"]["placement"] = (f"the first {len(shifted)} cases, each shifted by a seeded uniform offset of up to "
                                     f"{shifted.shift_fraction:.0%} of its size per axis (seed {ctx.seed}); image padded "
                                     "by reflection, mask by zeros")
    block.pop("does_not_show", None)
    return block


def _git_commit() -> str | None:
    """The commit of the mlmi-zoo source tree that ran the evaluation (``-dirty`` when tracked files
    were modified), when it is a git checkout; None otherwise."""
    import subprocess

    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        # "-dirty" when tracked files differ from the commit: the code that ran is then not exactly the commit
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _train_spec_from_config(config_doc: Mapping[str, Any]) -> DataSpec | None:
    recipe = config_doc.get("recipe") or {}
    if isinstance(recipe, Mapping) and isinstance(recipe.get("data"), Mapping):
        return load_data_spec(recipe["data"])
    return None


def _default_command(model_uri: str, spec_text: str, split: str, out: Path | None, figures_dir: Path | None,
                     baseline_uri: str | None, n_boot: int, seed: int, batch_size: int, max_cases: int | None,
                     localization_text: str | None = None) -> str:
    parts = ["mlmi-zoo", "evaluate", model_uri, "--data", spec_text, "--split", split]
    if out is not None:
        parts += ["--out", str(out)]
    if figures_dir is not None:
        parts += ["--figures", str(figures_dir)]
    if baseline_uri:
        parts += ["--baseline", baseline_uri]
    parts += ["--n-boot", str(n_boot), "--seed", str(seed), "--batch-size", str(batch_size)]
    if max_cases is not None:
        parts += ["--max-cases", str(max_cases)]
    if localization_text is not None:
        parts += ["--localization-data", localization_text]
    return " ".join(shlex.quote(p) for p in parts)


def evaluate(
    model_uri: str,
    data: DataSpec | str | Path | Mapping[str, Any] | None,
    split: str = "test",
    out: str | Path | None = None,
    figures_dir: str | Path | None = None,
    baseline_uri: str | None = None,
    n_boot: int = 500,
    seed: int = 0,
    batch_size: int = 32,
    max_cases: int | None = None,
    command: str | None = None,
    limits: EvaluationLimits = EvaluationLimits(),
    localization_data: DataSpec | str | Path | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate one model on one split: the task with bootstrap CIs and the five elements.

    Args:
        model_uri: anything :func:`mlmi_zoo.load` accepts (bundled name, ``hf-hub:``, ``local-dir:``, a folder).
        data: the data (a :class:`DataSpec`, a dict, a YAML/JSON file or ``kind:key=value,...``);
            None uses the data section of the recipe stored in the model's config.json.
        split: ``"train"``, ``"val"`` or ``"test"``; a split that shares cases with the model's
            training split is refused.
        out: where to write the results JSON (None: only returned).
        figures_dir: folder of the PNG figures; default ``out``'s folder + ``figures/`` (no figures
            without either). The document cites them as ``figures/<name>.png``.
        baseline_uri: a black-box model evaluated on the same cases for the task comparison.
        n_boot: bootstrap resamples of the task metrics' 95% intervals.
        seed: seed of the bootstrap, the random deletion order and the random intervention policy.
        batch_size: cases per forward pass.
        max_cases: evaluate only the first ``max_cases`` cases of the split.
        command: the command line recorded in the document (default: the equivalent CLI call).
        limits: caps on the expensive parts (see :class:`EvaluationLimits`).
        localization_data: a data set with lesion masks (its test split) on which localization is
            scored when the evaluated data have none, e.g. IDRiD's segmentation photographs for a
            model evaluated on IDRiD's graded photographs; the maps, metrics and controls are the
            usual ones, the centre prior is fitted on that set's training split.

    Returns:
        The results document (it validates with :func:`~mlmi_zoo.evaluation.results.validate_results`).

    Raises:
        ValueError: overlapping splits, a data set that does not fit the model, bad arguments.
        FileNotFoundError: a model or data file that does not exist.
    """
    import mlmi_zoo
    from mlmi_zoo.hub import resolve
    from mlmi_zoo.registry import read_config

    start = time.perf_counter()
    if n_boot < 1 or batch_size < 1 or (max_cases is not None and max_cases < 1):
        raise ValueError(f"n_boot, batch_size and max_cases must be >= 1; got {n_boot}, {batch_size}, {max_cases}")
    config_doc = read_config(resolve(model_uri))
    model = mlmi_zoo.load(model_uri)
    model.eval()
    train_spec = _train_spec_from_config(config_doc)
    if data is None:
        if train_spec is None:
            raise ValueError(f"{model_uri} records no training recipe; pass the data to evaluate on (--data SPEC)")
        spec = train_spec
    else:
        spec = load_data_spec(data)
    description = describe(spec)
    if split not in description["splits"]:
        raise ValueError(f"split must be one of {sorted(description['splits'])}; got {split!r}")
    limitations: list[str] = []
    unchecked = check_split_overlap(config_doc.get("data"), description, split)
    if unchecked:
        limitations.append(unchecked)
    dataset = build_dataset(spec, split)
    full_size = len(dataset)
    if max_cases is not None:
        dataset = _subset(dataset, max_cases)
    if len(dataset) == 0:
        raise ValueError(f"the {split!r} split of {spec.kind} is empty; set data.{split}_size or choose another split")
    own_truth = ("lesion masks" if dataset[0].get("mask") is not None
                 else "instance labels" if dataset[0].get("instance_labels") is not None else None)
    if localization_data is not None and own_truth is not None:
        raise ValueError(f"localization_data scores localization on another, annotated data set; the {split!r} split "
                         f"of {spec.kind} has {own_truth} of its own, so leave localization_data unset")
    collate = collate_for(spec)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    folder = Path(figures_dir) if figures_dir is not None else (Path(out).parent / "figures" if out is not None else None)
    # a licence that allows only sample crops (mini-MIAS): figures of the images show a quarter of each side
    fig = _Figures(folder, None if source_for({"kind": spec.kind, "params": dict(spec.params)}).whole_images_shareable
                   else IMAGE_CROP)
    ctx = _Context(spec, train_spec, split, dataset, limits, fig, seed, batch_size, collate, limitations, n_boot=n_boot)

    family = model.family
    record = family_of(model)
    # The controls that learn from data (centre prior, image statistics) see the training split only.
    ctx.reference = training_reference(model, ctx, limits.control_train_cases)
    limitations += [f"Controls: {note}." for note in ctx.reference.notes]
    with torch.no_grad():
        if record.inputs == "bags":
            col = _run_bags(model, loader, limits, seed)
        else:
            col = _run_images(model, loader, limits, _ImageControls(model, ctx.reference, seed))
    logits, labels = _cat(col.logits), _cat(col.labels).long()
    probs = logits.softmax(-1)
    groups = np.asarray(col.groups) if col.has_groups and col.groups else None
    operating_point = float(model.config.operating_point)
    task = {k: _ci(v) for k, v in task_metrics(probs, labels, operating_point, groups, n_boot, seed).items()}
    fig.draw("roc", figs.plot_roc, probs, labels)
    fig.draw("reliability", figs.plot_reliability, probs, labels)

    blocks = record.evaluation_section()(model, col, ctx)
    add_evidence(model, blocks, col, ctx)
    loc_col = col
    if localization_data is not None and record.inputs == "images":
        family_block = blocks["localization"]
        own = family_block.get("details", {})
        blocks["localization"], loc_col = annotated_localization(
            model, ctx, localization_data, own.get("map", "evidence map"), family_block.get("does_not_show", ""))
        if blocks["localization"].get("applicable"):  # what the family section measured on its own (a pixel AUPR)
            blocks["localization"]["details"].update({k: v for k, v in own.items() if k != "map"})
            blocks["localization"].update({k: v for k, v in family_block.items() if k.startswith("evidence_")})
        recognizability = record.annotated_recognizability_section()
        if recognizability is not None:  # e.g. prototype purity against the annotated set's masks
            blocks["visual_recognizability"] = recognizability(model, blocks["visual_recognizability"],
                                                               localization_data, ctx)
    elif localization_data is not None:  # a bag model: instance truth from another bag set
        blocks["localization"], blocks["visual_recognizability"] = annotated_bag_localization(
            model, ctx, localization_data,
            "A high instance AUROC shows that the instance scores rank the tiles that hold an annotated finding first "
            "within each bag of the annotated set, not that every finding is found, nor that the decision rests on them.")
    elif record.inputs == "images" and col.masks_seen and blocks["localization"].get("applicable"):
        blocks["localization"]["off_centre"] = _off_centre_localization(model, ctx, blocks["localization"])
    # The sanity check of the map needs no mask: it runs on data without masks too (the block's details;
    # its metrics only where the map is scored).
    if record.inputs == "images" and loc_col.keep_x:
        x = _cat(loc_col.keep_x)[:16]
        spacing = _cat(loc_col.keep_spacing)[:16] if loc_col.keep_spacing else None
        cascade = cascading_randomisation(model, x, spacing if spacing is not None and len(spacing) == len(x) else None,
                                          seed)
        if cascade:
            blocks["localization"].setdefault("details", {})["cascading_randomisation"] = cascade
            for step in cascade if blocks["localization"].get("applicable") else ():
                # cumulative: each step randomises one more part, from the output inwards
                key = f"map_rank_correlation_randomised_down_to_{step['randomised'][-1]}"
                blocks["localization"]["metrics"][key] = step["spearman_mean"]
    faithfulness = ctx.faithfulness or _not_applicable("not applicable: no attribution map to delete along")

    baseline = None
    base_probs = None
    if baseline_uri:
        base_model = mlmi_zoo.load(baseline_uri)
        base_model.eval()
        base_probs = _baseline_probs(base_model, baseline_uri, model, dataset, collate, split, batch_size,
                                     groups, col.names if len(col.names) == len(dataset) else None)
        base_task = task_metrics(base_probs, labels, float(base_model.config.operating_point), groups, n_boot, seed)
        base_sha = read_config(resolve(baseline_uri)).get("weights_sha256")
        baseline = {"uri": baseline_uri, "architecture": base_model.architecture, "weights_sha256": base_sha,
                    "task": {k: _ci(v) for k, v in base_task.items()}}
    task_controls = task_evidence(probs, labels, col, ctx, base_probs)

    description["evaluated"] = {"split": split, "cases": len(dataset),
                                "first_cases_only": len(dataset) < full_size}
    if len(dataset) < full_size:
        limitations.append(f"Only the first {len(dataset)} cases of the {split} split were evaluated.")
    num_parameters = sum(p.numel() for p in model.parameters())
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": {"uri": model_uri, "architecture": model.architecture, "family": family,
                  "weights_sha256": config_doc.get("weights_sha256"), "num_parameters": num_parameters,
                  "label_names": list(model.label_names), "operating_point": operating_point},
        "data": description,
        "split": split,
        "n_cases": len(dataset),
        "command": command or _default_command(model_uri, data_spec_to_text(spec), split,
                                               Path(out) if out is not None else None, folder, baseline_uri, n_boot,
                                               seed, batch_size, max_cases,
                                               None if localization_data is None
                                               else data_spec_to_text(load_data_spec(localization_data))),
        "mlmi_zoo_version": __version__,
        "seed": seed,
        "bootstrap": {"description": (
            f"95% percentile bootstrap, {n_boot} resamples of "
            + ("patients (all cases of a drawn patient)" if groups is not None else "cases")
            + f", seed {seed}; operating point {operating_point:g} on P({model.label_names[-1]})"), "n": n_boot},
        "task": task,
        "baseline": baseline,
        "elements": {name: blocks[name] for name in ELEMENTS},
        "faithfulness": faithfulness,
        "verdicts": verdicts(blocks, faithfulness),
        "task_controls": task_controls,
        "git_commit": _git_commit(),
        "figures": dict(fig.index),
        "limitations": ctx.limitations,
        "evaluation_limits": dataclasses.asdict(limits),
    }
    doc["elapsed_s"] = round(time.perf_counter() - start, 2)
    doc = _clean(doc)
    problems = validate_results(doc)
    if problems:
        raise ValueError("the results document does not validate: " + "; ".join(problems))
    if out is not None:
        from mlmi_zoo._weights import write_text_atomic

        write_text_atomic(Path(out), json.dumps(doc, indent=2, allow_nan=False) + "\n")
    log.info("evaluated %s on %d %s cases in %.1f s", model_uri, len(dataset), split, doc["elapsed_s"])
    return doc
