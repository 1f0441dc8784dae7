"""Fine-tune a zoo model on a user's own data (which never leaves the machine).

``finetune("protopnet_resnet18.nodule_phantom", "my_data/labels.csv", label_names=("a", "b"))``
loads the model with the new label names (heads whose shape changes are re-initialised and listed
in ``model.load_report.skipped``), freezes the backbone, trains with the family's default stages
(for prototype models this includes the push onto the new training data, so every prototype is
again a real patch of the user's images) and writes a model folder whose ``config.json`` records the
base model (``base_model``: the zoo parent), the pretrained weights the parent's backbone started from
(``base_weights``, inherited, when the parent has them) and a description of the data (checksums,
split sizes — never the data). The parent's intensity transform, with the normalisation its base
weights expect, carries over.

It is a thin layer over the trainer: it writes a :class:`~mlmi_zoo.training.recipe.Recipe` with
``model.init_from`` and ``model.freeze`` set, so a fine-tuning run is resumable and reproducible
like any other (``RUN_DIR/recipe.yaml``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from mlmi_zoo.training.data_spec import DataSpec, build_dataset
from mlmi_zoo.training.recipe import ModelSection, OptimSection, Recipe, StageSection, apply_recipe_overrides

__all__ = ["finetune", "data_spec_from_path"]

log = logging.getLogger(__name__)


def data_spec_from_path(path: str | Path, label_names: Sequence[str] | None = None, val_fraction: float = 0.2,
                        split_seed: int = 0) -> DataSpec:
    """A ``folder_csv`` spec for a CSV file, or for a folder holding exactly one CSV.

    Args:
        path: ``labels.csv`` or its folder (image paths in the CSV are relative to the CSV's folder).
        label_names: class names in index order (default: from the CSV).
        val_fraction: share of rows held out for validation (seeded by ``split_seed``).
        split_seed: seed of the train/val partition.

    Raises:
        FileNotFoundError: no such file or folder, or a folder without a CSV.
        ValueError: a folder with several CSVs.
    """
    path = Path(path)
    if path.is_dir():
        csvs = sorted(path.glob("*.csv"))
        if not csvs:
            raise FileNotFoundError(f"{path} holds no .csv file; pass the CSV describing the images")
        if len(csvs) > 1:
            raise ValueError(f"{path} holds several CSV files {[c.name for c in csvs]}; pass the one to use")
        path = csvs[0]
    elif not path.is_file():
        raise FileNotFoundError(f"data not found: {str(path)!r} (expected a CSV file or a folder with one)")
    params: dict[str, Any] = {"csv": str(path.resolve())}
    if label_names is not None:
        params["label_names"] = list(label_names)
    return DataSpec("folder_csv", params, val_fraction=val_fraction, test_fraction=0.0, split_seed=split_seed)


def finetune(
    name_or_uri: str,
    data: DataSpec | str | Path,
    label_names: Sequence[str] | None = None,
    freeze: Sequence[str] = ("backbone",),
    epochs: int = 3,
    out_dir: str | Path | None = None,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    overrides: Sequence[str] = (),
    resume: bool = False,
    quiet: bool = False,
) -> Path:
    """Fine-tune ``name_or_uri`` on ``data`` and return the new model folder.

    Args:
        name_or_uri: a bundled name, ``hf-hub:ORG/REPO``, ``local-dir:PATH`` or a model folder.
        data: a data spec, or a CSV / folder with one CSV (see :func:`data_spec_from_path`).
        label_names: the new classes in index order (default: those of the data).
        freeze: parameter-name prefixes kept frozen (``()`` trains everything).
        epochs: epochs of each gradient stage of the family's default stages.
        out_dir: run directory (default ``finetune-<model name>``); the model is ``out_dir/final``.
        lr: peak learning rate.
        batch_size: batch size.
        seed: seed of initialisation of the re-initialised heads, data order and split.
        overrides: further recipe ``key=value`` overrides, e.g.
            ``["model.config.intensity.kind=identity"]`` when the new images are not in the
            base model's intensity unit.
        resume: continue an interrupted fine-tuning run in ``out_dir``.
        quiet: no progress bars.

    Returns:
        ``out_dir/final``, loadable with ``mlmi_zoo.load("local-dir:...")``; its config.json has
        ``base_model`` (the uri), the parent's ``base_weights`` (its ImageNet or other pretrained
        origin, when it has one) and ``data`` (the description of the data).
    """
    import mlmi_zoo
    from mlmi_zoo.architectures.blocks.stages import training_for
    from mlmi_zoo.training.trainer import train

    spec = data if isinstance(data, DataSpec) else data_spec_from_path(data, label_names, split_seed=seed)
    if label_names is None:
        label_names = tuple(getattr(build_dataset(spec, "train"), "label_names"))
    base = mlmi_zoo.load(name_or_uri, label_names=tuple(label_names))
    skipped = base.load_report.skipped if base.load_report is not None else ()
    if skipped:
        log.info("fine-tuning %s: re-initialised for the new classes: %s", name_or_uri, ", ".join(skipped))
    adapter = training_for(base)
    stages = tuple(StageSection(name, epochs) for name in adapter.stage_names)
    if "push" in adapter.stage_names:
        log.info("fine-tuning a prototype model: prototypes will be pushed onto the new training data")
    recipe = Recipe(
        model=ModelSection(base.architecture, {"label_names": list(label_names)}, init_from=str(name_or_uri),
                           freeze=tuple(freeze)),
        data=spec,
        optim=OptimSection(name="adamw", lr=lr, batch_size=batch_size, schedule="cosine"),
        stages=stages,
        seed=seed,
        select_metric="val_auroc",
    )
    if overrides:
        recipe = apply_recipe_overrides(recipe, list(overrides))
    run_dir = Path(out_dir) if out_dir is not None else Path(f"finetune-{base.architecture}")
    return train(recipe, run_dir, resume=resume, quiet=quiet)
