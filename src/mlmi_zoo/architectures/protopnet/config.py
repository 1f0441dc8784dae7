"""ProtoPNet's configuration: the architecture (saved with the weights) and the training settings.

The architecture follows Chen et al., "This Looks Like That" (NeurIPS 2019) with the options the zoo
adds (:mod:`.model`); the training settings hold the loss coefficients of Chen et al. and of IAIA-BL
(Barnett et al., Nature Machine Intelligence 2021), used by :mod:`.training`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from mlmi_zoo.base import ModelConfig

__all__ = ["ProtoPNetConfig", "CountHeadConfig", "ProtoPNetTrainingSettings"]


@dataclass(frozen=True)
class CountHeadConfig:
    """ProtoPNet's lesion-count head (:class:`~mlmi_zoo.architectures.blocks.heads.LesionCountHead`).

    Attributes:
        tile: pixels per axis of a fraction-map tile; divides ``feature_stride``.
        resample: count on the canonical grid (the model's ``spacing``): each image is resampled
            there first, so one object imaged at two spacings is counted on one grid.
        detach: the head reads the backbone's features without training them, so the measurement's
            losses leave the features the prototypes are learnt on as the classification alone
            shapes them.
        context: where the head's context features come from (with ``resample``). ``"given"``: the
            backbone's features of the image as given (the prototypes' pass), interpolated to the
            tiles and resampled with them, so the context of one object imaged at two spacings was
            computed at two scales. ``"canonical"``: a second backbone pass on the image resampled
            to the canonical grid, so the whole count path sees every object at one scale, at the
            cost of that pass (in training too; the prototypes still see the image as given).
            ``"own"``: as ``"canonical"``, but the pass is through the head's own backbone (same
            architecture), so the measurement's losses never reach the backbone the prototypes are
            learnt on, and that backbone only ever sees images as given.
        dihedral_views: in eval mode the fraction map is the mean over the 8 flips and quarter turns
            of the image plane, each map turned back tile by tile (exact when ``tile`` divides the
            plane's size), and the sizes are counted on it; the decision path is untouched, training
            is unchanged, and an explanation costs 7 more backbone passes. Meant for models trained
            with dihedral augmentation.
    """

    tile: int = 4
    resample: bool = False
    detach: bool = False
    context: Literal["given", "canonical", "own"] = "given"
    dihedral_views: bool = False

    def __post_init__(self) -> None:
        if self.context not in ("given", "canonical", "own"):
            raise ValueError(f"count_head.context must be 'given', 'canonical' or 'own', got {self.context!r}")
        if self.context != "given" and not self.resample:
            raise ValueError(f"count_head.context={self.context!r} computes the head's context on the canonical "
                             "grid: it needs count_head.resample=true")
        if self.context == "own" and self.detach:
            raise ValueError("count_head.detach keeps the measurement's losses out of the model's backbone; with "
                             "context='own' they never reach it, and detaching would freeze the head's own")



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
        count_head: measure sizes with a lesion-count head (:class:`CountHeadConfig`) instead of
            regressing them: ``None`` (default) regresses any quantity with an MLP on the mean add-on
            features; a :class:`CountHeadConfig` measures sizes — lengths, areas in 2D, volumes in 3D —
            as the lesion pixel count of a predicted fraction map, as the ground truth of a mask is
            defined.
        tile_px: ``None`` runs the backbone on the whole image. A number of pixels encodes the
            image as independent, non-overlapping tiles of that side, each through the backbone cut
            at ``feature_stride`` and averaged to one latent cell
            (:class:`~mlmi_zoo.architectures.blocks.backbones.TiledBackbone`): a cell's true
            receptive field is then exactly its tile, and a prototype is one tile of a training
            photograph. For large photographs, where a convolutional cut either sees too much of
            the image or carries only low-level features. 2D only, without a count head.
    """

    feature_stride: int = 8
    prototype_dim: int = 64
    prototypes_per_class: int = 5
    similarity: Literal["log_l2", "cosine"] = "log_l2"
    epsilon: float = 1e-4
    incorrect_class_weight: float = -0.5
    padding_mode: Literal["zeros", "reflect"] = "zeros"
    pool_top_k: int = 1
    count_head: CountHeadConfig | None = None
    tile_px: int | None = None

    # config.json files before config_version 2 held the training settings in the model config.
    TRAINING_FIELDS_V1: ClassVar[tuple[str, ...]] = (
        "clst_coef", "sep_coef", "l1_coef", "fa_coef", "push_on_lesion", "push_foreground", "measure_map_coef",
        "prototype_init")

    # and the count head's options flat in the model config (physical_head, measure_*).
    COUNT_HEAD_FIELDS_V1: ClassVar[dict[str, str]] = {
        "measure_tile": "tile", "measure_resample": "resample", "measure_detach": "detach",
        "measure_context": "context", "measure_dihedral_views": "dihedral_views"}

    @classmethod
    def migrate_v1(cls, d: dict[str, Any]) -> dict[str, Any]:
        """A version-1 config (or a recipe's partial ``model.config``) with the count head nested.

        ``physical_head: count`` and the ``measure_*`` fields become ``count_head``;
        ``physical_head: regress`` becomes ``count_head: null``; a ``measure_*`` field alone (an
        override in the old spelling) updates the ``count_head`` it is merged into.
        """
        flat = {new: d[old] for old, new in cls.COUNT_HEAD_FIELDS_V1.items() if old in d}
        if "physical_head" not in d and not flat:
            return dict(d)
        out = {k: v for k, v in d.items() if k != "physical_head" and k not in cls.COUNT_HEAD_FIELDS_V1}
        if d.get("physical_head") == "regress":
            out["count_head"] = None
        elif d.get("physical_head") == "count" or flat:
            out["count_head"] = {**(d.get("count_head") or {}), **flat}
        return out

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
        head = self.count_head
        if head is not None and head.dihedral_views and (self.img_size[-1] != self.img_size[-2]
                                                         or self.img_size[-1] % head.tile):
            raise ValueError("count_head.dihedral_views averages the tile map over quarter turns: it needs a square "
                             f"image plane whose side count_head.tile divides, got img_size={self.img_size}")
        if self.tile_px is not None and (self.tile_px < self.feature_stride or self.spatial_dims != 2 or head is not None):
            raise ValueError(f"tile_px={self.tile_px} needs a 2D model without a count head and tiles of at least "
                             f"feature_stride ({self.feature_stride}) pixels")
        if head is not None and head.resample and self.spacing is None:
            raise ValueError("count_head.resample counts on the canonical grid: it needs the canonical `spacing`")


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
        push_foreground: the batch key of a foreground mask (``(H, W)`` or ``(1, H, W)`` per image,
            e.g. a fundus photograph's field of view ``"fov"`` or a mammogram's ``"breast"``): push
            projects prototypes only onto latent cells whose receptive-field window lies mostly
            on it and that are not on the latent grid's border, so no prototype is a piece of the
            black surround or of the padded image edge. ``"intensity"``: the foreground is read
            from each image (brighter than its minimum by 10% of its range), for images that carry
            no mask. ``None``: any cell.
        measure_map_coef: weight of the fraction map's fit to the lesion masks (``"count"``, when
            the batch has masks).
        prototype_init: where the prototypes start. ``"uniform"`` (ProtoPNet): uniform in
            ``[0, 1]^D``, the range of the Sigmoid add-on output. ``"data"``: before the first
            training stage, the trainer sets each class's prototypes to latent vectors (add-on
            output cells) of training images of that class, picked by k-means++ seeding
            (:func:`~mlmi_zoo.architectures.protopnet.data_init.initialise_prototypes_from_data`),
            so every prototype starts on the data. With the log similarity, uniform prototypes
            in 64 dimensions mostly start far from every cell; the cluster cost then moves only
            the nearest one of each class, and push projects the others onto arbitrary patches.
            The model itself never reads data: the option only tells the trainer what to do.
        push_foreground_share: the share of a cell's receptive-field window that must lie on the
            foreground (default half); lower for thin structures in empty surroundings.
        push_off_border: push projects prototypes only onto cells off the latent grid's border (their
            receptive field does not reach into the padding past the image edge), for images
            without a foreground mask; ``push_foreground`` implies it.
        push_distinct: push projects no two prototypes onto the same training image (each takes
            its nearest patch in an image no nearer prototype took), so no prototype shows what
            another already shows.
        prune_duplicates: right after push, switch off every prototype that duplicates an earlier
            one (vectors with cosine >= 0.99, or the same source patch;
            :func:`~mlmi_zoo.architectures.protopnet.prototypes.duplicate_flags`), so the last layer is
            fitted without them. Two prototypes that show the same patch add no evidence the first
            does not; ProtoPNet (Chen et al. 2019) prunes prototypes whose nearest patches are
            mostly of other classes, ProtoPShare (Rymarczyk et al., KDD 2021) merges prototypes
            that match alike. The switched-off prototypes stay in the weights (``prototype_mask``),
            contribute nothing, and the sanity checks count them apart.
        div_coef: weight of the diversity cost (:func:`~mlmi_zoo.architectures.protopnet.training.diversity_cost`):
            the mean over prototype pairs of how far their angle falls short of ``arccos(div_cosine)``. The add-on's
            Sigmoid output sits near 0.5 in every channel, so without it prototypes learnt a small
            distance apart point the same way (cosine >= 0.99) and push makes them duplicates.
            0 turns it off.
        div_cosine: the cosine above which a pair of prototypes is penalised.
        cluster_on_push_cells: the cluster and prototype-to-data costs measure each image's
            distance to a prototype over the cells push may project onto (``push_foreground``,
            ``push_off_border``, ``push_on_lesion``;
            :func:`~mlmi_zoo.architectures.protopnet.push.push_cells`), and ``prototype_init="data"``
            picks among those cells, so prototypes are learnt where push will put them. Without it a
            prototype may settle on a background cell that push may not use, and push then moves it
            to a foreground patch that means something else (``push_on_lesion`` always pulls towards
            lesion cells). Images with no such cell use every cell.
        near_data_coef: weight of the prototype-to-data cost
            (:func:`~mlmi_zoo.architectures.protopnet.training.near_data_cost`): each prototype's
            distance to its nearest cell of an own-class image in the batch. The cluster cost pulls
            only the prototype nearest to each image, so the others can drift off the data and are
            then pushed onto whatever patch is least far; this keeps every prototype on the data.
            0 turns it off.
    """

    clst_coef: float = 0.8
    sep_coef: float = -0.08
    l1_coef: float = 1e-4
    fa_coef: float = 0.0
    push_on_lesion: bool = False
    push_foreground: str | None = None
    measure_map_coef: float = 1.0
    prototype_init: Literal["uniform", "data"] = "uniform"
    push_foreground_share: float = 0.5
    push_off_border: bool = False
    push_distinct: bool = False
    prune_duplicates: bool = False
    div_coef: float = 0.0
    div_cosine: float = 0.9
    near_data_coef: float = 0.0
    cluster_on_push_cells: bool = False

    def __post_init__(self) -> None:
        if self.prototype_init not in ("uniform", "data"):
            raise ValueError(f"prototype_init must be 'uniform' or 'data', got {self.prototype_init!r}")
        if self.fa_coef < 0 or self.measure_map_coef < 0:
            raise ValueError(f"fa_coef and measure_map_coef must be >= 0, got {self.fa_coef}, {self.measure_map_coef}")
        if not 0.0 < self.push_foreground_share <= 1.0:
            raise ValueError(f"push_foreground_share must be in (0, 1], got {self.push_foreground_share}")
        if self.near_data_coef < 0:
            raise ValueError(f"near_data_coef must be >= 0, got {self.near_data_coef}")
        if self.div_coef < 0 or not -1.0 <= self.div_cosine < 1.0:
            raise ValueError(f"div_coef must be >= 0 and div_cosine in [-1, 1), got {self.div_coef}, {self.div_cosine}")
