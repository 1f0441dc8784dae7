"""The concept-bottleneck configuration: the architecture (saved with the weights) and the training settings.

The architecture follows Koh et al., "Concept Bottleneck Models" (ICML 2020) with the zoo's typed
concepts in units (:mod:`.model`); the training settings choose independent, sequential or joint
training (Koh et al., section 3) and the fine-annotation cost on the attention (after IAIA-BL,
Barnett et al. 2021), used by :mod:`.training`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from mlmi_zoo.architectures.blocks.heads import spacing_exponent, spacing_ruler
from mlmi_zoo.base import ModelConfig
from mlmi_zoo.specs import ConceptSpec

__all__ = ["CBMConfig", "CBMTrainingSettings", "NODULE_CONCEPTS"]

# The nodule phantom's concepts and measurements: the default, so `create_model("cbm_resnet18")`
# builds a model that trains on `NodulePhantom` without further configuration. The size category's
# levels are those of `phantoms.SIZE_CATEGORY_LEVELS` (the label rule's cut points).
NODULE_CONCEPTS: tuple[ConceptSpec, ...] = (
    ConceptSpec("spiculation", "binary", group="margin"),
    ConceptSpec("calcification", "binary", group="density"),
    ConceptSpec("texture", "categorical", levels=("solid", "part-solid", "ground-glass"), group="density"),
    ConceptSpec("margin_sharp", "binary", group="margin"),
    ConceptSpec("size_category", "ordinal", levels=("<8 mm", "8-15 mm", ">=15 mm"), group="size"),
    ConceptSpec("diameter_mm", "continuous", unit="mm", group="size"),
    ConceptSpec("mean_hu", "continuous", unit="HU", group="density"),
)


@dataclass(frozen=True)
class CBMConfig(ModelConfig):
    """Concept bottleneck configuration.

    Attributes:
        concepts: the typed concepts, in bottleneck order; each occupies ``spec.width`` units.
        head: ``"linear"`` keeps the decision an exact sum of concept x weight contributions;
            ``"mlp"`` (one hidden layer) can model concept interactions but is not decomposable.
        feature_stride: cut the backbone at this stride, so concept maps stay fine enough to
            localise evidence on small patches.
        head_hidden: hidden width of the ``mlp`` head.
        balance_concepts: weight concept losses by inverse class frequency (training split).
        calibrated_concepts: with ``balance_concepts``, the bottleneck subtracts each binary concept's
            ``log(pos_weight)`` and each level's ``log(level weight)`` from the logits before the
            sigmoid or softmax (post-hoc logit adjustment, Menon et al., "Long-tail learning via
            logit adjustment", ICLR 2021), so the bottleneck holds probabilities at the training
            split's rates rather than class-balanced scores: a rare concept absent from an image
            reads near 0, as its correction does, instead of near 0.5. Concept rankings, and so
            concept AUROCs, do not change. False keeps the balanced scores (the released models).
        pooling: ``"mean"`` (global average of each concept map, the original model) or
            ``"attention"`` (one learnt spatial attention shared by the binary, ordinal and
            categorical concepts; continuous ones stay mean-pooled; level logits centred over
            levels; see the module docstring). Both keep every concept logit the exact mean of
            its map. ``"max"`` reads each binary concept at its strongest latent cell (a finding
            present anywhere, e.g. a lesion type; the logit is the exact maximum of its map);
            the other concepts stay mean-pooled.
        area_maps: pairs ``(area concept, finding)``: the continuous area concept is read as the sum over
            latent cells of the share of each cell the finding covers (a sigmoid per cell, so the
            area can never be negative), taught cell by cell from the finding's masks where the
            training sets ``map_coef``. The area's map is each cell's term of its standardised value,
            so the concept logit stays the exact mean of its map.
        concept_hidden: 0 for the paper's linear concept predictor (a 1x1 convolution); ``n > 0``
            puts one hidden layer before it (a 3x3 convolution with ``n`` channels and a ReLU), still
            one value per latent cell, so pooling stays exact.
        resample: when a spacing is given, resample the image onto the canonical grid (the same
            size and centre, ``spacing`` mm per pixel) before the concept predictor, so the
            network always sees physical scale: pixel-domain sizes are then canonical pixels,
            a size class in mm can be told from the image, and two renderings of one object at
            different spacings reach the network as nearly the same image. Needs ``spacing``.
            Without it the network sees the pixels as given and lengths follow the spacing
            exactly (``diameter_mm`` doubles when the spacing does).
        dihedral_views: in eval mode, average the concept network over the 8 flips and quarter
            turns of the image plane (see the module docstring); training is unchanged and costs
            the same, inference costs 8 passes. Meant for models trained with dihedral
            augmentation (``data.augment: dihedral``). Square image planes only.
    """

    concepts: tuple[ConceptSpec, ...] = NODULE_CONCEPTS
    head: Literal["linear", "mlp"] = "linear"
    feature_stride: int = 8
    head_hidden: int = 32
    balance_concepts: bool = True
    calibrated_concepts: bool = False
    pooling: Literal["mean", "attention", "max"] = "mean"
    concept_hidden: int = 0
    area_maps: tuple[tuple[str, str], ...] = ()
    resample: bool = False
    dihedral_views: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.concepts:
            raise ValueError("CBMConfig.concepts is empty; a concept bottleneck needs at least one ConceptSpec")
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise ValueError(f"CBMConfig.concepts names must be unique, got {names}")
        for c in self.concepts:
            if c.kind == "continuous":
                spacing_exponent(c.unit)  # a unit the spacing can scale (mm^k) or an intensity
        if self.quantities:
            raise ValueError("a CBM expresses physical quantities as continuous concepts (they are part of the "
                             "bottleneck); move them to `concepts`, e.g. ConceptSpec('diameter_mm', 'continuous', unit='mm')")
        if self.head not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', got {self.head!r}")
        if self.pooling not in ("mean", "attention", "max"):
            raise ValueError(f"pooling must be 'mean', 'attention' or 'max', got {self.pooling!r}")
        if self.pooling == "max" and not any(c.kind == "binary" for c in self.concepts):
            raise ValueError("pooling='max' reads binary concepts at their strongest cell; these concepts have none")
        if self.pooling == "max" and self.dihedral_views:
            raise ValueError("dihedral_views averages concept maps over views, which keeps means but not maxima; "
                             "use it with pooling='mean' or 'attention'")
        if self.concept_hidden < 0:
            raise ValueError(f"concept_hidden must be >= 0 channels (0: a linear concept predictor), got {self.concept_hidden}")
        by_name = {c.name: c for c in self.concepts}
        for area, finding in self.area_maps:
            spec = by_name.get(area)
            if spec is None or spec.kind != "continuous" or spacing_exponent(spec.unit) != self.spatial_dims:
                raise ValueError(f"area_maps: {area!r} must be a continuous concept whose unit is an area of the image "
                                 f"plane (e.g. mm^2 or DD^2 for 2D images)")
            if finding not in by_name:
                raise ValueError(f"area_maps: the finding {finding!r} of {area!r} is not one of the concepts "
                                 f"{sorted(by_name)}")
        if len({a for a, _ in self.area_maps}) != len(self.area_maps):
            raise ValueError(f"area_maps names an area concept twice: {self.area_maps}")
        rulers = {spacing_ruler(c.unit) for c in self.concepts if c.kind == "continuous" and c.unit and spacing_exponent(c.unit)}
        if len(rulers) > 1:
            raise ValueError(f"continuous concepts measure with one ruler, mm or DD (the spacing's unit); got both in "
                             f"{[c.unit for c in self.concepts if c.kind == 'continuous']}")
        if self.dihedral_views and (self.spatial_dims < 2 or self.img_size[-1] != self.img_size[-2]):
            raise ValueError(f"dihedral_views turns the image plane by quarter turns and needs a square plane, "
                             f"got img_size {self.img_size}")
        if self.resample and self.spacing is None:
            raise ValueError("resample=True resamples inputs onto the canonical grid and needs the canonical "
                             "`spacing` (mm per pixel, one value per axis)")

    # config.json files before config_version 2 held the training settings in the model config.
    TRAINING_FIELDS_V1: ClassVar[tuple[str, ...]] = ("mode", "joint_lambda", "fa_coef")

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    @property
    def spacing_unit(self) -> str:
        """The unit of the spacing: ``"DD"`` when the concepts measure in optic-disc diameters, else ``"mm"``."""
        rulers = {spacing_ruler(c.unit) for c in self.concepts if c.kind == "continuous" and c.unit and spacing_exponent(c.unit)}
        return rulers.pop() if rulers else "mm"


@dataclass(frozen=True)
class CBMTrainingSettings:
    """How a concept bottleneck is trained: independent, sequential or joint, and the fine-annotation cost.

    Filled from the recipe's ``training:`` section; none of it is needed to read the weights back.

    Attributes:
        mode: how the model is trained (Koh et al.): ``independent`` (label head on true concepts),
            ``sequential`` (label head on the frozen concept model's predictions) or ``joint``
            (``L_y + joint_lambda * L_c`` end to end). Sequential is the default: Koh et al. found
            it close to joint in task accuracy while keeping concepts as accurate as independent
            training, and interventions stay effective.
        joint_lambda: weight of the concept loss in joint training (Koh et al.'s lambda).
        fa_coef: weight of the fine-annotation cost (attention mass off the lesion, on training
            lesion masks) in the concept and joint stages; 0 turns it off. Needs
            ``pooling="attention"``. Where it is on, localization is partly taught.
        map_coef: weight of the cell-level loss of the max-pooled binary concepts' maps against the
            data's masks of those findings (``batch["concept_masks"]``, on the cases where
            ``batch["concept_masks_known"]``), in the concept and joint stages; 0 turns it off.
            Needs ``pooling="max"``. Where it is on, the maps are taught where each finding lies.
        map_pos_weight: weight of the cells that hold the finding in that loss (they are few).
        intervention_rate: in the ``label_head`` stage of ``sequential`` mode and in the ``joint``
            stage, the probability that each annotated concept of a training case is replaced by its
            true value before the label head reads it (random interventions during training, the
            "RandInt" of Espinosa Zarlenga et al., "Concept Embedding Models", NeurIPS 2022, who use
            0.25). The head then learns from both what the concept model predicts and what a
            correction gives it, so it stays accurate on predictions and corrections keep helping.
            0 turns it off (Koh et al.'s modes as published); ``independent`` mode already trains
            the head on true concepts only and refuses a rate.
    """

    mode: Literal["independent", "sequential", "joint"] = "sequential"
    joint_lambda: float = 1.0
    fa_coef: float = 0.0
    map_coef: float = 0.0
    map_pos_weight: float = 1.0
    intervention_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("independent", "sequential", "joint"):
            raise ValueError(f"mode must be 'independent', 'sequential' or 'joint', got {self.mode!r}")
        if self.joint_lambda < 0:
            raise ValueError(f"joint_lambda must be >= 0, got {self.joint_lambda}")
        if self.fa_coef < 0:
            raise ValueError(f"fa_coef must be >= 0, got {self.fa_coef}")
        if self.map_coef < 0:
            raise ValueError(f"map_coef must be >= 0, got {self.map_coef}")
        if self.map_pos_weight <= 0:
            raise ValueError(f"map_pos_weight must be > 0, got {self.map_pos_weight}")
        if not 0.0 <= self.intervention_rate <= 1.0:
            raise ValueError(f"intervention_rate is a probability in [0, 1], got {self.intervention_rate}")
        if self.intervention_rate > 0 and self.mode == "independent":
            raise ValueError("intervention_rate replaces predicted concepts by true ones while the label head trains; "
                             "mode='independent' already trains it on true concepts only. Use mode='sequential' "
                             "or 'joint' with a rate, or a rate of 0")
