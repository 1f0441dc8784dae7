"""Model cards generated from measured results, and the check that they say nothing else.

The card follows Mitchell et al. 2019 ("Model Cards for Model Reporting", FAT*) with items from
CLAIM and TRIPOD+AI, and has one section per element of interpretability (Wang et al., "A Framework
for Interpretability in Machine Learning for Medical Imaging", IEEE Access 2024). It is rendered
from ``config.json`` and ``results.json`` by a Jinja2 template; ``check_card`` renders it again and
compares, so a number typed into the card by hand, a missing field, or weights that differ from the
recorded sha256 are all caught. The front matter is built as huggingface_hub's ``ModelCardData`` (task
metrics as ``EvalResult``, which the Hub turns into ``model-index``) and read back with ``ModelCard.load``.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from mlmi_zoo._version import __version__
from mlmi_zoo._weights import sha256_file, write_text_atomic
from mlmi_zoo.architectures.mil.config import without_area_head
from mlmi_zoo.base import CONFIG_FILE, WEIGHTS_FILE
from mlmi_zoo.evaluation.results import ELEMENTS, TASK_METRICS, metric_value, read_results
from mlmi_zoo.families import family_of
from mlmi_zoo.model_cards._card_text import (ELEMENT_TEXT, _article, _backbone_text, _base_weights_rows,
                                             _cascade_text, _control_rows, _finding_rows, _further_comparisons,
                                             _hub_repo, _input_text, _intensity_text, _num, _rows, _scored_on,
                                             _usage, _verdict_rows, fmt)
from mlmi_zoo.training.datasets.catalog import ZOO_BIBTEX, source_for

if TYPE_CHECKING:  # huggingface_hub is imported where a card is built or read
    from huggingface_hub import ModelCardData

__all__ = ["write_card", "render_card", "check_card", "CARD_FILE", "RESULTS_FILE"]

CARD_FILE = "README.md"
RESULTS_FILE = "results.json"
TEMPLATE = Path(__file__).with_name("card_template.md.j2")
# Top-level front matter keys, in the order the cards list them.
FRONT_MATTER_ORDER = ("license", "library_name", "tags", "datasets", "pipeline_tag", "model-index", "mlmi_zoo", "base_model")
PLACEHOLDERS = re.compile(r"\b(TODO|TBD|FIXME|XXX|PLACEHOLDER|lorem ipsum)\b", re.IGNORECASE)

FRAMEWORK_BIBTEX = """@article{wang2024framework,
  title   = {A Framework for Interpretability in Machine Learning for Medical Imaging},
  author  = {Wang, Alan Q. and Karaman, Batuhan K. and Kim, Heejong and Rosenthal, Jacob and Saluja, Rachit and Young, Sean I. and Sabuncu, Mert R.},
  journal = {IEEE Access},
  year    = {2024}
}"""

TASK_LABELS = {"auroc": "AUROC", "auprc": "AUPRC", "balanced_accuracy": "balanced accuracy", "sensitivity": "sensitivity",
               "specificity": "specificity", "ece": "expected calibration error (15 bins)", "brier": "Brier score"}
TASK_TYPE = {"auroc": "roc_auc", "auprc": "average_precision", "balanced_accuracy": "balanced_accuracy",
             "sensitivity": "recall", "specificity": "specificity", "ece": "ece", "brier": "brier_score"}


def _card_data(config_doc: dict[str, Any], results: dict[str, Any], source: Any, name: str) -> ModelCardData:
    """The front matter as huggingface_hub's ModelCardData; its eval_results become the Hub's ``model-index``."""
    from huggingface_hub import EvalResult, ModelCardData

    cfg = config_doc["config"]
    family = results["model"]["family"]
    eval_results = []
    for key in TASK_METRICS:
        value = metric_value(results["task"].get(key))
        if value is not None:
            eval_results.append(EvalResult(
                task_type="image-classification", dataset_type=source.hub_id, dataset_name=source.name,
                dataset_split=results["split"], metric_type=TASK_TYPE[key], metric_name=TASK_LABELS[key],
                metric_value=round(value, 6)))
    return ModelCardData(
        license=source.license,
        library_name="mlmi-zoo",
        tags=["medical-imaging", source.modality.lower().replace(" ", "-"), source.body_part.lower().replace(" ", "-"),
              family.replace("_", "-"), "interpretable" if family_of(family).interpretable else "black-box-baseline"],
        datasets=[source.hub_id],
        pipeline_tag="image-classification",
        base_model=config_doc.get("base_model") or _hub_repo(config_doc.get("base_weights")),
        model_name=name,
        eval_results=eval_results,
        mlmi_zoo={
            "version": config_doc.get("mlmi_zoo_version", __version__),
            "architecture": config_doc["architecture"],
            "weights_sha256": config_doc["weights_sha256"],
            "input_spec": {
                "channels": cfg["in_channels"],
                "spatial_dims": cfg["spatial_dims"],
                "size": cfg.get("img_size"),
                f"spacing_{source.spacing_unit.lower()}": cfg.get("spacing"),
                "intensity_transform": cfg.get("intensity"),
                "modality": cfg.get("modality") or source.modality,
            },
            "label_names": cfg["label_names"],
            "operating_point": cfg.get("operating_point", 0.5),
            "quantities": cfg.get("quantities") or [],
        },
    )


def _front_matter_yaml(card_data: ModelCardData) -> str:
    """The YAML between the card's ``---`` lines, in FRONT_MATTER_ORDER."""
    import yaml

    # Not ModelCardData.to_yaml(): between the huggingface_hub releases we support, to_dict changed its key order and
    # whether it drops nulls inside our own block (0.23 drops ``spacing_mm: null``), and to_yaml folds lines at 80
    # characters. check_card compares the card byte for byte with a fresh rendering, so the Hub supplies the fields
    # it defines (model-index from the eval results) and the order, width and ``mlmi_zoo`` block are fixed here.
    meta = card_data.to_dict() | {"mlmi_zoo": card_data["mlmi_zoo"]}
    ordered = {key: meta.pop(key) for key in FRONT_MATTER_ORDER if key in meta} | meta
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=1000).strip()


