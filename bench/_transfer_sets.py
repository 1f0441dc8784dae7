"""The data sets of the transfer benchmark (:mod:`bench_transfer`) and the grid its defaults were chosen with.

:data:`DATASETS` says how each data set is exported (:mod:`_transfer_data`, :mod:`_transfer_bags`), which
zoo models it fine-tunes and with which options; :func:`prepare` exports one under the work folder and
:func:`recipe_parent` trains a parent the zoo does not bundle. :func:`defaults_signature` is what a run's
row is keyed by: the fine-tuning defaults it ran with. :data:`GRID` holds the configurations of
``bench_transfer.py --choose``.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _transfer_data import (EXPORT_VERSION, LIDC_CONCEPTS, MIAS_CONCEPTS, Case, check_adrenal_splits, export_idrid,
                            export_idrid_photographs, export_lidc, export_lidc_volumes, export_medmnist, export_mias,
                            write_user_data)

log = logging.getLogger("bench_transfer")

FAMILIES = ("protopnet", "cbm", "abmil", "additive_mil", "baseline", "bag_baseline")  # the families the data sets fine-tune
TARGET = 0.02  # the interpretable model's test AUROC may be at most this much below the baseline's
N_TRAIN = 600  # training images of each exported data set (a user's small set)


@dataclass(frozen=True)
class DataSet:
    """One data set of the benchmark: how it is exported and which zoo models it fine-tunes.

    Attributes:
        label: the name in the table.
        parent: the suffix of the base models (``protopnet_resnet8.<parent>``, ``baseline_resnet8.<parent>``).
        export: ``(root, n_train, n_test) -> (train, test, val)`` cases.
        volumes: NIfTI volumes instead of PNG images.
        patients: what a patient is in the bootstrap (``"case"`` where the data name none).
        choosing: a data set the defaults were chosen on (``--choose``), not a transfer data set.
        interpretable: the interpretable family compared with the baseline (``<family>_resnet8.<parent>``).
        train: what ``--data`` names, relative to the data set's folder: the class folders
            (``"train"``), or ``"train.csv"`` (the same images with concept columns).
        options: further options of the fine-tune command, per family, the same for every user of
            such data (an 8-bit PNG into a CT model needs ``--intensity refit``; a bottleneck on the
            user's concepts names them; data without nodule diameters drop the baseline's physical head).
        bags: the cases are written as bags of slice features (:mod:`_transfer_bags`), for a MIL model.
        model: the interpretable family's base model, when it is not ``<family>_resnet8.<parent>``.
        baseline_from: the data set whose baseline runs this one is compared with (the same test
            cases as images, paired by case id); its own baseline is then not run.
        no_baseline: a choosing set where only the interpretable family's settings are chosen.
        baseline: the black-box family it is compared with (``bag_baseline`` for bags).
        baseline_recipe: a recipe of the zoo from which the benchmark trains the baseline's parent once
            (``<work>/parents/<recipe>``), where the zoo bundles none; else ``<baseline>_resnet8.<parent>``.
        data_from: the data set whose exported folder this one reads (its ``export`` is then unused).
        size: the spatial size of the exported images, which sets the default step budget
            (:func:`~mlmi_zoo.training.finetune_defaults.default_steps`); None for bags of features.
    """

    label: str
    parent: str
    export: Callable[[Path, int, int | None], tuple[list[Case], list[Case], list[Case]]]
    volumes: bool = False
    patients: str = "case"
    choosing: bool = False
    interpretable: str = "protopnet"
    train: str = "train"
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    bags: bool = False
    model: str | None = None
    baseline_from: str | None = None
    no_baseline: bool = False
    baseline: str = "baseline"
    baseline_recipe: str | None = None
    data_from: str | None = None
    size: tuple[int, ...] | None = None

    @property
    def families(self) -> tuple[str, ...]:
        """The families fine-tuned on this data set (the baseline only when it is neither borrowed nor absent)."""
        return (self.interpretable,) if self.baseline_from or self.no_baseline else (self.interpretable, self.baseline)

    def base_model(self, family: str, work: Path | None = None) -> str:
        """The model ``family`` is fine-tuned from: a zoo model, or the baseline's parent trained from
        :attr:`baseline_recipe` under ``work`` (:func:`recipe_parent`)."""
        if family == self.interpretable and self.model is not None:
            return self.model
        if family == self.baseline and self.baseline_recipe is not None:
            if work is None:
                raise ValueError(f"the {family} parent is trained from {self.baseline_recipe} under a work folder; give it")
            return f"local-dir:{recipe_parent(self.baseline_recipe, work)}"
        return f"{family}_resnet8.{self.parent}"

    @property
    def test(self) -> str:
        """The test cases, relative to the data set's folder: ``test.csv``, or the folder of test bags."""
        return "test" if self.bags else "test.csv"


