"""The text of a model card's parts, from the numbers of ``results.json`` and the fields of ``config.json``:
values with their intervals, metric and control rows, verdicts, the randomisation check, and the
sentences on input, intensity, backbone and use. :mod:`mlmi_zoo.model_cards.card` puts them into the
template.
"""
from __future__ import annotations

import math
from typing import Any

# The card's sections, one per element of interpretability: (title, the question it answers).
ELEMENT_TEXT = {
    "localization": ("Localization", "Where in the image is the evidence?"),
    "visual_recognizability": ("Visual recognizability", "Is the evidence something a person can recognise?"),
    "physical_attribution": ("Physical attribution", "Does the model speak in physical units a clinician measures?"),
    "transparency": ("Transparency", "Can the computation from evidence to decision be followed?"),
    "actionability": ("Actionability", "Can a person act on the explanation and change the decision?"),
}


def fmt(value: Any) -> str:
    """A metric as text: the estimate with 4 significant digits, and its CI when present."""
    if isinstance(value, dict) and "estimate" in value:
        est = _num(value["estimate"])
        if value.get("low") is not None and value.get("high") is not None:
            return f"{est} ({_num(value['low'])}–{_num(value['high'])})"
        return est
    if isinstance(value, (list, tuple)):
        return ", ".join(_num(v) for v in value)
    return _num(value)


def _num(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, str):
        try:
            return _num(float(v))
        except ValueError:
            return v
    return str(v)


def _label(name: str) -> str:
    return name.replace("_", " ")


def _rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    return [{"label": _label(k), "value": fmt(v)} for k, v in metrics.items()]


def _diff_text(d: dict[str, Any] | None) -> str:
    if not d:
        return "—"
    return f"{_signed(d.get('estimate'))} ({_signed(d.get('low'))} to {_signed(d.get('high'))})"


def _signed(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):+.3f}"


def _control_rows(evidence: dict[str, Any] | None) -> list[dict[str, str]]:
    """One row per control of a comparison block: its score and the model-minus-control difference."""
    if not evidence or "controls" not in evidence:
        return []
    return [{"control": name.replace("_", " "), "score": fmt(c["score"]), "difference": _diff_text(c["difference"]),
             "n": f"{c['difference'].get('n_cases', 'n/a')} / {c['difference'].get('n_patients', 'n/a')}"}
            for name, c in evidence["controls"].items()]


def _further_comparisons(block: dict[str, Any]) -> list[dict[str, Any]]:
    """The comparisons of an element beyond its main one (``evidence_*`` keys: a second metric, each quantity)."""
    main = block.get("evidence")
    found: list[dict[str, Any]] = []
    for key in sorted(k for k in block if k.startswith("evidence_")):
        value = block[key]
        candidates = value.values() if key == "evidence_by_quantity" else [value]
        found += [c for c in candidates if isinstance(c, dict) and "controls" in c and c != main]
    return [{"metric": c.get("metric"), "model": fmt(c.get("model")), "controls": _control_rows(c),
             "verdict": (c.get("verdict") or {}).get("sentence")} for c in found]


def _cascade_text(cascade: list[dict[str, Any]] | None) -> str | None:
    """One line of the cascading parameter randomisation: each step's rank correlation with the trained map."""
    if not cascade:
        return None
    steps = ", ".join(f"{'' if k == 0 else '+ '}`{step['randomised'][-1]}` {_num(step['spearman_mean'])}"
                      for k, step in enumerate(cascade))
    return ("Sanity check of the map (Adebayo et al. 2018; it needs no mask): the rank correlation of the map with "
            f"the trained model's after re-initialising, from the output inwards: {steps}. A map that still "
            "resembles the trained one once a part is re-initialised does not show what that part learnt.")


