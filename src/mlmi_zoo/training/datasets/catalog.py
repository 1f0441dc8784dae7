"""What each data source is, for cards: name, license, modality, body part, citation, ground truth.

Model cards take these facts from here — keyed by the ``kind`` (and MedMNIST ``flag``) of the data
description a model was trained and evaluated on — so that every card trained on a data set cites
it and states its license.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataSource", "source_for", "ZOO_BIBTEX"]


@dataclass(frozen=True)
class DataSource:
    name: str
    hub_id: str  # the `datasets:` identifier in card front matter
    license: str  # SPDX-like identifier of the data license
    modality: str
    body_part: str
    description: str
    ground_truth: str
    has_spacing: bool
    bibtex: tuple[str, ...] = field(default_factory=tuple)
    # whether a card may show whole images; False for licences that allow only a few sample crops (mini-MIAS):
    # its figures then show crops
    whole_images_shareable: bool = True
    # the unit of the pixel spacing the data carry: mm, or DD (optic-disc diameters) for fundus photographs,
    # whose pixel size in mm is unknown
    spacing_unit: str = "mm"


ZOO_BIBTEX = """@software{mlmi_zoo,
  title  = {mlmi-zoo: inherently interpretable models for medical imaging},
  author = {{mlmi-zoo contributors}},
  year   = {2026},
  url    = {https://github.com/mlmi-zoo/mlmi-zoo}
}"""

MEDMNIST_BIBTEX = """@article{yang2023medmnist,
  title   = {MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image classification},
  author  = {Yang, Jiancheng and Shi, Rui and Wei, Donglai and Liu, Zequan and Zhao, Lin and Ke, Bilian and Pfister, Hanspeter and Ni, Bingbing},
  journal = {Scientific Data},
  volume  = {10},
  number  = {1},
  pages   = {41},
  year    = {2023}
}"""

LIDC_BIBTEX = (
    """@article{armato2011lidc,
  title   = {The Lung Image Database Consortium ({LIDC}) and Image Database Resource Initiative ({IDRI}): a completed reference database of lung nodules on {CT} scans},
  author  = {Armato, Samuel G. and McLennan, Geoffrey and Bidaut, Luc and others},
  journal = {Medical Physics},
  volume  = {38},
  number  = {2},
  pages   = {915--931},
  year    = {2011}
}""",
    """@article{hancock2016pylidc,
  title   = {Lung nodule malignancy classification using only radiologist-quantified image features as inputs to statistical learning algorithms: probing the {Lung Image Database Consortium} dataset with two statistical learning methods},
  author  = {Hancock, Matthew C. and Magnan, Jerry F.},
  journal = {Journal of Medical Imaging},
  volume  = {3},
  number  = {4},
  pages   = {044504},
  year    = {2016}
}""",
)

MIAS_BIBTEX = """@inproceedings{suckling1994mias,
  title     = {The {Mammographic Image Analysis Society} Digital Mammogram Database},
  author    = {Suckling, John and Parker, J. and Dance, D. R. and Astley, S. and Hutt, I. and Boggis, C. R. M. and Ricketts, I. and Stamatakis, E. and Cerneaz, N. and Kok, S.-L. and Taylor, P. and Betal, D. and Savage, J.},
  booktitle = {Excerpta Medica, International Congress Series 1069},
  pages     = {375--378},
  year      = {1994}
}"""

IDRID_BIBTEX = (
    """@article{porwal2018idrid,
  title   = {Indian Diabetic Retinopathy Image Dataset ({IDRiD}): a database for diabetic retinopathy screening research},
  author  = {Porwal, Prasanna and Pachade, Samiksha and Kamble, Ravi and Kokare, Manesh and Deshmukh, Girish and Sahasrabuddhe, Vivek and Meriaudeau, Fabrice},
  journal = {Data},
  volume  = {3},
  number  = {3},
  pages   = {25},
  year    = {2018}
}""",
    """@article{porwal2020idrid,
  title   = {{IDRiD}: Diabetic Retinopathy -- Segmentation and Grading Challenge},
  author  = {Porwal, Prasanna and Pachade, Samiksha and Kokare, Manesh and others},
  journal = {Medical Image Analysis},
  volume  = {59},
  pages   = {101561},
  year    = {2020}
}""",
)

PHANTOM_GT = "exact: generated with the image (mask, concepts, measurements at the true spacing, label rule)"

SOURCES: dict[str, DataSource] = {
    "nodule_phantom": DataSource(
        "mlmi-zoo nodule phantom", "mlmi-zoo/nodule-phantom", "apache-2.0", "CT", "lung",
        "procedural CT-like lung patches in HU with one nodule each, deterministic by (seed, index)",
        PHANTOM_GT, True, (ZOO_BIBTEX,)),
    "lidc_nodules": DataSource(
        "LIDC-IDRI-grounded nodules", "LIDC-IDRI", "cc-by-3.0", "CT", "lung",
        "one real LIDC-IDRI nodule per case: the consensus of its readers' contours (pixels drawn by at least half of "
        "them) at the scan's real spacing is the mask; the CT texture and the nodule's density are rendered at random, "
        "never from a rating; the label is the readers' median malignancy (above 3 vs below 3; 3 excluded)",
        "radiologist annotations of LIDC-IDRI: contours (the geometry) and ratings (labels and concepts: the readers' "
        "median, each reader's own kept for agreement); only the shape ratings (sphericity, lobulation, spiculation) "
        "are measured, since texture, internal structure, calcification, margin and subtlety could be drawn only from "
        "a reader's rating; split by patient", True, LIDC_BIBTEX),
    "tilebag_phantom": DataSource(
        "mlmi-zoo tile-bag phantom", "mlmi-zoo/tilebag-phantom", "apache-2.0", "histopathology", "generic tissue",
        "procedural H&E-like slides as bags of tiles; tumour tiles carry larger, darker, irregular nuclei",
        PHANTOM_GT + "; instance labels and tumour area in mm^2 from the tile size in microns per pixel", True, (ZOO_BIBTEX,)),
    "mias": DataSource(
        "mini-MIAS", "mini-MIAS", "research-use-only", "mammography (digitised film)", "breast",
        "322 mediolateral-oblique film mammograms of 161 women at 0.2 mm pixels (Suckling et al. 1994), resampled "
        "by block averaging and oriented chest wall left; split by woman. Licence: research use only, cite the "
        "database, never rent, lease or sell it",
        "radiologists' truth per image: background tissue, class and severity of each abnormality, and a circle "
        "(centre, radius in pixels x 0.2 mm) enclosing it (none for 4 abnormal images)", True, (MIAS_BIBTEX,), whole_images_shareable=False),
    "mias_bags": DataSource(
        "mini-MIAS", "mini-MIAS", "research-use-only", "mammography (digitised film)", "breast",
        "322 mediolateral-oblique film mammograms of 161 women (Suckling et al. 1994) as bags of breast tiles, each "
        "encoded once by a frozen encoder (cached features, never the images); split by woman. Licence: research use "
        "only, cite the database, never rent, lease or sell it",
        "radiologists' truth per image: class and severity of each abnormality and a circle enclosing it; a tile is "
        "positive when it overlaps a circle (unknown on the 4 abnormal images without one)", True, (MIAS_BIBTEX,), whole_images_shareable=False),
    "idrid": DataSource(
        "IDRiD", "IDRiD", "cc-by-4.0", "fundus photography", "eye (retina)",
        "Indian Diabetic Retinopathy Image Dataset (Porwal et al. 2018): 516 photographs with DR and macular-edema "
        "grades and fovea / optic-disc centres, and 81 full-resolution photographs with lesion masks; one grid for "
        "both (long side `size`); official test parts, validation carved from the official training parts. Sizes "
        "are in optic-disc diameters (DD), a unit of its own: no pixel size in mm is known",
        "retina specialists' grades (ICDR DR grade 0-4, macular-edema risk 0-2), fovea and optic-disc centres, and "
        "pixel masks of microaneurysms, haemorrhages, hard and soft exudates and the optic disc (a missing mask "
        "file = not annotated)", True, IDRID_BIBTEX, spacing_unit="DD"),
    "idrid_bags": DataSource(
        "IDRiD", "IDRiD", "cc-by-4.0", "fundus photography", "eye (retina)",
        "Indian Diabetic Retinopathy Image Dataset (Porwal et al. 2018) as bags of field-of-view tiles (bag = one "
        "photograph, instance = a tile), each tile encoded once by a frozen encoder (cached features); the graded "
        "photographs give the bag labels, the 81 photographs with lesion masks the tile truth; official test parts, "
        "validation carved from the official training parts",
        "retina specialists' grades (ICDR DR grade 0-4) of the graded photographs; on the segmentation photographs a "
        "tile is positive when it holds a pixel of a lesion mask (microaneurysms, haemorrhages, hard or soft "
        "exudates, where annotated)", True, IDRID_BIBTEX, spacing_unit="DD"),
    "medmnist:pneumoniamnist": DataSource(
        "PneumoniaMNIST", "medmnist/pneumoniamnist", "cc-by-4.0", "X-ray", "chest",
        "MedMNIST v2 paediatric chest X-rays (Kermany et al. 2018), resized to 28x28; official splits",
        "labels of the source data set (normal vs pneumonia)", False,
        (MEDMNIST_BIBTEX, """@article{kermany2018identifying,
  title   = {Identifying medical diagnoses and treatable diseases by image-based deep learning},
  author  = {Kermany, Daniel S. and Goldbaum, Michael and Cai, Wenjia and others},
  journal = {Cell},
  volume  = {172},
  number  = {5},
  pages   = {1122--1131},
  year    = {2018}
}""")),
    "medmnist:retinamnist": DataSource(
        "RetinaMNIST", "medmnist/retinamnist", "cc-by-4.0", "fundus photography", "eye",
        "MedMNIST v2 fundus images from DeepDRiD, resized to 28x28; official splits",
        "diabetic retinopathy grade 0-4 from the source data set", False,
        (MEDMNIST_BIBTEX, """@article{liu2022deepdrid,
  title   = {{DeepDRiD}: Diabetic Retinopathy-Grading and Image Quality Estimation Challenge},
  author  = {Liu, Ruhan and Wang, Xiangning and Wu, Qiang and others},
  journal = {Patterns},
  volume  = {3},
  number  = {6},
  pages   = {100512},
  year    = {2022}
}""")),
    "medmnist:adrenalmnist3d": DataSource(
        "AdrenalMNIST3D", "medmnist/adrenalmnist3d", "cc-by-4.0", "CT", "adrenal gland",
        "MedMNIST v2 3D adrenal shape volumes derived from abdominal CT, resized to 28^3; official splits",
        "labels of the source data set (normal vs adrenal hyperplasia)", False, (MEDMNIST_BIBTEX,)),
    "medmnist:vesselmnist3d": DataSource(
        "VesselMNIST3D", "medmnist/vesselmnist3d", "cc-by-4.0", "MR angiography", "brain",
        "MedMNIST v2 3D brain vessel segments from IntrA, resized to 28^3; official splits",
        "labels of the source data set (vessel vs aneurysm)", False, (MEDMNIST_BIBTEX,)),
}


def source_for(data: dict[str, Any]) -> DataSource:
    """The :class:`DataSource` for a data description (``{"kind": ..., "params": {...}}``)."""
    kind = data.get("kind", "")
    key = kind
    if kind == "medmnist":
        params = data.get("params", {})
        flag = params.get("flag") or str(params.get("path", "")).rsplit("/", 1)[-1].removesuffix(".npz")
        key = f"medmnist:{flag.removesuffix('_64')}"
    if key not in SOURCES:
        return DataSource(kind or "user data", "private", "other", "unknown", "unknown",
                          "user-provided data (described, never uploaded)", "as provided by the user", False)
    return SOURCES[key]