PLURAL = {"case": "cases", "woman": "women", "photograph": "photographs"}


def _no_val(pair: tuple[list[Case], list[Case]]) -> tuple[list[Case], list[Case], list[Case]]:
    return pair[0], pair[1], []


DATASETS: dict[str, DataSet] = {
    "vessel3d": DataSet(
        "VesselMNIST3D 28³ (aneurysm vs vessel)", "adrenalmnist3d",
        lambda root, n, t: export_medmnist(root, "vesselmnist3d.npz", {0: "vessel", 1: "aneurysm"}, n, t),
        volumes=True, size=(28, 28, 28)),
    "adrenal64": DataSet(
        "AdrenalMNIST3D 64³ (hyperplasia vs normal; parents trained at 28³)", "adrenalmnist3d",
        lambda root, n, t: export_medmnist(root, "adrenalmnist3d_64.npz", {0: "normal", 1: "hyperplasia"}, n, t),
        volumes=True, size=(64, 64, 64)),
    "mias_patch": DataSet(
        "MIAS 64-px crops at 0.4 mm (lesion vs normal tissue)", "pneumoniamnist",
        lambda root, n, t: _no_val(export_mias(root, n, t or 200)), patients="woman", size=(64, 64)),
    "mias_concepts": DataSet(
        "MIAS 64-px crops at 0.4 mm with the radiologists' classes and tissue as concepts", "lidc_nodule",
        lambda root, n, t: _no_val(export_mias(root, n, t or 200)), patients="woman", interpretable="cbm",
        train="train.csv",
        options={"cbm": ("--intensity", "refit", "--concepts", ",".join([*MIAS_CONCEPTS, "tissue:ordinal"])),
                 "baseline": ("--intensity", "refit", "model.config.quantities=[]")}, size=(64, 64)),
    "idrid_ex": DataSet(
        "IDRiD 64-px tiles (hard exudate vs none)", "retinamnist",
        lambda root, n, t: _no_val(export_idrid(root, n, t or 300)), patients="photograph", size=(64, 64)),
    "idrid_rdr256": DataSet(
        "IDRiD photographs at 256 px (referable diabetic retinopathy)", "retinamnist",
        lambda root, n, t: _no_val(export_idrid_photographs(root, n, t)), patients="photograph", size=(256, 256)),
    "adrenal64_bags": DataSet(
        "AdrenalMNIST3D 64³ as bags of axial slices (ImageNet EfficientNet-Lite0 features; baseline: the 3D "
        "black box on the volumes)", "adrenalmnist3d",
        lambda root, n, t: export_medmnist(root, "adrenalmnist3d_64.npz", {0: "normal", 1: "hyperplasia"}, n, t),
        interpretable="abmil", bags=True, model="abmil_features.idrid_rdr", baseline_from="adrenal64"),
    "adrenal64_bags_matched": DataSet(
        "AdrenalMNIST3D 64³ as bags of axial slices (the same bags; baseline: the black box on the bags, "
        "mean and max pooling)", "adrenalmnist3d", lambda root, n, t: ([], [], []), interpretable="abmil", bags=True,
        model="abmil_features.idrid_rdr", data_from="adrenal64_bags", baseline="bag_baseline",
        baseline_recipe="bag_baseline_idrid_rdr.yaml"),
    "adrenal64_bags_additive": DataSet(
        "AdrenalMNIST3D 64³ as bags of axial slices, additive MIL (the same bags; baseline: the black box on the "
        "bags of the row above)", "adrenalmnist3d", lambda root, n, t: ([], [], []), interpretable="additive_mil",
        bags=True, model="additive_mil_features.idrid_rdr", data_from="adrenal64_bags", baseline="bag_baseline",
        baseline_from="adrenal64_bags_matched"),
    "lidc_concepts": DataSet(
        "LIDC-IDRI nodules with the readers' shape ratings as concepts (choosing the bottleneck's mode)",
        "nodule_phantom", lambda root, n, t: export_lidc(n), patients="case", choosing=True, interpretable="cbm",
        train="train.csv", no_baseline=True, size=(64, 64),
        options={"cbm": ("--intensity", "refit", "--concepts",
                         ",".join([*LIDC_CONCEPTS, "sphericity:ordinal", "lobulation:ordinal", "spiculation:ordinal"]))}),
    "lidc_bags": DataSet(
        "LIDC-IDRI nodules at 64³ as bags of axial slices, benign vs malignant (choosing MIL's defaults)",
        "nodule_phantom", lambda root, n, t: export_lidc_volumes(n), choosing=True, interpretable="abmil", bags=True,
        model="abmil_features.idrid_rdr", baseline="bag_baseline", baseline_recipe="bag_baseline_idrid_rdr.yaml"),
    "lidc_bags_additive": DataSet(
        "LIDC-IDRI nodules at 64³ as bags of axial slices, benign vs malignant (choosing the MIL model: additive "
        "MIL on the lidc_bags bags)", "nodule_phantom", lambda root, n, t: ([], [], []), choosing=True,
        interpretable="additive_mil", bags=True, model="additive_mil_features.idrid_rdr", data_from="lidc_bags",
        no_baseline=True),
    "lidc64": DataSet(
        "LIDC-IDRI nodules at 64³, benign vs malignant (choosing the step budget of 64³ volumes)", "adrenalmnist3d",
        lambda root, n, t: export_lidc_volumes(n), volumes=True, choosing=True, size=(64, 64, 64)),
    "pneumonia_rgb": DataSet(
        "PneumoniaMNIST as RGB (choosing)", "retinamnist",
        lambda root, n, t: export_medmnist(root, "pneumoniamnist.npz", {0: "normal", 1: "pneumonia"}, n, t,
                                           channels=3, with_val=True), choosing=True, size=(28, 28)),
    "retina_grey": DataSet(
        "RetinaMNIST grade 0 vs >= 1, greyscale (choosing)", "pneumoniamnist",
        lambda root, n, t: export_medmnist(root, "retinamnist.npz", {0: "grade0", 1: "dr", 2: "dr", 3: "dr", 4: "dr"},
                                           n, t, channels=1, with_val=True), choosing=True, size=(28, 28)),
}