def _finding_rows(found: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pixel AUPR of each finding's map pooled over every pixel of the annotated photographs, beside the controls."""
    if not found:
        return None
    rows = [{"finding": name.replace("_", " "), "images": r["images"],
             **{k: fmt(v) for k, v in r["pooled_aupr"].items()}}
            for name, r in found.items() if isinstance(r, dict) and "pooled_aupr" in r]
    return {"anchor": found.get("anchor"), "rows": rows}


def _verdict_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """The card's verdict table: one row per element (and faithfulness), read from results.json."""
    rows = []
    blocks = {**results["elements"], "faithfulness": results.get("faithfulness") or {}}
    for key, v in (results.get("verdicts") or {}).items():
        evidence = blocks.get(key, {}).get("evidence") or {}
        control = v.get("control")
        model = evidence.get("model")
        cs = evidence.get("controls", {}).get(control, {}) if control else {}
        rows.append({"element": ELEMENT_TEXT.get(key, ("Faithfulness",))[0], "status": v["status"],
                     "metric": v.get("metric") or "—", "model": fmt(model) if model else "—",
                     "control": (control or "—").replace("_", " "), "control_score": fmt(cs["score"]) if cs else "—",
                     "difference": _diff_text(v.get("difference")),
                     "n": (f"{v['difference']['n_cases']} / {v['difference']['n_patients']}" if v.get("difference")
                           else (str(evidence.get("n_cases")) if evidence.get("n_cases") is not None else "—")),
                     "sentence": v["sentence"]})
    return rows


def _scored_on(annotated: dict[str, Any] | None) -> str | None:
    """The sentence that says an element was scored on another, annotated data set."""
    if not annotated:
        return None
    if "foreground" in annotated:  # prototype purity: each prototype's nearest patches on an annotated set
        return (f"Lesion purity scored on the {annotated['split']} split of another data set with lesion masks, "
                f"`{annotated['spec']}` ({annotated['cases']} cases; the {annotated['k']} nearest patches of each "
                f"prototype, one per case, searched among the cells push could take"
                + (f" on the `{annotated['foreground']}` mask" if annotated["foreground"] else "") + ").")
    if "centre_prior_from" not in annotated:  # bags whose instances carry truth
        return (f"Scored on the {annotated['split']} split of another data set with instance truth, "
                f"`{annotated['spec']}` ({annotated['cases']} cases): {annotated['why']}.")
    return (f"Scored on the {annotated['split']} split of another data set with lesion masks, "
            f"`{annotated['spec']}` ({annotated['cases']} cases; centre prior from {annotated['centre_prior_from']}): "
            f"{annotated['why']}.")


def _article(word: str) -> str:
    return "An" if word[:1].lower() in "aeiou" else "A"


def _input_text(cfg: dict[str, Any]) -> str:
    if cfg["spatial_dims"] == 0:
        return f"bags of {cfg['in_channels']}-dimensional instance features, any bag size"
    size = " × ".join(str(s) for s in cfg.get("img_size", []))
    return f"{cfg['in_channels']} channel(s), {cfg['spatial_dims']}D, trained at {size}"


def _intensity_text(t: dict[str, Any]) -> str:
    kind = t.get("kind", "identity")
    if kind == "window":
        text = f"clip to [{t['low']:g}, {t['high']:g}] {t.get('unit') or ''} and scale to [0, 1]".replace("  ", " ")
    elif kind == "scale":
        text = f"divide by {t['high']:g}"
    else:
        text = "none (inputs in [0, 1])"
    if t.get("mean") is None:
        return text
    return f"{text}, then {_normalisation_text(t)} (the base weights' normalisation)"


def _normalisation_text(t: dict[str, Any]) -> str:
    """``(x − mean) / std`` with the per-channel values of an intensity transform or a provenance record."""
    def values(v: list[float]) -> str:
        return "(" + ", ".join(f"{x:g}" for x in v) + ")"

    return f"(x − mean) / std per channel, mean {values(t['mean'])}, std {values(t['std'])}"


def _hub_repo(base_weights: dict[str, Any] | None) -> str | None:
    """The Hub repository the base weights came from (``ORG/REPO``), for the front matter's ``base_model``."""
    source = (base_weights or {}).get("source", "")
    return source.removeprefix("hf-hub:").partition("@")[0] if source.startswith("hf-hub:") else None


def _backbone_text(config_doc: dict[str, Any]) -> str:
    """How the backbone started: at random, from a zoo parent, or from pretrained base weights."""
    backbone, base_weights = config_doc["config"]["backbone"], config_doc.get("base_weights")
    if config_doc.get("base_model"):
        text = f"`{backbone}`, initialised from `{config_doc['base_model']}`"
        return text + (f", whose backbone started from `{base_weights['name']}` (see *Base weights*)" if base_weights else "")
    if base_weights:
        return f"`{backbone}`, initialised from the pretrained weights `{base_weights['name']}` (see *Base weights*)"
    return f"`{backbone}`, randomly initialised, trained from scratch"


def _base_weights_rows(base_weights: dict[str, Any] | None) -> list[dict[str, str]]:
    """The *Base weights* provenance table (empty without base weights)."""
    if not base_weights:
        return []
    sha = base_weights.get("sha256")
    return [{"label": "name", "value": f"`{base_weights['name']}`"},
            {"label": "source", "value": f"`{base_weights['source']}`"},
            {"label": "license", "value": base_weights.get("license") or "unknown"},
            {"label": "sha256", "value": f"`{sha}`" if sha else "not recorded (the file was not in the local cache)"},
            {"label": "input normalisation", "value": f"{_normalisation_text(base_weights)}, on [0, 1] intensities"}]


def _usage(decomposes: bool, cfg: dict[str, Any]) -> str:
    if cfg["spatial_dims"] == 0:
        return ("exp = model.explain(feats, mask=mask, coords=coords)   # feats (B, N, D)\n"
                "exp.attention, exp.measurements")
    spacing = cfg.get("spacing")
    arg = f", spacing={tuple(spacing)!r}" if spacing else ""
    lines = ["x = model.input_spec.intensity(raw_image)   # raw intensities -> network range",
             f"exp = model.explain(x{arg})"]
    if decomposes:
        lines.append("assert (exp.logits_from_contributions() - exp.logits).abs().max() < 1e-5   # exact decomposition")
    lines.append('exp.save_html("report.html")')
    return "\n".join(lines)