def _figure_entries(paths: list[str], folder: Path) -> list[str]:
    return [p for p in paths if (folder / p).is_file()]


def render_card(folder: str | Path, results: dict[str, Any] | None = None) -> str:
    """Render the card text for a model folder holding config.json, the weights and results.json."""
    import jinja2

    folder = Path(folder)
    config_doc = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    results = results if results is not None else read_results(folder / RESULTS_FILE)
    cfg = config_doc["config"]
    family = results["model"]["family"]
    source = source_for(results["data"])
    name = folder.name
    card_data = _card_data(config_doc, results, source, name)

    baseline = results.get("baseline")
    task_rows = []
    for key in TASK_METRICS:
        if key not in results["task"]:
            continue
        row = {"label": TASK_LABELS[key], "value": fmt(results["task"][key])}
        if baseline:
            b = metric_value(baseline["task"].get(key))
            m = metric_value(results["task"][key])
            row["baseline"] = fmt(baseline["task"].get(key))
            row["gap"] = _num(m - b) if (b is not None and m is not None) else "n/a"
        task_rows.append(row)

    figures = results.get("figures", {})
    task_figures = [{"title": t, "path": figures[k]} for k, t in (("roc", "ROC curve"), ("reliability", "reliability diagram"))
                    if k in figures and (folder / figures[k]).is_file()]
    elements = []
    for key in ELEMENTS:
        block = results["elements"][key]
        title, question = ELEMENT_TEXT[key]
        elements.append({
            "title": title, "question": question, "applicable": block["applicable"], "reason": block.get("reason"),
            "rows": _rows(block.get("metrics", {})), "figures": _figure_entries(block.get("figures", []), folder),
            "does_not_show": block.get("does_not_show") or "—",
            "controls": _control_rows(block.get("evidence")), "evidence_metric": (block.get("evidence") or {}).get("metric"),
            "verdict": ((results.get("verdicts") or {}).get(key) or {}).get("sentence"),
            "scored_on": _scored_on((block.get("details") or {}).get("annotated_data")),
            "further": _further_comparisons(block),
            "findings": _finding_rows((block.get("details") or {}).get("finding_maps")),
            "cascade": _cascade_text((block.get("details") or {}).get("cascading_randomisation")),
        })
    faith = results.get("faithfulness") or {"applicable": False, "reason": "not evaluated for this model"}
    faithfulness = {"applicable": faith.get("applicable", False), "reason": faith.get("reason"),
                    "rows": _rows(faith.get("metrics", {})), "figures": _figure_entries(faith.get("figures", []), folder),
                    "does_not_show": faith.get("does_not_show") or "—",
                    "controls": _control_rows(faith.get("evidence")), "evidence_metric": (faith.get("evidence") or {}).get("metric"),
                    "verdict": ((results.get("verdicts") or {}).get("faithfulness") or {}).get("sentence")}
    task_controls = [{"what": name.replace("_", " "), "metric": c["metric"], "model": fmt(c["model"]), **row}
                     for name, c in (results.get("task_controls") or {}).items() for row in _control_rows(c)]

    spacing = cfg.get("spacing")
    quantities = cfg.get("quantities") or []
    record = family_of(family)
    family_title, method = record.title, record.method
    limitations = list(results.get("limitations", []))
    limitations += [
        f"Trained and evaluated only on {source.name}; performance on other scanners, sites, populations or "
        "acquisition protocols is unknown.",
        "Explanations are faithful to the model by construction or by measurement (see above), not to the underlying "
        "biology: a faithful explanation of a wrong decision is still wrong.",
    ]
    if not source.has_spacing:
        limitations.append("The images carry no physical spacing, so the model makes no statement in physical units.")
    bibtex = [_card_bibtex(name, config_doc)] + list(record.bibtex) + list(source.bibtex) + [FRAMEWORK_BIBTEX]
    if ZOO_BIBTEX not in bibtex:
        bibtex.append(ZOO_BIBTEX)
    usage = _usage(record.decomposes, cfg)
    template = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE.parent)), undefined=jinja2.StrictUndefined,
                                  keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True).get_template(TEMPLATE.name)
    text = template.render(
        front_matter=_front_matter_yaml(card_data),
        name=name, summary=f"{_article(family_title)} {family_title} for {source.name} ({', '.join(cfg['label_names'])}), from mlmi-zoo.",
        architecture=config_doc["architecture"], family_title=family_title, method=method, config=cfg,
        num_parameters=results["model"].get("num_parameters", "n/a"),
        input_text=_input_text(cfg), spacing_text=(" × ".join(f"{s:g}" for s in spacing) + f" {source.spacing_unit}") if spacing else "none",
        intensity_text=_intensity_text(cfg.get("intensity") or {}), label_names=cfg["label_names"],
        operating_point=cfg.get("operating_point", 0.5),
        quantities_text=", ".join(f"{q['name']} [{q['unit']}]" for q in quantities) or "none",
        without_area_head=without_area_head(cfg.get("equivalent_radii")),
        weights_sha256=config_doc["weights_sha256"], version=config_doc.get("mlmi_zoo_version", __version__),
        base_model=config_doc.get("base_model"), backbone_text=_backbone_text(config_doc),
        base_weights=_base_weights_rows(config_doc.get("base_weights")), source=source, split=results["split"], n_cases=results["n_cases"],
        data_json=json.dumps(results["data"], sort_keys=True),
        bootstrap_text=results.get("bootstrap", {}).get("description", "percentile bootstrap over cases"),
        task_rows=task_rows, baseline=baseline, verdict_rows=_verdict_rows(results), task_controls=task_controls, task_figures=task_figures, elements=elements, faithfulness=faithfulness,
        limitations=limitations, load_uri=name, usage=usage, command=results["command"], bibtex="\n\n".join(bibtex),
        bags=cfg["spatial_dims"] == 0,
    )
    return re.sub(r"\n{3,}", "\n\n", text)