def recipe_parent(recipe: str, work: Path) -> Path:
    """The final model folder of the zoo's training recipe ``recipe``, trained once into ``work/parents/<stem>``
    (the data it names are read from ``$MLMI_ZOO_DATA``; a run interrupted before its ``final`` starts again)."""
    from mlmi_zoo.training.cli import main

    run_dir = work / "parents" / Path(recipe).stem
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        if run_dir.exists():
            shutil.rmtree(run_dir)
        path = Path(__file__).resolve().parents[1] / "src" / "mlmi_zoo" / "training" / "recipes" / recipe
        argv = ["train", str(path), "--run-dir", str(run_dir)]
        log.info("training the parent %s: mlmi-zoo %s", recipe, " ".join(argv))
        if main(argv) != 0:
            raise RuntimeError(f"mlmi-zoo {' '.join(argv)} failed")
    return final


def prepare(name: str, root: Path, work: Path, n_train: int, n_test: int | None) -> Path:
    """Export data set ``name`` to ``work/data/<name>`` unless an export of this version and size is there.

    Returns:
        the data set's folder (``train/``, ``test.csv``, ``meta.json``).
    """
    if DATASETS[name].data_from is not None:
        return prepare(DATASETS[name].data_from, root, work, n_train, n_test)
    folder = work / "data" / name
    wanted = {"export_version": EXPORT_VERSION, "n_train": n_train, "n_test": n_test}
    meta = folder / "meta.json"
    if meta.is_file():
        doc = json.loads(meta.read_text(encoding="utf-8"))
        if all(doc.get(k) == v for k, v in wanted.items()):
            return folder
    log.info("%s: exporting to %s", name, folder)
    spec = DATASETS[name]
    train, test, val = spec.export(root, n_train, n_test)
    extra: dict[str, Any] = {"dataset": name, "source": spec.label, **wanted}
    if name == "adrenal64":
        extra["splits_against_28"] = check_adrenal_splits(root)
    if spec.bags:
        from _transfer_bags import write_slice_bags

        counts = {split: {label: sum(c.label == label for c in cases) for label in sorted({c.label for c in cases})}
                  for split, cases in (("train", train), ("test", test), ("val", val)) if cases}
        return write_slice_bags(folder, train, test, meta={**extra, "counts": counts}, val=val)
    return write_user_data(folder, train, test, val, volumes=spec.volumes, meta=extra)


