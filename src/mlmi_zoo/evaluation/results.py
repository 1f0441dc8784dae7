"""The results document that ``mlmi-zoo evaluate`` writes and model cards are generated from.

One JSON document, versioned by ``schema_version``. Every number a card states is read from here;
``mlmi-zoo card --check`` re-reads it to prove the card says nothing else.

Layout (``ELEMENTS`` are the five elements of interpretability, Wang et al., IEEE Access 2024)::

    {
      "schema_version": "mlmi-zoo.results/1",
      "model":  {"uri", "architecture", "family", "weights_sha256", "num_parameters",
                 "label_names", "operating_point"},
      "data":   {... the data description: kind, params, split identifiers, checksum ...},
      "split": "test", "n_cases": int, "command": str, "mlmi_zoo_version": str, "seed": int,
      "task":   {metric: {"estimate": float, "low": float, "high": float}},
      "baseline": null | {"uri": str, "task": {...same form...}},
      "elements": {element: {"applicable": bool, "reason": str | null,
                             "metrics": {name: number | {"estimate", "low", "high"}},
                             "figures": [relative paths], "does_not_show": str}},
      "faithfulness": {same form as an element},
      "figures": {name: relative path}
    }
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "mlmi-zoo.results/1"
ELEMENTS = ("localization", "visual_recognizability", "physical_attribution", "transparency", "actionability")
TASK_METRICS = ("auroc", "auprc", "balanced_accuracy", "sensitivity", "specificity", "ece", "brier")

__all__ = ["SCHEMA_VERSION", "ELEMENTS", "TASK_METRICS", "validate_results", "read_results", "metric_value", "element"]


def metric_value(entry: Any) -> float | None:
    """The point estimate of a metric entry (a number or ``{"estimate": ...}``), None if absent."""
    if isinstance(entry, dict):
        entry = entry.get("estimate")
    if entry is None:
        return None
    value = float(entry)
    return None if math.isnan(value) else value


def element(applicable: bool, metrics: dict[str, Any] | None = None, reason: str | None = None,
            figures: list[str] | None = None, does_not_show: str = "") -> dict[str, Any]:
    """Build one element block of the results document."""
    if not applicable and not reason:
        raise ValueError("an element that is not applicable needs the reason")
    return {"applicable": applicable, "reason": reason, "metrics": metrics or {}, "figures": figures or [],
            "does_not_show": does_not_show}


def validate_results(doc: dict[str, Any]) -> list[str]:
    """Problems with a results document (empty list = valid)."""
    problems = []
    if doc.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version is {doc.get('schema_version')!r}, expected {SCHEMA_VERSION!r}")
    for key in ("model", "data", "split", "n_cases", "command", "task", "elements"):
        if key not in doc:
            problems.append(f"missing {key!r}")
    model = doc.get("model", {})
    for key in ("architecture", "family", "weights_sha256", "label_names"):
        if not model.get(key):
            problems.append(f"model.{key} missing")
    task = doc.get("task", {})
    for key in TASK_METRICS:
        if key not in task:
            problems.append(f"task.{key} missing")
    elements = doc.get("elements", {})
    for name in ELEMENTS:
        block = elements.get(name)
        if block is None:
            problems.append(f"elements.{name} missing")
        elif not block.get("applicable") and not block.get("reason"):
            problems.append(f"elements.{name} is not applicable but gives no reason")
        elif block.get("applicable") and not block.get("metrics"):
            problems.append(f"elements.{name} is applicable but has no metrics")
    return problems


def read_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results.json; raise ValueError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    problems = validate_results(doc)
    if problems:
        raise ValueError(f"{path} is not a valid results document: " + "; ".join(problems))
    return doc