def _card_bibtex(name: str, config_doc: dict[str, Any]) -> str:
    key = re.sub(r"[^a-z0-9]", "_", name.lower())
    return (f"@misc{{{key},\n  title  = {{Model card: {name}}},\n  author = {{{{mlmi-zoo contributors}}}},\n"
            f"  year   = {{2026}},\n  note   = {{mlmi-zoo {config_doc.get('mlmi_zoo_version', __version__)}, "
            f"weights sha256 {config_doc['weights_sha256'][:16]}}}\n}}")


def write_card(model_dir: str | Path, results_path: str | Path, figures_dir: str | Path | None = None) -> Path:
    """Copy results.json and the figures it cites into ``model_dir`` and write its README.md card."""
    model_dir = Path(model_dir)
    results = read_results(results_path)
    sha = sha256_file(model_dir / WEIGHTS_FILE)
    if results["model"]["weights_sha256"] != sha:
        raise ValueError(f"{results_path} was measured on weights {results['model']['weights_sha256'][:12]}…, "
                         f"but {model_dir / WEIGHTS_FILE} has sha256 {sha[:12]}…; evaluate these weights first")
    target = model_dir / RESULTS_FILE
    if Path(results_path).resolve() != target.resolve():
        shutil.copyfile(results_path, target)
    source_root = Path(figures_dir) if figures_dir else Path(results_path).parent
    cited = set(results.get("figures", {}).values())
    for block in list(results["elements"].values()) + [results.get("faithfulness") or {}]:
        cited.update(block.get("figures", []))
    for rel in sorted(cited):
        src = source_root / rel
        if not src.is_file():
            src = source_root / Path(rel).name
        if src.is_file() and src.resolve() != (model_dir / rel).resolve():
            (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, model_dir / rel)
    write_text_atomic(model_dir / CARD_FILE, render_card(model_dir, results))
    return model_dir / CARD_FILE


