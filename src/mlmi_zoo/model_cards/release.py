"""Build the bundled release: train each model from its recipe, evaluate it, generate its card.

    python -m mlmi_zoo.model_cards.release                 # every model, in order
    python -m mlmi_zoo.model_cards.release NAME [NAME ...] # some of them

For each model: ``train`` (the shared trainer, from ``training/recipes/<recipe>.yaml``) into
``runs/release/<name>``; copy the final ``save_pretrained`` folder and the recipe into
``model_cards/<name>/``; ``evaluate`` it on the held-out test split (with its black-box baseline, when
there is one, on the same split); write the card from the results; store two test cases under
``samples/`` for ``mlmi-zoo demo``. Baselines come before the models that cite them.
"""
from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("mlmi_zoo.release")

PACKAGE = Path(__file__).resolve().parents[1]
RECIPES = PACKAGE / "training" / "recipes"


@dataclass(frozen=True)
class Release:
    name: str  # family_backbone.tag
    recipe: str  # file name in src/mlmi_zoo/training/recipes
    baseline: str | None = None  # bundled name of the black-box baseline on the same data
    localization_data: str | None = None  # an annotated set scoring localization where the test split has no masks
    # demo samples keep only this square (mm) around the finding, the rest blanked: for data whose licence lets a
    # release carry only a few sample crops (mini-MIAS)
    sample_crop_mm: float | None = None
    samples: int = 2  # demo cases stored under samples/ (one for a black box whose photographs are large)
    # an init ("imagenet"): the frozen backbone tensors equal to that start are left out of the bundled weights
    # file and rebuilt from it on load (base_tensors_from of save_pretrained), to keep the release within its budget
    base_tensors_from: str | None = None
    deletion_cases: int | None = None  # fewer deletion-curve cases than the default 64 (large photographs)


