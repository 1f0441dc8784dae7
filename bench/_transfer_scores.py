"""Scoring the fine-tuned models of ``bench_transfer.py`` on their test cases: predictions, test AUROC with a
CI over patients, the sanity numbers of ``evaluate``'s document (:func:`score_run`, again without fine-tuning:
:func:`rescore`) and the paired interpretable-minus-baseline difference (:func:`paired`)."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _transfer_data import SEED
from _transfer_sets import DATASETS, TARGET, DataSet, _current, defaults_signature

log = logging.getLogger("bench_transfer")


def predictions(model_dir: Path, csv: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(last class), labels and patients of the cases of ``csv`` under the model in ``model_dir``.

    The cases are read as ``mlmi-zoo evaluate --test-csv`` reads them
    (:func:`mlmi_zoo.training.finetune.evaluation_data_spec`); the patient is the CSV's ``patient`` column.
    """
    import csv as csv_module

    from torch.utils.data import DataLoader

    import mlmi_zoo
    from mlmi_zoo.architectures.blocks.stages import training_for
    from mlmi_zoo.training.data_spec import build_dataset, collate_for
    from mlmi_zoo.training.finetune import evaluation_data_spec

    uri = f"local-dir:{model_dir}"
    spec = evaluation_data_spec(uri, csv)
    model = mlmi_zoo.load(uri).eval()
    adapter = training_for(model)
    probs, labels = [], []
    with torch.no_grad():
        for batch in DataLoader(build_dataset(spec, "test"), batch_size=32, shuffle=False, collate_fn=collate_for(spec)):
            probs.append(model(adapter.inputs(model, batch)).softmax(-1)[:, -1])
            labels.append(batch["label"])
    with csv.open(encoding="utf-8", newline="") as fh:
        patients = np.asarray([row["patient"] for row in csv_module.DictReader(fh)])
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), patients