def check_card(model_dir: str | Path) -> list[str]:
    """Every way the card in ``model_dir`` disagrees with its results, config or weights (empty = OK)."""
    model_dir = Path(model_dir)
    problems: list[str] = []
    for required in (CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, RESULTS_FILE):
        if not (model_dir / required).is_file():
            problems.append(f"{model_dir / required} is missing")
    if problems:
        return problems
    from huggingface_hub import ModelCard

    card_text = (model_dir / CARD_FILE).read_text(encoding="utf-8")
    try:
        # ModelCard.load builds a ModelCardData; huggingface_hub's annotations only say CardData.
        card_data = cast("ModelCardData", ModelCard.load(model_dir / CARD_FILE).data)
    except Exception as err:  # the Hub parser raises several types; report, do not hide
        return [f"{CARD_FILE}: front matter is not readable by huggingface_hub.ModelCard ({err})"]
    try:
        results = read_results(model_dir / RESULTS_FILE)
    except ValueError as err:
        return [str(err)]
    config_doc = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))

    sha = sha256_file(model_dir / WEIGHTS_FILE)
    block = card_data.get("mlmi_zoo", {})
    stated = {"card": block.get("weights_sha256"), "config.json": config_doc.get("weights_sha256"),
              "results.json": results["model"].get("weights_sha256")}
    for where, value in stated.items():
        if value != sha:
            problems.append(f"weights sha256 {sha} differs from the value in {where} ({value})")

    for key in ("license", "library_name", "tags", "datasets", "mlmi_zoo"):
        if not card_data.get(key):
            problems.append(f"front matter field {key!r} is missing or empty")
    if not card_data.eval_results:
        problems.append("front matter field 'model-index' is missing or has no results")
    for key in ("version", "weights_sha256", "input_spec", "label_names", "operating_point"):
        if block.get(key) in (None, "", []):
            problems.append(f"front matter field 'mlmi_zoo.{key}' is missing or empty")
    placeholder = PLACEHOLDERS.search(card_text)
    if placeholder:
        problems.append(f"{CARD_FILE} contains a placeholder: {placeholder.group(0)!r}")

    stated_metrics = {result.metric_type: result.metric_value for result in card_data.eval_results or []}
    for key in TASK_METRICS:
        expected = metric_value(results["task"].get(key))
        if expected is None:
            continue
        got = stated_metrics.get(TASK_TYPE[key])
        if got is None or abs(float(got) - expected) > 1e-6:
            problems.append(f"model-index {TASK_TYPE[key]} is {got}, results.json says {expected:.6f}")

    for rel in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card_text):
        if not (model_dir / rel).is_file():
            problems.append(f"the card cites figure {rel} which is not in {model_dir}")

    expected_text = render_card(model_dir, results)
    if expected_text != card_text:
        got_lines, want_lines = card_text.splitlines(), expected_text.splitlines()
        for i, (got, want) in enumerate(zip(got_lines, want_lines), start=1):
            if got != want:
                problems.append(f"{CARD_FILE} line {i} differs from what results.json generates: "
                                f"card says {got.strip()!r}, expected {want.strip()!r}")
                break
        else:
            problems.append(f"{CARD_FILE} has {len(got_lines)} lines, the generated card has {len(want_lines)}")
    return problems
