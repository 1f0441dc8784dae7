"""ProtoPNet's configuration: the architecture (saved with the weights) and the training settings.

The architecture follows Chen et al., "This Looks Like That" (NeurIPS 2019) with the options the zoo
adds (:mod:`.model`); the training settings hold the loss coefficients of Chen et al. and of IAIA-BL
(Barnett et al., Nature Machine Intelligence 2021), used by :mod:`.training`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from mlmi_zoo.base import ModelConfig

__all__ = ["ProtoPNetConfig", "ProtoPNetTrainingSettings"]


@dataclass(frozen=True)
class ProtoPNetConfig(ModelConfig):
    """ProtoPNet's architecture: what the saved weights need to be read back and run.

    Attributes:
        feature_stride: cut the backbone at this total stride; 8 keeps an 8x8 grid for 64-px patches,
            so a prototype is a small region rather than half the image.
        prototype_dim: channels of the add-on output and of each prototype (ProtoPNet used 128 on
            224-px natural images; 64 suffices for small grey-level patches).
        prototypes_per_class: ProtoPNet used 10 for 200 bird classes; 5 covers the few appearance
            modes of a lesion class.
        similarity: ``"log_l2"`` (ProtoPNet) or ``"cosine"``.
        epsilon: the ``eps`` of ``log((d + 1) / (d + eps))``; bounds the similarity by ``log(1/eps)``.
            ProtoPNet's 1e-4 makes the similarity steep near ``d = 0``: once prototypes lie close to
            real patches (``prototype_init="data"``), the short move of push still changes every
            similarity a lot. A larger value (0.1) flattens it, and push then costs little.
        incorrect_class_weight: initial last-layer weight from a prototype to other classes
            (ProtoPNet: -0.5), so prototypes start as evidence *for* their class only.
        padding_mode: padding of the backbone's convolutions. Zero padding marks the crop border
            in the features, and prototypes can learn to match that border instead of anatomy;
            ``"reflect"`` pads with the image's own content.
        pool_top_k: each prototype's similarity to an image is the mean over its ``k`` most
            similar latent locations (IAIA-BL's top-k average pooling); 1 is ProtoPNet's max
            pooling. Above 1, a pattern seen at several places weighs more than one seen once,
            which suits grades that rise with the number of lesions. Push still projects each
            prototype onto its single nearest training patch.
        physical_head: ``"regress"`` (an MLP on the mean add-on features; any quantity) or
            ``"count"`` (sizes — lengths, areas in 2D, volumes in 3D — measured as the lesion pixel
            count of a predicted fraction map, as the ground truth of a mask is defined).
        measure_tile: pixels per axis of a fraction-map tile (``"count"``); divides ``feature_stride``.
        measure_resample: the count head counts on the canonical grid (``spacing``): it resamples
            each image there first, so one object imaged at two spacings is counted on one grid.
        measure_detach: the count head reads the backbone's features without training them, so
            the measurement's losses leave the features the prototypes are learnt on as the
            classification alone shapes them.
        measure_context: where the count head's context features come from (``"count"`` with
            ``measure_resample``). ``"given"``: the backbone's features of the image as given
            (the prototypes' pass), interpolated to the tiles and resampled with them, so the
            context of one object imaged at two spacings was computed at two scales.
            ``"canonical"``: a second backbone pass on the image resampled to the canonical grid,
            so the whole count path sees every object at one scale, at the cost of that pass
            (in training too; the prototypes still see the image as given). ``"own"``: as
            ``"canonical"``, but the pass is through the count head's own backbone (same
            architecture), so the measurement's losses never reach the backbone the prototypes
            are learnt on, and that backbone only ever sees images as given.
        measure_dihedral_views: in eval mode the count head's fraction map is the mean over the
            8 flips and quarter turns of the image plane, each map turned back tile by tile (exact
            when ``measure_tile`` divides the plane's size), and the sizes are counted on it; the
            decision path is untouched, training is unchanged, and an explanation costs 7 more
            backbone passes. Meant for models trained with dihedral augmentation.
    """

    feature_stride: int = 8
    prototype_dim: int = 64
    prototypes_per_class: int = 5
    similarity: Literal["log_l2", "cosine"] = "log_l2"
    epsilon: float = 1e-4
    incorrect_class_weight: float = -0.5
    padding_mode: Literal["zeros", "reflect"] = "zeros"
    pool_top_k: int = 1
    physical_head: Literal["regress", "count"] = "regress"
    measure_tile: int = 4
    measure_resample: bool = False
    measure_detach: bool = False
    measure_context: Literal["given", "canonical", "own"] = "given"
    measure_dihedral_views: bool = False

    # config.json files before config_version 2 held the training settings in the model config.
    TRAINING_FIELDS_V1: ClassVar[tuple[str, ...]] = (
        "clst_coef", "sep_coef", "l1_coef", "fa_coef", "push_on_lesion", "measure_map_coef", "prototype_init")

    @property
    def num_prototypes(self) -> int:
        return self.prototypes_per_class * self.num_classes

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"ProtoPNet needs image inputs with spatial_dims 2 or 3, got {self.spatial_dims}")
        for name in ("prototype_dim", "prototypes_per_class", "feature_stride", "pool_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.similarity not in ("log_l2", "cosine"):
            raise ValueError(f"similarity must be 'log_l2' or 'cosine', got {self.similarity!r}")
        if self.measure_dihedral_views and (self.physical_head != "count" or self.img_size[-1] != self.img_size[-2]
                                            or self.img_size[-1] % self.measure_tile):
            raise ValueError("measure_dihedral_views averages a count head's tile map over quarter turns: it needs "
                             "physical_head='count' and a square image plane whose side measure_tile divides, got "
                             f"physical_head={self.physical_head!r}, img_size={self.img_size}")
        if self.physical_head not in ("regress", "count"):
            raise ValueError(f"physical_head must be 'regress' or 'count', got {self.physical_head!r}")
        if self.measure_context not in ("given", "canonical", "own"):
            raise ValueError(f"measure_context must be 'given', 'canonical' or 'own', got {self.measure_context!r}")
        if self.measure_context != "given" and not self.measure_resample:
            raise ValueError(f"measure_context={self.measure_context!r} computes the count head's context on the "
                             f"canonical grid: it needs measure_resample=true")
        if self.measure_context == "own" and self.measure_detach:
            raise ValueError("measure_detach keeps the measurement's losses out of the model's backbone; with "
                             "measure_context='own' they never reach it, and detaching would freeze the head's own")
        if self.measure_resample and (self.physical_head != "count" or self.spacing is None):
            raise ValueError("measure_resample counts on the canonical grid: it needs physical_head='count' and a "
                             f"canonical spacing; got physical_head={self.physical_head!r}, spacing={self.spacing}")


@dataclass(frozen=True)
class ProtoPNetTrainingSettings:
    """How ProtoPNet is trained: the loss coefficients, where push may project, how prototypes start.

    Filled from the recipe's ``training:`` section; none of it is needed to read the weights back.

    Attributes:
        clst_coef: weight of the cluster cost (ProtoPNet: 0.8).
        sep_coef: weight of the separation cost; negative, so separation is rewarded (ProtoPNet: -0.08).
        l1_coef: L1 penalty on off-class last-layer weights (ProtoPNet: 1e-4), for sparse, positive
            reasoning.
        fa_coef: weight of the IAIA-BL fine-annotation loss on lesion masks; 0 turns it off.
        push_on_lesion: with lesion masks, push projects prototypes only onto latent cells whose
            receptive-field window lies mostly on a lesion, and training pulls prototypes towards
            such cells (the cluster cost), so each prototype is a piece of a lesion rather than of
            the background (a CNN with zero padding otherwise tends to match the crop border).
        measure_map_coef: weight of the fraction map's fit to the lesion masks (``"count"``, when
            the batch has masks).
        prototype_init: where the prototypes start. ``"uniform"`` (ProtoPNet): uniform in
            ``[0, 1]^D``, the range of the Sigmoid add-on output. ``"data"``: before the first
            training stage, the trainer sets each class's prototypes to latent vectors (add-on
            output cells) of training images of that class, picked by k-means++ seeding
            (:func:`~mlmi_zoo.architectures.protopnet.training.initialise_prototypes_from_data`),
            so every prototype starts on the data. With the log similarity, uniform prototypes
            in 64 dimensions mostly start far from every cell; the cluster cost then moves only
            the nearest one of each class, and push projects the others onto arbitrary patches.
            The model itself never reads data: the option only tells the trainer what to do.
    """

    clst_coef: float = 0.8
    sep_coef: float = -0.08
    l1_coef: float = 1e-4
    fa_coef: float = 0.0
    push_on_lesion: bool = False
    measure_map_coef: float = 1.0
    prototype_init: Literal["uniform", "data"] = "uniform"

    def __post_init__(self) -> None:
        if self.prototype_init not in ("uniform", "data"):
            raise ValueError(f"prototype_init must be 'uniform' or 'data', got {self.prototype_init!r}")
        if self.fa_coef < 0 or self.measure_map_coef < 0:
            raise ValueError(f"fa_coef and measure_map_coef must be >= 0, got {self.fa_coef}, {self.measure_map_coef}")
