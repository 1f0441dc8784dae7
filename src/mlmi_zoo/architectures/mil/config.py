"""The MIL configuration: the architecture (saved with the weights) and the training settings.

The architectures are attention MIL (Ilse et al., ICML 2018) and additive MIL (Javed et al.,
NeurIPS 2022), :mod:`.model`; the training settings weigh the loss terms of :mod:`.training` and
cap the instances a training bag keeps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import math

from mlmi_zoo.architectures.blocks.heads import spacing_exponent
from mlmi_zoo.base import ModelConfig
from mlmi_zoo.specs import QuantitySpec

__all__ = ["MILConfig", "MILTrainingSettings", "TUMOUR_AREA", "FEATURES", "without_area_head"]

TUMOUR_AREA = QuantitySpec("tumour_area_mm2", "mm^2", 0.0, math.inf)
FEATURES = "features"  # the backbone name of models that take cached feature bags


def without_area_head(equivalent_radii: object = ()) -> str:
    """The recipe overrides that drop a MIL model's area head (and the radii read from it), e.g. to
    fine-tune on bags that carry no measured area."""
    return "model.config.quantities=[]" + (" model.config.equivalent_radii=[]" if equivalent_radii else "")


@dataclass(frozen=True)
class MILConfig(ModelConfig):
    """Attention-MIL configuration (both families).

    For bags, ``spatial_dims`` is 0 and ``in_channels`` mirrors ``in_features``, so the base input
    check validates ``(B, N, D)`` feature bags. Raw-tile models (``instance_encoder`` set) take
    ``(B, N, in_channels, tile_size, tile_size)`` tiles instead.

    Attributes:
        in_features: instance feature width D entering the attention MLP: the width of cached
            features, or the projection width of the raw-tile encoder.
        hidden: width of the instance embedding ``h_n``; small (128) because it is evaluated on
            every instance of 100k-tile bags.
        attention_hidden: width of the attention MLP (``V``, ``U`` in Ilse et al.).
        gated: gated attention ``tanh(V h) * sigmoid(U h)`` (Ilse et al.'s better variant) or plain
            ``tanh(V h)``.
        classifier_hidden: hidden width of the classifier ``psi``; 0 makes it linear.
        dropout: on the instance embedding, during training only.
        instance_encoder: ``None`` for cached features; else a backbone name understood by
            :func:`create_backbone` that encodes raw tiles (equal to ``backbone``).
        encoder_chunk: instances encoded per pass at inference, bounding encoder memory.
        tile_size: tile side in pixels; with ``microns_per_pixel`` it gives each tile's area.
        microns_per_pixel: pixel size of the tiles (0.5 µm is the usual 20x objective).
        bag_context: add the bag prior to the covered-fraction logits and the bag offset to the raw
            attention scores (see the module docstring); False scores every instance alone.
        bag_normalise: subtract each bag's mean instance feature before the embedding (for the
            attention and the classifier; the area head has its own bag statistics), so that a
            slide-level shift of every feature neither moves the attention scores nor changes which
            ReLU units of the embedding are active (see the module docstring).
        instance_chunk: instances per chunk of the per-instance networks (embedding, attention,
            classifier, area head); bounds the size of every activation (see the module docstring).
        area_head_gain: the area head's parameters are stored divided by this constant, so that at
            the model's learning rate they move this many times faster (see :class:`InstanceAreaHead`).
        top_instance_masking: probability ``p`` with which, in training, each of a bag's
            ``top_instance_k`` highest raw attention scores is masked out of the softmax (Zhang et
            al.'s STKIM); at most ``n_valid - 1`` instances of a bag are candidates, so one always
            remains. 0 turns it off; evaluation never masks.
        top_instance_k: ``K``, the number of highest-scored instances of a bag that may be masked.
        equivalent_radii: pairs ``(radius name, area quantity)``: besides each area, the explanation
            reports the radius in mm of the disc with that area, ``sqrt(A / pi)`` (a lesion's size as
            radiologists state it, e.g. the radius of a mammogram's truth circle). It is read from the
            area, so it adds no parameter and inherits the area's per-tile attribution.
    """

    backbone: str = FEATURES
    label_names: tuple[str, ...] = ("negative", "positive")
    in_channels: int = 512
    spatial_dims: int = 0
    img_size: tuple[int, ...] = ()
    modality: str = "histopathology"
    quantities: tuple[QuantitySpec, ...] = (TUMOUR_AREA,)
    in_features: int = 512
    hidden: int = 128
    attention_hidden: int = 128
    gated: bool = True
    classifier_hidden: int = 64
    dropout: float = 0.25
    instance_encoder: str | None = None
    encoder_chunk: int = 512
    tile_size: int = 256
    microns_per_pixel: float = 0.5
    bag_context: bool = True
    bag_normalise: bool = False
    instance_chunk: int = 8192
    area_head_gain: float = 20.0
    top_instance_masking: float = 0.0
    top_instance_k: int = 10
    equivalent_radii: tuple[tuple[str, str], ...] = ()

    # config.json files before config_version 2 held the training settings in the model config.
    TRAINING_FIELDS_V1: ClassVar[tuple[str, ...]] = (
        "train_max_instances", "physical_weight", "attention_instance_weight", "attention_bag_weight")

    def __post_init__(self) -> None:
        if self.instance_encoder is None:
            if self.backbone != FEATURES:
                raise ValueError(f"backbone {self.backbone!r} needs instance_encoder={self.backbone!r}; "
                                 f"cached-feature models use backbone {FEATURES!r}")
            # Feature bags: the base input check reads the feature width from in_channels.
            object.__setattr__(self, "in_channels", self.in_features)
        elif self.instance_encoder != self.backbone:
            raise ValueError(f"instance_encoder {self.instance_encoder!r} must equal backbone {self.backbone!r} "
                             f"(the registered name states the encoder)")
        super().__post_init__()
        if self.spatial_dims != 0:
            raise ValueError(f"MIL models take bags: spatial_dims must be 0, got {self.spatial_dims}")
        for name in ("in_features", "hidden", "attention_hidden", "encoder_chunk", "tile_size", "instance_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.classifier_hidden < 0:
            raise ValueError(f"classifier_hidden must be >= 0 (0 = linear), got {self.classifier_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.microns_per_pixel > 0:
            raise ValueError(f"microns_per_pixel must be positive, got {self.microns_per_pixel}")
        if not self.area_head_gain > 0:
            raise ValueError(f"area_head_gain must be positive, got {self.area_head_gain}")
        if not 0.0 <= self.top_instance_masking < 1.0:
            raise ValueError(f"top_instance_masking is a probability in [0, 1), got {self.top_instance_masking}")
        if self.top_instance_k < 1:
            raise ValueError(f"top_instance_k must be >= 1, got {self.top_instance_k}")
        for q in self.quantities:
            if spacing_exponent(q.unit) != 2:
                raise ValueError(f"quantity {q.name!r} has unit {q.unit!r}; the MIL head sums per-tile areas, "
                                 f"so every quantity must be an area (e.g. 'mm^2')")
        areas = {q.name for q in self.quantities}
        for pair in self.equivalent_radii:
            if len(pair) != 2:
                raise ValueError(f"equivalent_radii: each entry is (radius name, area quantity), got {pair!r}")
            radius, area = pair
            if area not in areas:
                raise ValueError(f"equivalent_radii: {radius!r} is read from {area!r}, which is not one of the area "
                                 f"quantities {sorted(areas)}")
            if radius in areas:
                raise ValueError(f"equivalent_radii: the radius name {radius!r} is already an area quantity")


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MILTrainingSettings:
    """How attention / additive MIL is trained: the weights of the loss terms and the training bag size.

    Filled from the recipe's ``training:`` section; none of it is needed to read the weights back.

    Attributes:
        train_max_instances: random subsample per bag during training (augmentation, and a bound on
            encoder memory for raw tiles); ``None`` uses every instance; ``"auto"``: 4096 cached
            feature vectors, or 64 raw tiles for models that encode their tiles (each kept tile is a
            backbone pass with gradients).
        physical_weight: weight of the physical-head loss against cross-entropy.
        attention_instance_weight: weight of a binary cross-entropy against instance labels, when
            the bags carry them (``batch["instance_labels"]``), of the raw attention scores and, for
            additive MIL, of each instance's positive-class term ``psi(h_n)`` (so the sign of its
            contribution marks tumour); 0 trains from the bag label only, as in Ilse et al. and
            Javed et al.
        attention_bag_weight: weight of a binary cross-entropy of the raw attention scores (with
            their bag offset) against what the *bag* labels say of instances under the standard
            MIL assumption (Dietterich et al. 1997): every instance of a negative bag (class 0) is
            negative, and a positive bag's highest-scored instance is positive (the max-pooling
            instance classifier of Wang et al.'s mi-Net, 2018). The two terms are averaged over
            negative instances and over positive bags. Uses no instance label; two classes only.
            The softmax leaves raw scores free up to one constant per bag, so instance scores of
            different bags are not comparable; this loss ties them to one scale.
    """

    train_max_instances: int | Literal["auto"] | None = "auto"
    physical_weight: float = 1.0
    attention_instance_weight: float = 0.0
    attention_bag_weight: float = 0.0

    def max_instances(self, encodes_tiles: bool) -> int | None:
        """The training subsample size for a model that encodes raw tiles itself or reads cached features."""
        if self.train_max_instances == "auto":
            return 64 if encodes_tiles else 4096
        return self.train_max_instances

    def __post_init__(self) -> None:
        if not (self.attention_bag_weight >= 0 and self.attention_instance_weight >= 0 and self.physical_weight >= 0):
            raise ValueError(f"attention_bag_weight, attention_instance_weight and physical_weight must be >= 0, got "
                             f"{self.attention_bag_weight}, {self.attention_instance_weight}, {self.physical_weight}")
        if isinstance(self.train_max_instances, int) and self.train_max_instances < 1:
            raise ValueError(f"train_max_instances must be positive or None, got {self.train_max_instances}")