RELEASES = (
    Release("baseline_resnet8.lidc_nodule", "baseline_lidc_nodule.yaml"),
    Release("protopnet_resnet8.lidc_nodule", "protopnet_lidc_nodule.yaml", "baseline_resnet8.lidc_nodule"),
    Release("cbm_resnet8.lidc_nodule", "cbm_lidc_nodule.yaml", "baseline_resnet8.lidc_nodule"),
    Release("cbm_resnet8.nodule_phantom", "cbm_nodule_phantom_release.yaml"),
    Release("protopnet_resnet8.nodule_phantom", "protopnet_nodule_phantom.yaml"),
    Release("additive_mil_features.tilebag", "additive_mil_tilebag_release.yaml"),
    Release("abmil_features.tilebag", "abmil_tilebag_release.yaml"),
    Release("baseline_resnet8.pneumoniamnist", "baseline_pneumoniamnist.yaml"),
    Release("protopnet_resnet8.pneumoniamnist", "protopnet_pneumoniamnist.yaml", "baseline_resnet8.pneumoniamnist"),
    Release("baseline_resnet8.retinamnist", "baseline_retinamnist.yaml"),
    Release("protopnet_resnet8.retinamnist", "protopnet_retinamnist.yaml", "baseline_resnet8.retinamnist"),
    Release("baseline_resnet8.adrenalmnist3d", "baseline_adrenalmnist3d.yaml"),
    Release("protopnet_resnet8.adrenalmnist3d", "protopnet_adrenalmnist3d.yaml", "baseline_resnet8.adrenalmnist3d"),
    Release("baseline_resnet8.lidc_nodule3d", "baseline_lidc_nodule3d.yaml"),
    Release("protopnet_resnet8.lidc_nodule3d", "protopnet_lidc_nodule3d.yaml", "baseline_resnet8.lidc_nodule3d"),
    # IDRiD: a 640-px photograph is 0.8 MB as a demo sample; a black box and the concept bottleneck show one
    Release("baseline_tf_efficientnet_lite0.idrid_rdr", "baseline_lite0_idrid_rdr_release.yaml", samples=1),
    Release("baseline_tf_efficientnet_lite0.idrid_dme", "baseline_lite0_idrid_dme.yaml", samples=1),
    Release("measurement_tf_efficientnet_lite0.idrid_dme", "measurement_lite0_idrid_dme.yaml",
            "baseline_tf_efficientnet_lite0.idrid_dme", localization_data="idrid:dataset=segmentation,size=640,union=EX"),
    Release("abmil_features.idrid_dme", "abmil_idrid_dme.yaml", "baseline_tf_efficientnet_lite0.idrid_dme",
            localization_data="idrid_bags:dataset=segmentation,size=1072,tile_px=64,init=imagenet,lesions=EX"),
    Release("cbm_tf_efficientnet_lite0.idrid_rdr", "cbm_lite0_idrid_rdr.yaml", "baseline_tf_efficientnet_lite0.idrid_rdr",
            localization_data="idrid:dataset=segmentation,size=640,union=MA+HE+EX+SE", samples=1),
    Release("protopnet_tf_efficientnet_lite0.idrid_rdr", "protopnet_lite0_idrid_rdr.yaml",
            "baseline_tf_efficientnet_lite0.idrid_rdr",
            localization_data="idrid:dataset=segmentation,size=1072,union=MA+HE+EX+SE", samples=1,
            base_tensors_from="imagenet", deletion_cases=16),
    Release("abmil_features.idrid_rdr", "abmil_idrid_rdr.yaml", "baseline_tf_efficientnet_lite0.idrid_rdr",
            localization_data="idrid_bags:dataset=segmentation,size=1072,tile_px=64,init=imagenet"),
    Release("additive_mil_features.idrid_rdr", "additive_mil_idrid_rdr.yaml", "baseline_tf_efficientnet_lite0.idrid_rdr",
            localization_data="idrid_bags:dataset=segmentation,size=1072,tile_px=64,init=imagenet"),
    Release("baseline_tf_efficientnet_lite0.idrid_grade", "baseline_lite0_idrid_grade.yaml", samples=1),
    Release("protopnet_tf_efficientnet_lite0.idrid_grade", "protopnet_lite0_idrid_grade.yaml",
            "baseline_tf_efficientnet_lite0.idrid_grade",
            localization_data="idrid:dataset=segmentation,size=1072,union=MA+HE+EX+SE", samples=1,
            base_tensors_from="imagenet", deletion_cases=16),
    Release("cbm_tf_efficientnet_lite0.idrid_grade", "cbm_lite0_idrid_grade.yaml", "baseline_tf_efficientnet_lite0.idrid_grade",
            localization_data="idrid:dataset=segmentation,size=640,union=MA+HE+EX+SE", samples=1,
            base_tensors_from="imagenet"),
    Release("abmil_features.idrid_grade", "abmil_idrid_grade.yaml", "baseline_tf_efficientnet_lite0.idrid_grade",
            localization_data="idrid_bags:dataset=segmentation,size=1072,tile_px=64,init=imagenet"),
    Release("additive_mil_features.idrid_grade", "additive_mil_idrid_grade.yaml",
            "baseline_tf_efficientnet_lite0.idrid_grade",
            localization_data="idrid_bags:dataset=segmentation,size=1072,tile_px=64,init=imagenet"),
    # mini-MIAS: research use only; a release carries no film beyond a few sample crops
    Release("baseline_tf_efficientnet_lite0.mias", "baseline_lite0_mias_release.yaml", sample_crop_mm=60.0),
    Release("cbm_tf_efficientnet_lite0.mias", "cbm_lite0_mias.yaml", "baseline_tf_efficientnet_lite0.mias",
            sample_crop_mm=60.0),
    Release("abmil_features.mias", "abmil_mias.yaml", "baseline_tf_efficientnet_lite0.mias", sample_crop_mm=60.0),
    Release("protopnet_tf_efficientnet_lite0.mias", "protopnet_lite0_mias.yaml", "baseline_tf_efficientnet_lite0.mias",
            sample_crop_mm=60.0),
)