def defaults_signature(family: str, dataset: str | None = None) -> dict[str, Any]:
    """The fine-tuning defaults a run of ``family`` on ``dataset`` used (a change makes its runs due again):
    the step budget for the data set's image size (None: images up to 2**17 voxels), the family's training
    settings of :data:`~mlmi_zoo.training.finetune_defaults.DEFAULT_TRAINING` and model configuration of
    :data:`~mlmi_zoo.training.finetune_defaults.DEFAULT_CONFIG`, where it has any."""
    from mlmi_zoo.training import finetune_defaults

    steps = finetune_defaults.default_steps(DATASETS[dataset].size if dataset else None)
    signature: dict[str, Any] = {"freeze": list(finetune_defaults.DEFAULT_FREEZE), "steps": steps,
                                 "patience": finetune_defaults.DEFAULT_PATIENCE, "export_version": EXPORT_VERSION}
    training = {k: v for k, v in finetune_defaults.DEFAULT_TRAINING.get(family, {}).items() if _has_setting(family, k)}
    config = finetune_defaults.DEFAULT_CONFIG.get(family, {})
    return {**signature, **({"training": training} if training else {}), **({"config": config} if config else {})}


def _current(row: dict[str, Any]) -> bool:
    """Whether a run or paired row was made with today's defaults (a paired row: its interpretable family's)."""
    family = row.get("family") or DATASETS[row["dataset"]].interpretable
    return row["defaults"] == defaults_signature(family, row["dataset"])


def _key(row: dict[str, Any]) -> str:
    return json.dumps([row["kind"], row["dataset"], row.get("family"), row.get("config"), row.get("seed"),
                       row["defaults"]], sort_keys=True)


def _parent_sha256(model: str) -> str | None:
    """The weights sha256 of the bundled parent ``model`` (None if it is not bundled)."""
    from mlmi_zoo.registry import bundled_dir, read_config

    folder = bundled_dir() / model
    return read_config(folder)["weights_sha256"] if (folder / "config.json").is_file() else None


# ------------------------------------------------------------------------------------------------
# the grid of the defaults (choosing data only)
# ------------------------------------------------------------------------------------------------
# ``--freeze`` options of the stem of the zoo's ResNets: the first convolution and its norm.
_STEM = ["--freeze", "backbone.body.0", "--freeze", "backbone.body.1"]


def _has_last_layer(family: str) -> bool:
    """Whether the family's training has a ``last_layer`` stage (the old command set its passes too)."""
    from mlmi_zoo.families import families

    return "last_layer" in families()[family].training.stage_names


def _has_setting(family: str, key: str) -> bool:
    """Whether the family's training settings have ``key`` (the override would be refused otherwise)."""
    import dataclasses

    from mlmi_zoo.families import families

    return key in {f.name for f in dataclasses.fields(families()[family].training.settings_class)}


def _has_config(family: str, key: str) -> bool:
    """Whether the family's model configuration has ``key``."""
    import dataclasses

    from mlmi_zoo.families import families

    return key in {f.name for f in dataclasses.fields(families()[family].model_class.config_class)}