def case_predictions(spec: DataSet, model_dir: Path, folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(last class), labels and patients of data set ``spec``'s test cases (in ``folder``) under the model in
    ``model_dir``: images from ``test.csv`` (:func:`predictions`), or bags (the bag id is the patient)."""
    if spec.bags:
        from _transfer_bags import bag_predictions

        return bag_predictions(model_dir, folder / spec.test)
    return predictions(model_dir, folder / spec.test)


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else math.nan


def auroc_with_ci(scores: np.ndarray, labels: np.ndarray, patients: np.ndarray, n_boot: int) -> dict[str, Any]:
    """AUROC with a 95% percentile-bootstrap interval over patients (:func:`~mlmi_zoo.evaluation.bootstrap.bootstrap_ci`)."""
    from mlmi_zoo.evaluation.bootstrap import bootstrap_ci

    ci = bootstrap_ci(_auroc, scores, labels, n=n_boot, seed=SEED, groups=patients)
    return {"estimate": ci.estimate, "ci": [ci.low, ci.high], "n_boot_used": ci.n}


def sanity_counts(doc: dict[str, Any]) -> dict[str, Any]:
    """The interpretable model's sanity numbers from a results document.

    ProtoPNet (visual-recognizability block): how many prototypes, how many pushed onto a training
    patch, unique ones, class purity of their nearest training patches, and the degenerate ones
    (``prototype_sanity``). A concept bottleneck: the test AUROC of each binary concept it predicts
    (``concept_auroc``; None where the test cases hold one class only), and the task accuracy with
    no concept corrected and with every concept corrected to the truth (actionability block). A MIL
    model: the logit change when each bag's top-attention instances are excluded, the share of
    positive bags it flips, and the verdict against excluding as many random instances. An image
    model also gets ``map_randomised``: Adebayo et al.'s cascading parameter randomisation, the rank
    correlation of its map with the trained model's after re-initialising each part from the output
    inwards (``{part: rho}``, in that order).
    Empty for the baseline.
    """
    cascade = (doc["elements"]["localization"].get("details") or {}).get("cascading_randomisation") or []
    randomised = {"map_randomised": {step["randomised"][-1]: step["spearman_mean"] for step in cascade}} if cascade else {}
    return {**_family_sanity(doc), **randomised}


def _family_sanity(doc: dict[str, Any]) -> dict[str, Any]:
    """:func:`sanity_counts` less the parameter randomisation."""
    metrics = doc["elements"]["visual_recognizability"].get("metrics") or {}
    if doc.get("architecture", "").startswith("cbm_") or "accuracy_all_concepts_corrected" in (
            doc["elements"]["actionability"].get("metrics") or {}):
        action = doc["elements"]["actionability"].get("metrics") or {}
        aurocs = {k.removesuffix("_auroc"): (v if isinstance(v, (int, float)) and math.isfinite(v) else None)
                  for k, v in metrics.items() if k.endswith("_auroc")}
        return {"concept_auroc": aurocs, "accuracy_no_intervention": action.get("accuracy_no_intervention"),
                "accuracy_all_concepts_corrected": action.get("accuracy_all_concepts_corrected"),
                **{k: v for k, v in metrics.items() if k.endswith("_kappa")}}
    action = doc["elements"]["actionability"]
    if "mean_logit_change_top_instances_excluded" in (action.get("metrics") or {}):  # a MIL model
        verdict = (action.get("evidence") or {}).get("verdict") or {}
        return {"top_excluded_logit_change": action["metrics"]["mean_logit_change_top_instances_excluded"],
                "positive_bags_flipped_share": action["metrics"]["positive_bags_flipped_share"],
                "against_random_tiles": verdict.get("status")}
    kept = ("num_prototypes", "pushed", "unique_prototypes", "class_purity_mean")
    return {k.removeprefix("prototypes_"): v for k, v in metrics.items() if k.startswith("prototypes_") or k in kept}


def score_run(name: str, final: Path, folder: Path, n_boot: int) -> dict[str, Any]:
    """Evaluate the fine-tuned model ``final`` on data set ``name``'s test cases: its test AUROC with a CI over
    patients and the sanity numbers of ``evaluate``'s document (written to ``final/../results.json``).

    Raises:
        RuntimeError: ``evaluate``'s test AUROC is not that of the model's predictions.
    """
    from mlmi_zoo.evaluation.evaluate import EvaluationLimits, evaluate
    from mlmi_zoo.training.finetune import evaluation_data_spec

    spec = DATASETS[name]
    scores, labels, patients = case_predictions(spec, final, folder)
    # The controls and the other elements are not what is compared here: small case counts keep it fast
    # (the task always uses every test case; the sanity counts read every prototype).
    limits = EvaluationLimits(deletion_cases=8, spacing_cases=8, control_train_cases=64, examples=1,
                              purity_train_cases=64, val_cases=64, oracle_train_cases=64)
    uri = f"local-dir:{final}"
    doc = evaluate(uri, evaluation_data_spec(uri, folder / spec.test), split="test", n_boot=min(n_boot, 200), seed=SEED,
                   out=final.parent / "results.json", limits=limits)
    if abs(doc["task"]["auroc"]["estimate"] - _auroc(scores, labels)) > 1e-6:
        raise RuntimeError(f"{final}: evaluate's test AUROC {doc['task']['auroc']['estimate']} is not the "
                           f"predictions' {_auroc(scores, labels)}")
    return {"test_auroc": auroc_with_ci(scores, labels, patients, n_boot), "test_cases": len(labels),
            "test_patients": len(set(patients.tolist())), "patients": spec.patients,
            "sanity": sanity_counts(doc), "results": str(final.parent / "results.json")}


def rescore(name: str, rows: list[dict[str, Any]], folder: Path, n_boot: int, families: Sequence[str]) -> list[dict[str, Any]]:
    """The current run rows of data set ``name`` (every seed; ``families`` only) evaluated again, without
    fine-tuning again: after a change of ``evaluate`` (what the sanity column reads). Each new row is the old
    one with the new evaluation and ``rescored_utc``; the model and its test AUROC are the same.

    Raises:
        RuntimeError: a model's test AUROC is not its row's.
    """
    latest = {(r["family"], r.get("seed")): r for r in rows
              if r["kind"] == "run" and r["dataset"] == name and r["family"] in families and _current(r)}
    out = []
    for (family, seed), row in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        log.info("%s / %s / seed %s: evaluated again", name, family, seed or 0)
        new = {**row, **score_run(name, Path(row["final"]), folder, n_boot),
               "rescored_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        if abs(new["test_auroc"]["estimate"] - row["test_auroc"]["estimate"]) > 1e-6:
            raise RuntimeError(f"{row['final']}: test AUROC {new['test_auroc']['estimate']} is not the row's")
        out.append(new)
    return out


def paired(name: str, rows: list[dict[str, Any]], folder: Path, n_boot: int, seed: int = 0) -> dict[str, Any]:
    """The interpretable model's minus the baseline's test AUROC on the same cases, resampling patients together
    (the runs of fine-tuning seed ``seed``).

    Raises:
        ValueError: a family without a run row, or a model folder whose test AUROC is not its row's.
    """
    from mlmi_zoo.evaluation.bootstrap import bootstrap_ci

    spec = DATASETS[name]
    interpretable = spec.interpretable
    homes = {interpretable: name, spec.baseline: spec.baseline_from or name}  # the data set of each family's runs
    latest = {r["family"]: r for r in rows if r["kind"] == "run" and r["dataset"] == homes.get(r["family"])
              and _current(r) and r.get("seed") == (seed or None)}
    missing = [f for f in homes if f not in latest]
    if missing:
        raise ValueError(f"{name}: no run row for {missing}; run them first")
    preds, order = {}, None
    for family, home in homes.items():
        scores, labels_f, patients_f = case_predictions(DATASETS[home], Path(latest[family]["final"]),
                                                        folder.parent / (DATASETS[home].data_from or home))
        if abs(_auroc(scores, labels_f) - latest[family]["test_auroc"]["estimate"]) > 1e-6:
            raise ValueError(f"{latest[family]['final']}: test AUROC {_auroc(scores, labels_f):.6f} is not the row's")
        if order is None:
            order, labels, patients = patients_f, labels_f, patients_f
        elif not np.array_equal(patients_f, order):  # another data set's cases: pair them by case id
            at = {p: i for i, p in enumerate(patients_f.tolist())}
            if len(at) != len(patients_f) or set(at) != set(order.tolist()):
                raise ValueError(f"{name}: the test cases of {home} are not those of {name}")
            keep = np.asarray([at[p] for p in order.tolist()])
            scores, labels_f = scores[keep], labels_f[keep]
            if not np.array_equal(labels_f, labels):
                raise ValueError(f"{name}: a case's label differs between {name} and {home}")
        preds[family] = scores
    ci = bootstrap_ci(lambda a, b, y: _auroc(a, y) - _auroc(b, y), preds[interpretable], preds[spec.baseline], labels,
                      n=n_boot, seed=SEED, groups=patients)
    return {"kind": "paired", "dataset": name, "seed": seed or None, "defaults": defaults_signature(interpretable, name),
            "statistic": f"test AUROC {interpretable} - {spec.baseline}", "estimate": ci.estimate, "ci": [ci.low, ci.high],
            "n_boot_used": ci.n, "test_cases": len(labels), "test_patients": len(set(patients.tolist())),
            "target_met": bool(ci.estimate >= -TARGET),
            "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