def _crop_sample(sample: dict[str, Any], crop_mm: float) -> dict[str, Any]:
    """``sample`` with every image-sized tensor blanked outside a ``crop_mm`` square around its finding.

    The square is centred on the lesion mask's centroid, else on the breast (or field-of-view) mask's,
    else on the image centre. For data whose licence lets a release carry only a few sample crops (mini-MIAS):
    the model still runs on the full canvas, but only the crop holds the original pixels.
    """
    from mlmi_zoo.evaluation.figures import window_around

    image = sample["image"]
    hw = (int(image.shape[-2]), int(image.shape[-1]))
    spacing = sample.get("spacing")
    px = [max(1, round(crop_mm / float(s))) for s in (spacing if spacing is not None else (1.0, 1.0))]
    centre = [n // 2 for n in hw]
    for key in ("mask", "breast", "fov"):
        m = sample.get(key)
        if isinstance(m, torch.Tensor) and m.shape[-2:] == hw and bool(m.any()):
            rows, cols = torch.nonzero(m.reshape(-1, *hw).any(0), as_tuple=True)
            centre = [int(rows.float().mean()), int(cols.float().mean())]
            break
    keep = torch.zeros(hw, dtype=torch.bool)
    keep[window_around(hw, (centre[0], centre[1]), (px[0], px[1]))] = True
    out = dict(sample)
    for key, value in sample.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and tuple(value.shape[-2:]) == hw:
            out[key] = value * keep if value.dtype != torch.bool else value & keep
    return out


def _bag_photograph(dataset: Any, i: int) -> dict[str, Any]:
    """Bag ``i``'s photograph with the side of one tile on it and, where the data set has them, the annotations
    drawn on it (a mammogram's circles, its breast, the spacing a licence crop needs)."""
    out: dict[str, Any] = {}
    out["image"], out["tile_px_on_image"] = dataset.photograph(i)
    if callable(getattr(dataset, "photograph_annotations", None)):
        out.update(dataset.photograph_annotations(i))
    return out


def _store_samples(folder: Path, recipe_path: Path, n: int = 2, crop_mm: float | None = None) -> None:
    """Save ``n`` test cases (raw tensors + ground truth) for the demo, cropped when ``crop_mm`` is given."""
    from mlmi_zoo.model_cards.demo import save_samples
    from mlmi_zoo.training.data_spec import build_dataset
    from mlmi_zoo.training.datasets.catalog import source_for
    from mlmi_zoo.training.recipe import load_recipe

    recipe = load_recipe(recipe_path, [])
    spec = recipe.data
    if spec.cache:  # rendering two cases is cheaper than caching the whole split
        from dataclasses import replace

        spec = replace(spec, cache=False)
    dataset = build_dataset(spec, "test")
    if not isinstance(dataset, Sized):
        raise TypeError(f"bundled samples are drawn from a map-style data set with a length, got {type(dataset).__name__}")
    source = source_for({"kind": spec.kind, "params": spec.params})
    shutil.rmtree(folder / "samples", ignore_errors=True)
    for i in range(min(n, len(dataset))):
        sample = dataset[i]
        if "feats" in sample and callable(getattr(dataset, "photograph", None)):  # a bag: its tiles on its photograph
            sample = {**sample, **_bag_photograph(dataset, i)}
        if crop_mm is not None:
            sample = _crop_sample(sample, crop_mm)
        tensors = {k: v for k, v in sample.items() if isinstance(v, torch.Tensor) and k != "index"}
        names = getattr(dataset, "label_names", None)
        label = int(sample["label"])
        meta = {"source": source.name, "license": source.license, "split": "test", "case": int(sample.get("index", i)),
                "label": names[label] if names else label}
        for key, value in sample.get("measurements", {}).items():
            if math.isfinite(float(value)):  # a graded photograph has no lesion area: nothing to show
                meta[f"true {key}"] = round(float(value), 3)
        if crop_mm is not None:
            meta["crop"] = f"only a {crop_mm:g} mm square around the finding is kept; the rest of the image is blanked"
        if "tile_px_on_image" in sample:
            meta["tile_px_on_image"] = sample["tile_px_on_image"]
        save_samples(folder, f"test_case_{i}", tensors, meta)


def build(release: Release, runs: Path, cards: Path) -> dict:
    """Train, evaluate and card one model; returns its results document."""
    from mlmi_zoo.training.recipe import load_recipe
    from mlmi_zoo.training.trainer import train

    recipe_path = RECIPES / release.recipe
    run_dir = runs / release.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    final = train(load_recipe(recipe_path, []), run_dir, quiet=True)
    log.info("%s: trained in %.0f s", release.name, time.perf_counter() - start)
    folder = cards / release.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    place_weights(final, folder, release.base_tensors_from)
    shutil.copyfile(recipe_path, folder / "recipe.yaml")
    return evaluate_and_card(release, cards)


SAVED_FIELDS = ("architecture", "mlmi_zoo_version", "weights_file", "weights_sha256", "config_version", "config",
                "metadata", "base_weights", "base_model", "weights_from_base")  # written by save_pretrained itself


def place_weights(final: Path, folder: Path, base_tensors_from: str | None = None) -> None:
    """Put a run's final ``config.json`` and ``model.safetensors`` into a bundled folder: copied, or,
    with ``base_tensors_from``, saved again without the tensors equal to that start (every other
    field of config.json kept)."""
    import json

    import mlmi_zoo

    folder.mkdir(parents=True, exist_ok=True)
    if base_tensors_from is None:
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(final / name, folder / name)
        return
    doc = json.loads((final / "config.json").read_text())
    model = mlmi_zoo.load(f"local-dir:{final}")
    model.save_pretrained(folder, extra={k: v for k, v in doc.items() if k not in SAVED_FIELDS},
                          base_tensors_from=base_tensors_from)


def evaluate_and_card(release: Release, cards: Path) -> dict:
    """Evaluate a bundled model folder on its test split, write its card and demo samples."""
    from mlmi_zoo.evaluation import evaluate
    from mlmi_zoo.evaluation._common import EvaluationLimits
    from mlmi_zoo.model_cards.card import write_card

    folder = cards / release.name
    recipe_path = RECIPES / release.recipe
    if not (folder / "recipe.yaml").is_file():  # a folder of weights placed by hand ships its recipe too
        shutil.copyfile(recipe_path, folder / "recipe.yaml")
    shutil.rmtree(folder / "figures", ignore_errors=True)
    baseline = release.baseline if release.baseline and (cards / release.baseline / "model.safetensors").is_file() else None
    command = (f"mlmi-zoo evaluate {release.name} --split test --out src/mlmi_zoo/model_cards/{release.name}/results.json "
               f"--figures src/mlmi_zoo/model_cards/{release.name}/figures" + (f" --baseline {baseline}" if baseline else "")
               + (f" --localization-data {release.localization_data}" if release.localization_data else "")
               + (f" --deletion-cases {release.deletion_cases}" if release.deletion_cases else ""))
    limits = EvaluationLimits() if release.deletion_cases is None else EvaluationLimits(deletion_cases=release.deletion_cases)
    results = evaluate(release.name, None, split="test", out=folder / "results.json", figures_dir=folder / "figures",
                       baseline_uri=baseline, command=command, localization_data=release.localization_data,
                       limits=limits)
    write_card(folder, folder / "results.json", folder / "figures")
    _store_samples(folder, recipe_path, n=release.samples, crop_mm=release.sample_crop_mm)
    log.info("%s: test AUROC %.4f", release.name, results["task"]["auroc"]["estimate"])
    return results


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None  # the module docstring's first line describes the command
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="bundled names to build (default: all, in order)")
    p.add_argument("--runs", type=Path, default=Path("runs") / "release")
    p.add_argument("--evaluate-only", action="store_true", help="re-evaluate and re-card existing model folders")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    known = {r.name: r for r in RELEASES}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        p.error(f"unknown release name(s) {unknown}; known: {sorted(known)}")
    todo = [known[n] for n in args.names] if args.names else list(RELEASES)
    cards = Path(__file__).resolve().parent
    for release in todo:
        if args.evaluate_only:
            evaluate_and_card(release, cards)
        else:
            build(release, args.runs, cards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