_UNCALIBRATED = ("model.config.calibrated_concepts=false",)
_CALIBRATED = ("model.config.calibrated_concepts=true",)
# name -> extra CLI options; one factor at a time around "centre". "previous" is the old default command.
GRID: dict[str, Callable[[str], list[str]]] = {
    "previous": lambda family: ["--freeze", "backbone", "--epochs", "3", "--lr", "0.001", "--patience", "0"]
    + (["stages.3.epochs=3", "stages.3.lr=0.001"] if _has_last_layer(family) else []),
    "centre": lambda family: ["--freeze", "none", "--steps", "1000", "--patience", "5"],
    "steps300": lambda family: ["--freeze", "none", "--steps", "300", "--patience", "5"],
    "steps3000": lambda family: ["--freeze", "none", "--steps", "3000", "--patience", "5"],
    "no_early_stop": lambda family: ["--freeze", "none", "--steps", "1000", "--patience", "0"],
    "patience10": lambda family: ["--freeze", "none", "--steps", "1000", "--patience", "10"],
    "freeze_stem": lambda family: [*_STEM, "--steps", "1000", "--patience", "5"],
    "freeze_backbone": lambda family: ["--freeze", "backbone", "--steps", "1000", "--patience", "5"],
    "lr3e-4": lambda family: ["--freeze", "none", "--steps", "1000", "--patience", "5", "--lr", "0.0003"],
    # second round: the factors that helped, together
    "steps300_no_early_stop": lambda family: ["--freeze", "none", "--steps", "300", "--patience", "0"],
    "steps500_no_early_stop": lambda family: ["--freeze", "none", "--steps", "500", "--patience", "0"],
    "lr3e-4_no_early_stop": lambda family: ["--freeze", "none", "--steps", "1000", "--patience", "0", "--lr", "0.0003"],
    "steps300_lr3e-4": lambda family: ["--freeze", "none", "--steps", "300", "--patience", "5", "--lr", "0.0003"],
    # third round: one factor at a time around the best so far, no_early_stop
    "steps3000_no_early_stop": lambda family: ["--freeze", "none", "--steps", "3000", "--patience", "0"],
    "freeze_stem_no_early_stop": lambda family: [*_STEM, "--steps", "1000", "--patience", "0"],
    # fourth round: ProtoPNet's prototypes learnt on the cells push may use (rows above ran without it)
    "push_cells": lambda family: ["--freeze", "none", "--steps", "1000", "--patience", "0"]
    + (["training.cluster_on_push_cells=true"] if _has_setting(family, "cluster_on_push_cells") else []),
    # a concept bottleneck on the user's concepts: Koh et al.'s three training modes, under the defaults above,
    # with the bottleneck's class-balanced scores and no random interventions (as these rows ran before either
    # setting existed)
    "cbm_independent": lambda family: ["training.mode=independent", *_UNCALIBRATED],
    "cbm_sequential": lambda family: ["training.mode=sequential", "training.intervention_rate=0", *_UNCALIBRATED],
    "cbm_joint": lambda family: ["training.mode=joint", "training.intervention_rate=0", *_UNCALIBRATED],
    # random interventions while the label head trains, at Espinosa Zarlenga et al.'s rate (not tuned here)
    "cbm_sequential_randint": lambda family: ["training.mode=sequential", "training.intervention_rate=0.25",
                                              *_UNCALIBRATED],
    "cbm_joint_randint": lambda family: ["training.mode=joint", "training.intervention_rate=0.25", *_UNCALIBRATED],
    # the bottleneck holding calibrated probabilities (model.config.calibrated_concepts)
    "cbm_calibrated_independent": lambda family: ["training.mode=independent", *_CALIBRATED],
    "cbm_calibrated_sequential": lambda family: ["training.mode=sequential", "training.intervention_rate=0",
                                                 *_CALIBRATED],
    "cbm_calibrated_sequential_randint": lambda family: ["training.mode=sequential", "training.intervention_rate=0.25",
                                                         *_CALIBRATED],
    # attention MIL on bags (lidc_bags): the defaults above, and one factor at a time (the black box on bags has
    # neither MIL setting, so its cells of those two repeat the defaults)
    "mil_defaults": lambda family: [],
    "mil_top_instance_masking": lambda family: (["model.config.top_instance_masking=0.5"]
                                                if _has_config(family, "top_instance_masking") else []),
    "mil_bag_normalise": lambda family: ["model.config.bag_normalise=true"] if _has_config(family, "bag_normalise") else [],
    "mil_steps300": lambda family: ["--steps", "300"],
    "mil_lr1e-4": lambda family: ["--lr", "0.0001"],
}
CHOOSE_SEEDS = (0, 1, 2)
# choosing sets whose grid is a table of its own (a question of their own, not the 2D defaults' criterion)
SEPARATE_GRIDS = ("lidc64",)  # seeds of the validation split carved from the training folder, data order and new heads
