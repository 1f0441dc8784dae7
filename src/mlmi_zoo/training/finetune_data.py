"""The user's own data for fine-tuning and evaluation, read into data specs.

:mod:`mlmi_zoo.training.finetune` plans a run on these: a CSV, a folder holding one CSV, a folder
of class sub-folders or a folder of bags becomes a :class:`~mlmi_zoo.training.data_spec.DataSpec`
(:func:`data_spec_from_path`, :func:`bag_spec_from_path`, :func:`evaluation_data_spec` for a user's
test cases), with the columns the base model reads (spacing, the measurements of a physical head,
a bottleneck's concepts or the user's own, masks, patients); bags are checked against the base
model here (:func:`_bag_problems`). The checks of images, labels and physical heads are
:mod:`mlmi_zoo.training.finetune_checks`; each returns every problem with its fix, so that a run is
refused before its first epoch instead of failing after it.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from mlmi_zoo.architectures.mil.config import without_area_head
from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.training.data_spec import DataSpec, build_dataset

__all__ = ["FinetuneDataError", "data_spec_from_path", "bag_spec_from_path", "evaluation_data_spec", "INTENSITY_MODES",
           "SAMPLED_CASES"]

log = logging.getLogger(__name__)

IntensityMode = Literal["check", "refit", "keep"]
INTENSITY_MODES: tuple[str, ...] = ("check", "refit", "keep")

SAMPLED_CASES = 32  # training images read by the image and intensity checks (evenly spread)
_REFIT_PERCENTILES = (0.5, 99.5)
_MIN_SPREAD = 0.01  # median per-image std after the transform, as a share of its [0, 1] range
_PIXELS_PER_IMAGE = 1 << 16  # pixels of each sampled image that the intensity window is fitted on
_LISTING = "image_folder.csv"


class FinetuneDataError(ValueError):
    """The data cannot train (or test) the model as asked; the message lists each problem with its fix."""


# ---------------------------------------------------------------------------------------------
# data specs
# ---------------------------------------------------------------------------------------------
def _csv_of(path: Path, listing: Path | None) -> tuple[Path, Path | None]:
    """The CSV to read for ``path`` and the folder its image paths are relative to (None: the CSV's folder)."""
    from mlmi_zoo.training.datasets.user_files import write_image_folder_csv

    if path.is_file():
        return path, None
    if not path.is_dir():
        raise FileNotFoundError(f"data not found: {str(path)!r} (expected a CSV file, a folder with one CSV, "
                                "or a folder with one sub-folder per class)")
    csvs = sorted(path.glob("*.csv"))
    if len(csvs) > 1:
        raise ValueError(f"{path} holds several CSV files {[c.name for c in csvs]}; pass the one to use")
    if csvs:
        return csvs[0], None
    if listing is None:
        raise ValueError(f"{path} has the class-folder layout; pass listing=PATH, where its listing CSV is written")
    write_image_folder_csv(path, listing)
    log.info("%s: class folders listed into %s", path, listing)
    return listing, path


def data_spec_from_path(path: str | Path, label_names: Sequence[str] | None = None, val_fraction: float = 0.2,
                        split_seed: int = 0, columns: Mapping[str, Any] | None = None,
                        listing: str | Path | None = None) -> DataSpec:
    """A ``folder_csv`` spec for a CSV, a folder holding one CSV, or a folder of class sub-folders.

    Args:
        path: ``cases.csv``, its folder (image paths in the CSV are relative to the CSV's folder), or
            ``DIR`` laid out as ``DIR/<class>/<image>`` (listed into ``listing``).
        label_names: class names in index order (default: the labels the data hold).
        val_fraction: share of cases held out for validation (seeded by ``split_seed``).
        split_seed: seed of the train/val partition.
        columns: further loader arguments (``spacing_columns``, ``measurement_columns``,
            ``concept_columns``, ``mask_column``, ``channels``).
        listing: where the listing CSV of a class-folder layout is written.

    Returns:
        the spec; its single CSV is split into train and val (no test split).

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: a folder with several CSVs, or class folders without ``listing``.
    """
    csv, image_dir = _csv_of(Path(path), Path(listing) if listing is not None else None)
    params: dict[str, Any] = {"csv": str(csv.resolve()), **dict(columns or {})}
    if image_dir is not None:
        params["image_dir"] = str(image_dir.resolve())
    if label_names is not None:
        params["label_names"] = list(label_names)
    return DataSpec("folder_csv", params, val_fraction=val_fraction, test_fraction=0.0, split_seed=split_seed)


def _columns_for(model: InterpretableModel, header: Sequence[str], image_column: str, label_column: str,
                 require: bool, concepts: Sequence[str] | None = None,
                 quantities: Sequence[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Loader arguments for the columns ``model`` reads, and the problems (with fixes) when ``require``.

    Spacing, a ``mask`` column and the columns the model predicts (physical-head quantities,
    bottleneck concepts; ``concepts``: the user's own concept columns instead of the model's;
    ``quantities``: the physical head's quantities as overridden, ``[]`` without a head) are passed
    when present; with ``require``, a physical head without its measurement columns or
    without spacing, and a bottleneck without its concept columns, are problems.
    """
    from mlmi_zoo.training.datasets.user_files import has_unit_suffix, spacing_columns_in

    problems: list[str] = []
    try:
        spacing = spacing_columns_in(header)
    except ValueError as err:
        spacing, problems = (), [str(err)]
    quantities = [q.name for q in model.config.quantities] if quantities is None else list(quantities)
    if concepts is None:
        concepts = [c.name for c in getattr(model.config, "concepts", ())]
    wanted = list(dict.fromkeys(quantities + list(concepts)))
    found = [n for n in wanted if n in header]
    columns: dict[str, Any] = {
        "spacing_columns": list(spacing),
        "measurement_columns": [n for n in found if has_unit_suffix(n)],
        "concept_columns": [n for n in found if not has_unit_suffix(n)],
    }
    columns = {k: v for k, v in columns.items() if v}
    if "mask" in header:
        columns["mask_column"] = "mask"
    if "patient" in header:  # a patient's images stay together in the split; intervals resample patients
        columns["patient_column"] = "patient"
    if image_column != "image":
        columns["image_column"] = image_column
    if label_column != "label":
        columns["label_column"] = label_column
    used = {image_column, label_column, "mask", "patient", *spacing, *found}
    unused = [h for h in header if h not in used]
    if unused:
        log.info("columns not used by %s: %s", model.architecture, unused)
    if not require:
        return columns, problems
    for name in wanted:
        if name in header:
            continue
        stem = name.rsplit("_", 1)[0] if has_unit_suffix(name) else name
        near = [h for h in header if h != name and h.rsplit("_", 1)[0] == stem and has_unit_suffix(h)]
        hint = f" (found {near}: give the values in the unit of the name, e.g. convert to {name!r})" if near else ""
        role = "its physical head predicts" if name in quantities else "its concept bottleneck predicts"
        own = (" or drop the physical head: model.config.quantities=[]" if name in quantities else
               " or name your own concept columns with --concepts COL[:KIND],... (concepts=), which replaces "
               "the bottleneck")
        problems.append(f"the base model needs a column {name!r} ({role} it; blank cells = unknown){hint}{own}; "
                        f"the CSV has {list(header)}")
    if quantities and not spacing:
        problems.append(f"the base model measures {quantities} in physical units and needs each image's pixel "
                        "spacing: add a column 'spacing_mm' holding e.g. '0.7x0.7' (mm per axis; or one column per "
                        "axis, 'spacing_y_mm' and 'spacing_x_mm'); DICOM/NIfTI images carry it in their header; or "
                        "drop the physical head: model.config.quantities=[]")
    return columns, problems


def _overridden_quantities(overrides: Sequence[str]) -> list[str] | None:
    """The quantity names that a ``model.config.quantities=...`` override leaves (None: no such override)."""
    import yaml

    for word in reversed(list(overrides)):
        key, _, text = word.partition("=")
        if key.strip() == "model.config.quantities":
            value = yaml.safe_load(text) or []
            if not isinstance(value, list):
                raise ValueError(f"{word!r}: model.config.quantities takes a list (e.g. [] to drop the physical head)")
            return [str(q["name"]) if isinstance(q, dict) else str(q) for q in value]
    return None


def bag_spec_from_path(path: str | Path, label_names: Sequence[str] | None = None, val_fraction: float = 0.2,
                       split_seed: int = 0) -> DataSpec:
    """A ``cached_bags`` spec for a folder of bags, for a MIL model.

    The folder holds one ``*.safetensors`` file per bag, written by
    :func:`~mlmi_zoo.training.datasets.feature_cache.cache_features` (``feats`` (N, D) instance features and
    ``coords`` (N, 2); the file name without the suffix is the bag's id), and one CSV with the columns
    ``slide_id`` and ``label`` (:class:`~mlmi_zoo.training.datasets.slides.CachedBagDataset`). Training and
    validation bags are split by a permutation seeded with ``split_seed`` (``val_fraction`` held out).

    Raises:
        FileNotFoundError: no such folder.
        FinetuneDataError: no bag file, or not exactly one CSV of labels.
    """
    from mlmi_zoo.training.datasets.slides import CACHE_SUFFIX

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: a MIL model fine-tunes on a folder of bags (*{CACHE_SUFFIX} files and one "
                                "CSV with the columns slide_id,label)")
    problems = []
    if not any(path.glob(f"*{CACHE_SUFFIX}")):
        problems.append(f"{path} holds no *{CACHE_SUFFIX} bag file (one per bag, with its instance features 'feats')")
    csvs = sorted(path.glob("*.csv"))
    if len(csvs) != 1:
        problems.append(f"{path} holds {len(csvs)} CSV files ({[c.name for c in csvs]}); put exactly one there, "
                        "with the columns slide_id (a bag file's name without the suffix) and label")
    if problems:
        raise FinetuneDataError(_report(f"cannot read bags from {path}", problems))
    params: dict[str, Any] = {"dir": str(path), "labels": str(csvs[0])}
    if label_names is not None:
        params["label_names"] = list(label_names)
    return DataSpec("cached_bags", params, val_fraction=val_fraction, split_seed=split_seed)


def _bag_evaluation_spec(model: InterpretableModel, model_uri: str, path: Path) -> DataSpec:
    """A ``cached_bags`` spec whose ``test`` split is the folder of bags ``path`` (labels read against the
    model's classes); bags of another feature width are refused."""
    spec = bag_spec_from_path(path, model.label_names)
    params = {"test_dir": spec.params["dir"], "labels": spec.params["labels"], "label_names": list(model.label_names)}
    spec = DataSpec("cached_bags", params, val_fraction=0.0)
    test_set = build_dataset(spec, "test")
    problems = _bag_problems(model, test_set, [test_set[i] for i in _sample_indices(len(test_set), 4)],
                             measurements=False)
    if problems:
        raise FinetuneDataError(_report(f"cannot evaluate {model_uri} on {path}", problems))
    return spec


def _bag_problems(model: InterpretableModel, train_set: Any, samples: list[dict[str, Any]],
                  measurements: bool = True) -> list[str]:
    """What bags must give a MIL model: instances of its feature width, and (to train, ``measurements``) no
    measurement it cannot learn."""
    from mlmi_zoo.specs import InputSpecError

    problems = []
    for sample in samples:
        feats = torch.as_tensor(sample["feats"]).float()
        try:
            model.validate_input(feats[None])
        except InputSpecError as err:
            problems.append(f"bag {sample.get('slide_id', sample.get('index'))!r}: {err}; the base model reads "
                            f"instances encoded as it was trained ({model.input_spec.in_channels} features each): "
                            "encode the tiles with the same encoder")
            break
    quantities = [q.name for q in model.config.quantities]
    if measurements and quantities and not all(q in (samples[0].get("measurements") or {}) for q in quantities):
        problems.append(f"the base model measures {quantities} per bag and these bags carry no such measurement; "
                        f"fine-tune without the physical head: "
                        f"{without_area_head(getattr(model.config, 'equivalent_radii', ()))}")
    return problems


def _has_class_folders(path: Path) -> bool:
    return path.is_dir() and not any(path.glob("*.csv"))


def _header_of(path: Path) -> tuple[str, ...]:
    """The header of the CSV that ``path`` names (``image,label`` for a class-folder layout)."""
    from mlmi_zoo.training.datasets.user_files import read_csv_header

    if path.is_dir():
        csvs = sorted(path.glob("*.csv"))
        if not csvs:
            return ("image", "label")  # the class-folder listing
        if len(csvs) > 1:
            raise ValueError(f"{path} holds several CSV files {[c.name for c in csvs]}; pass the one to use")
        return read_csv_header(csvs[0])
    if not path.is_file():
        raise FileNotFoundError(f"data not found: {str(path)!r} (expected a CSV file, a folder with one CSV, "
                                "or a folder with one sub-folder per class)")
    return read_csv_header(path)


def evaluation_data_spec(model_uri: str, path: str | Path, listing: str | Path | None = None,
                         check: bool = True) -> DataSpec:
    """The data spec whose ``test`` split is a user's own test CSV or class-folder layout (for a MIL
    model: a folder of bags and one labels CSV, as for fine-tuning, :func:`bag_spec_from_path`).

    The columns are read as for fine-tuning (spacing, measurements and concepts the model predicts,
    a ``mask`` column) but all are optional: what the data lack is reported by the evaluation as
    not measurable. Labels are read against the model's classes; image and label column names and
    the channel conversion of the model's training data are reused.

    Args:
        model_uri: the model to evaluate (anything :func:`mlmi_zoo.load` accepts).
        path: ``test.csv``, a folder holding one CSV, or ``DIR/<class>/<image>``.
        listing: where a class-folder layout is listed (a CSV; required for that layout).
        check: refuse images whose channels, dimensions or intensity range do not fit the model.

    Returns:
        a ``folder_csv`` spec with ``test_csv`` only (evaluate its ``"test"`` split).

    Raises:
        FileNotFoundError: no such data.
        FinetuneDataError: images that do not fit the model (with ``check``).
        ValueError: a CSV with bad rows (each named by row and column).
    """
    import mlmi_zoo
    from mlmi_zoo.hub import resolve
    from mlmi_zoo.registry import read_config

    from mlmi_zoo.families import family_of

    model = mlmi_zoo.load(model_uri)
    if family_of(model).inputs == "bags":
        return _bag_evaluation_spec(model, model_uri, Path(path))
    trained = ((read_config(resolve(model_uri)).get("data") or {}).get("params") or {})
    image_column = str(trained.get("image_column", "image"))
    label_column = str(trained.get("label_column", "label"))
    header = _header_of(Path(path))
    columns, _ = _columns_for(model, header, image_column, label_column, require=False)
    if trained.get("channels") is not None:
        columns["channels"] = trained["channels"]
    csv, image_dir = _csv_of(Path(path), Path(listing) if listing is not None else None)
    params: dict[str, Any] = {"test_csv": str(csv.resolve()), "label_names": list(model.label_names), **columns}
    if image_dir is not None:
        params["image_dir"] = str(image_dir.resolve())
    spec = DataSpec("folder_csv", params, val_fraction=0.0)
    if check:
        from mlmi_zoo.training.finetune_checks import check_images  # the checks read this module's constants

        problems, _ = check_images(model, build_dataset(spec, "test"))
        if problems:
            raise FinetuneDataError(_report(f"cannot evaluate {model_uri} on {path}", problems))
    return spec


# ---------------------------------------------------------------------------------------------
# shared by the data specs and the checks (training.finetune_checks)
# ---------------------------------------------------------------------------------------------
def _sample_indices(n: int, k: int = SAMPLED_CASES) -> list[int]:
    return torch.linspace(0, n - 1, steps=min(n, k)).round().long().unique().tolist() if n else []


def _report(title: str, problems: list[str]) -> str:
    return f"{title}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)


# ---------------------------------------------------------------------------------------------
# the user's own concepts
# ---------------------------------------------------------------------------------------------
def _own_concepts(parent: InterpretableModel, name_or_uri: str, data: DataSpec | str | Path,
                  words: Sequence[str]) -> tuple[Any, ...]:
    """The user's concepts (``concepts=``) read off their CSV, or refuse: not a bottleneck, no CSV."""
    from mlmi_zoo.training.user_concepts import concepts_from_csv

    if not getattr(parent.config, "concepts", None):
        raise ValueError(f"concepts= replaces a concept bottleneck; {name_or_uri} ({parent.architecture}) has none")
    if isinstance(data, DataSpec):
        csv = data.params.get("csv") if data.kind == "folder_csv" else None
        if csv is None:
            raise ValueError(f"concepts= reads the concept columns of a CSV; the data spec {data.kind!r} has none")
        return concepts_from_csv(csv, words)
    path = Path(data)
    if _has_class_folders(path):
        raise ValueError(f"concepts= reads concept columns of a CSV; {path} is a folder of class sub-folders, which "
                         "carries labels only: list the images in a CSV (image,label,<concept>...) instead")
    return concepts_from_csv(_csv_of(path, None)[0], words)
