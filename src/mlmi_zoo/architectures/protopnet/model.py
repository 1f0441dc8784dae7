"""ProtoPNet: "this looks like that" — a decision that is a sum over similarities to training patches.

Implements Chen, Li, Tao, Barnett, Su, Rudin, "This Looks Like That: Deep Learning for
Interpretable Image Recognition" (NeurIPS 2019): backbone -> add-on 1x1 convolutions (ReLU, Sigmoid)
-> prototype layer (similarity of ``P`` prototypes to every latent location) -> global max pooling
(or IAIA-BL's top-k average pooling, ``pool_top_k``) -> a bias-free last layer initialised to +1 for
a prototype's own class and -0.5 otherwise. The optional fine-annotation loss
(:mod:`.protopnet_training`) follows IAIA-BL (Barnett, Schwartz, Tao, Chen, Ren, Lo, Rudin, "A
case-based interpretable deep learning model for classification of mass lesions in digital
mammography", Nature Machine Intelligence 2021).

What we changed:

- One class serves 2D and 3D inputs (``spatial_dims``; 3D backbones through MONAI) with any
  number of input channels and non-square sizes; the backbone is cut at ``feature_stride`` (8 by
  default) so 64-px medical patches keep an 8x8 latent grid fine enough to localise evidence.
- Max pooling of similarities is computed as min pooling of distances followed by the (decreasing)
  similarity function, so ``forward`` evaluates the logarithm on ``(B, P)`` values only and never
  upsamples; ``explain`` computes maps and their input-resolution localisation.
- Prototypes can be switched off: a buffer mask multiplies the similarities before the last layer,
  so a disabled prototype contributes exactly 0 and the logit changes by exactly its contribution.
- An optional physical head (``config.quantities``) reports quantities in units at a given
  spacing: ``physical_head="regress"`` reads the globally averaged add-on features; ``"count"``
  measures lesion sizes by counting the lesion pixels of a fraction map predicted on small tiles
  from the image and the backbone grid (:class:`~mlmi_zoo.architectures.blocks.heads.LesionCountHead`),
  the map being the measurement's explanation.
- Push records (where each prototype comes from) are JSON metadata saved with the weights.
"""
from __future__ import annotations

import copy
import html
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from mlmi_zoo.architectures.blocks.backbones import create_backbone
from mlmi_zoo.architectures.baseline.model import resolve_spacing
from mlmi_zoo.architectures.blocks.heads import LesionCountHead, PhysicalHead, dihedral_mean
from mlmi_zoo.architectures.protopnet.prototypes import PrototypeLayer
from mlmi_zoo.base import InterpretableModel, ModelConfig
from mlmi_zoo.explanations import Explanation, html_table, image_to_png, png_data_uri
from mlmi_zoo.registry import register_backbones

__all__ = ["ProtoPNetConfig", "ProtoPNet", "PrototypeExplanation", "ProtoPNetOutputs", "AddOn"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProtoPNetConfig(ModelConfig):
    """ProtoPNet architecture and loss hyper-parameters.

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
        clst_coef: weight of the cluster cost (ProtoPNet: 0.8).
        sep_coef: weight of the separation cost; negative, so separation is rewarded (ProtoPNet: -0.08).
        l1_coef: L1 penalty on off-class last-layer weights (ProtoPNet: 1e-4), for sparse, positive
            reasoning.
        fa_coef: weight of the IAIA-BL fine-annotation loss on lesion masks; 0 turns it off.
        push_on_lesion: with lesion masks, push projects prototypes only onto latent cells whose
            receptive-field window lies mostly on a lesion, and training pulls prototypes towards
            such cells (the cluster cost), so each prototype is a piece of a lesion rather than of
            the background (a CNN with zero padding otherwise tends to match the crop border).
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
        measure_map_coef: weight of the fraction map's fit to the lesion masks (``"count"``, when
            the batch has masks).
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

    feature_stride: int = 8
    prototype_dim: int = 64
    prototypes_per_class: int = 5
    similarity: Literal["log_l2", "cosine"] = "log_l2"
    epsilon: float = 1e-4
    incorrect_class_weight: float = -0.5
    clst_coef: float = 0.8
    sep_coef: float = -0.08
    l1_coef: float = 1e-4
    fa_coef: float = 0.0
    push_on_lesion: bool = False
    padding_mode: Literal["zeros", "reflect"] = "zeros"
    pool_top_k: int = 1
    physical_head: Literal["regress", "count"] = "regress"
    measure_tile: int = 4
    measure_map_coef: float = 1.0
    measure_resample: bool = False
    measure_detach: bool = False
    measure_context: Literal["given", "canonical", "own"] = "given"
    measure_dihedral_views: bool = False
    prototype_init: Literal["uniform", "data"] = "uniform"

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
        if self.prototype_init not in ("uniform", "data"):
            raise ValueError(f"prototype_init must be 'uniform' or 'data', got {self.prototype_init!r}")
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


def _set_padding(backbone: nn.Module, mode: Literal["zeros", "reflect"]) -> None:
    """Set the padding mode of every padded convolution of ``backbone`` (``"zeros"``: unchanged)."""
    if mode == "zeros":
        return
    for module in backbone.modules():
        if (isinstance(module, nn.modules.conv._ConvNd) and isinstance(module.padding, tuple)
                and any(p > 0 for p in module.padding)):
            module.padding_mode = mode


@dataclass(frozen=True)
class ProtoPNetOutputs:
    """Everything one pass computes, for losses and explanations.

    Attributes:
        latent: (B, D, *latent) add-on output.
        distance_maps: (B, P, *latent) distance of each prototype to each location.
        min_distances: (B, P) minimum over the grid.
        similarities: (B, P) similarity at the best location, or the mean over the ``pool_top_k``
            best (not masked).
        logits: (B, C).
        quantities: (B, Q) standardised physical-head outputs, or None.
        lesion_fraction: (B, 1, *tiles) lesion fraction of each tile (``physical_head="count"``), or None.
    """

    latent: torch.Tensor  # (B, D, *latent)
    distance_maps: torch.Tensor  # (B, P, *latent)
    min_distances: torch.Tensor  # (B, P)
    similarities: torch.Tensor  # (B, P)
    logits: torch.Tensor  # (B, C)
    quantities: torch.Tensor | None  # (B, Q)
    lesion_fraction: torch.Tensor | None = None  # (B, 1, *tiles)


@dataclass(frozen=True, kw_only=True)
class PrototypeExplanation(Explanation):
    """Why a ProtoPNet decided: similarity to each prototype times its last-layer weight.

    ``logits == bias + contributions.sum(-1)`` exactly (to float rounding); the bias is zero.

    Attributes:
        similarities: (B, P) each prototype's pooled similarity in the image: the best location's,
            or the mean of the ``pool_top_k`` best (before the switch-off mask).
        similarity_maps: (B, P, *latent) similarity at every latent location.
        localization: (B, P, *spatial) similarity maps upsampled (bi/trilinear) to the input size.
        contributions: (B, C, P) last-layer weight x similarity x enabled.
        bias: (C,) zeros — ProtoPNet's last layer has no bias; kept so every family decomposes alike.
        prototype_ids: (P,) prototype numbers.
        prototype_classes: (P,) class each prototype belongs to.
        enabled: (P,) False for switched-off prototypes.
        prototype_sources: each prototype's push record (see ``push_prototypes``), or None before
            push.
        measurement_map: (B, 1, *spatial) lesion fraction the physical head counted at each pixel
            (``physical_head="count"``), or None.
    """

    family = "protopnet"
    decomposable = True

    similarities: torch.Tensor  # (B, P)
    similarity_maps: torch.Tensor  # (B, P, *latent)
    localization: torch.Tensor  # (B, P, *spatial)
    contributions: torch.Tensor  # (B, C, P)
    bias: torch.Tensor  # (C,)
    prototype_ids: torch.Tensor  # (P,)
    prototype_classes: torch.Tensor  # (P,)
    enabled: torch.Tensor  # (P,) bool
    prototype_sources: list[dict[str, Any] | None] | None = None
    measurement_map: torch.Tensor | None = None  # (B, 1, *spatial)

    def logits_from_contributions(self) -> torch.Tensor:
        """(B, C) bias + sum of prototype contributions."""
        return self.bias + self.contributions.sum(-1)

    def top_prototypes(self, i: int, k: int = 5, target: int | None = None) -> list[int]:
        """Prototype ids with the largest |contribution| to ``target`` (default: predicted class) for case ``i``."""
        c = int(self.predicted()[i]) if target is None else target
        order = self.contributions[i, c].abs().argsort(descending=True)
        return [int(p) for p in order[:k]]

    def html_sections(self, i: int, k: int = 5) -> list[tuple[str, str]]:
        """Input, decision, the top prototype's localisation and the top-``k`` prototypes."""
        sections = super().html_sections(i)
        c = int(self.predicted()[i])
        names = self.label_names or tuple(str(n) for n in range(self.logits.shape[1]))
        top = self.top_prototypes(i, k)
        if self.inputs is not None and top:
            j = top[0]
            uri = png_data_uri(image_to_png(self.inputs[i], self.localization[i, j]))
            sections.append((f"Where prototype #{j} ({names[int(self.prototype_classes[j])]}) looks",
                             f'<img src="{uri}" width="256">'))
        rows = []
        gallery = []
        for j in top:
            rec = self.prototype_sources[j] if self.prototype_sources else None
            source = "not pushed" if rec is None else f"case {rec['index']}, cell {rec['location']}, box {rec['box_px']} px"
            rows.append((j, names[int(self.prototype_classes[j])], f"{float(self.similarities[i, j]):.3f}",
                         f"{float(self.contributions[i, c, j]):+.3f}", "yes" if bool(self.enabled[j]) else "off", source))
            path = None if rec is None else rec.get("render_path")
            if path and Path(path).is_file():
                uri = png_data_uri(Path(path).read_bytes())
                gallery.append(f'<div class="card"><img src="{uri}" height="140"><br>prototype #{j}: '
                               f'{html.escape(source)}</div>')
        table = html_table(("prototype", "class", "similarity", f"contribution to {names[c]}", "enabled", "source"), rows)
        if gallery:
            table += '<div class="gallery">' + "".join(gallery) + "</div>"
        sections.append((f"Top {len(top)} prototypes for {names[c]}", table))
        if self.inputs is not None and self.measurement_map is not None and self.measurements:
            uri = png_data_uri(image_to_png(self.inputs[i], self.measurement_map[i, 0]))
            sizes = ", ".join(f"{m.name} {float(m.value[i]):.2f} {m.unit}" for m in self.measurements.values())
            sections.append(("What the measurement counted",
                             f'<img src="{uri}" width="256"><p>lesion fraction per tile; {html.escape(sizes)}</p>'))
        return sections


class AddOn(nn.Sequential):
    """ProtoPNet's add-on layers: 1x1 convolution, ReLU, 1x1 convolution, Sigmoid.

    The weights are those of the two convolutions (``add_on.0``, ``add_on.2``); a 1x1 convolution
    is a linear map over channels at every location, and is applied as such on the channels-last
    ``(B*L, F)`` matrix, which on small latent grids avoids the memory re-ordering of a convolution
    call and hands the prototype layer its ``(B*L, D)`` matrix without a copy.

    Args:
        in_channels: backbone channels.
        dim: prototype dimension ``D``.
        spatial_dims: 2 or 3.
    """

    def __init__(self, in_channels: int, dim: int, spatial_dims: int) -> None:
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        super().__init__(conv(in_channels, dim, 1), nn.ReLU(), conv(dim, dim, 1), nn.Sigmoid())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, F, *latent) -> (B, D, *latent), a view of channels-last memory."""
        first, _, second, _ = self
        assert isinstance(first, (nn.Conv2d, nn.Conv3d)) and isinstance(second, (nn.Conv2d, nn.Conv3d))  # built in __init__
        h = rearrange(feats, "b f ... -> (b ...) f")  # (B*L, F)
        h = F.linear(h, first.weight.flatten(1), first.bias).relu()
        z = torch.sigmoid(F.linear(h, second.weight.flatten(1), second.bias))  # (B*L, D)
        return z.unflatten(0, (feats.shape[0], *feats.shape[2:])).movedim(-1, 1)


class ProtoPNet(InterpretableModel[ProtoPNetConfig]):
    """Backbone -> add-on -> prototype layer -> max (or top-k average) pooling -> bias-free last layer.

    Args:
        config: a :class:`ProtoPNetConfig`.
    """

    family = "protopnet"
    config_class = ProtoPNetConfig

    prototype_class_identity: torch.Tensor  # (P, C) buffer, derived from the config
    prototype_mask: torch.Tensor  # (P,) buffer, 1 = enabled

    def __init__(self, config: ProtoPNetConfig) -> None:
        super().__init__(config)
        dims, D, P = config.spatial_dims, config.prototype_dim, config.num_prototypes
        self.backbone = create_backbone(config.backbone, config.in_channels, dims, config.feature_stride)
        _set_padding(self.backbone, config.padding_mode)
        self.add_on = AddOn(self.backbone.out_channels, D, dims)
        self.prototype_layer = PrototypeLayer(P, D, config.similarity, config.epsilon)
        self.last_layer = nn.Linear(P, config.num_classes, bias=False)
        classes = torch.arange(P) // config.prototypes_per_class  # (P,)
        # Derived from the config, so not saved; the switch-off mask is state, so it is.
        self.register_buffer("prototype_class_identity", F.one_hot(classes, config.num_classes).float(), persistent=False)  # (P, C)
        self.register_buffer("prototype_mask", torch.ones(P))  # (P,) 1 = enabled
        self.physical: PhysicalHead | LesionCountHead | None = None
        if config.quantities and config.physical_head == "count":
            own = None
            if config.measure_context == "own":
                own = create_backbone(config.backbone, config.in_channels, dims, config.feature_stride)
                _set_padding(own, config.padding_mode)
            self.physical = LesionCountHead(self.backbone.out_channels, config.quantities, dims, self.backbone.stride,
                                            config.measure_tile, config.in_channels, self.backbone.offset,
                                            canonical_spacing=config.spacing if config.measure_resample else None,
                                            context_backbone=own)
        elif config.quantities:
            self.physical = PhysicalHead(D, config.quantities)
        self._prototype_sources: list[dict[str, Any] | None] | None = None
        self.reset_last_layer()

    # -- structure ------------------------------------------------------------------------------
    @property
    def num_prototypes(self) -> int:
        return self.config.num_prototypes

    @property
    def prototype_classes(self) -> torch.Tensor:
        """(P,) class index of each prototype."""
        return self.prototype_class_identity.argmax(1)

    @property
    def prototype_sources(self) -> list[dict[str, Any] | None] | None:
        """Push record of each prototype (None before push)."""
        return self._prototype_sources

    def set_prototype_sources(self, records: list[dict[str, Any] | None] | None) -> None:
        """Store push records (one per prototype), or None to drop them (prototypes trained again)."""
        if records is not None and len(records) != self.num_prototypes:
            raise ValueError(f"expected {self.num_prototypes} prototype records, got {len(records)}")
        self._prototype_sources = None if records is None else list(records)

    @torch.no_grad()
    def reset_last_layer(self) -> None:
        """ProtoPNet's initialisation: +1 from a prototype to its class, ``incorrect_class_weight`` elsewhere."""
        own = self.prototype_class_identity.T  # (C, P)
        self.last_layer.weight.copy_(own + self.config.incorrect_class_weight * (1 - own))

    # -- switch-off -------------------------------------------------------------------------------
    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.num_prototypes]
        if bad:
            raise ValueError(f"prototype ids must be in [0, {self.num_prototypes}), got {bad}")
        return ids

    @torch.no_grad()
    def disable_prototypes(self, ids: Iterable[int]) -> None:
        """Switch prototypes off: they then contribute exactly 0 to every logit."""
        self.prototype_mask[self._check_ids(ids)] = 0.0

    @torch.no_grad()
    def enable_prototypes(self, ids: Iterable[int]) -> None:
        """Switch prototypes back on."""
        self.prototype_mask[self._check_ids(ids)] = 1.0

    @property
    def enabled(self) -> torch.Tensor:
        """(P,) bool, False for switched-off prototypes."""
        return self.prototype_mask > 0

    # -- computation ------------------------------------------------------------------------------
    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *spatial) network input -> (B, D, *latent) add-on output (no input checks)."""
        return self.add_on(self.backbone(x))

    def pooled_similarities(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, *latent) add-on output -> (B, P) pooled similarities (before the switch-off mask)."""
        layer, k = self.prototype_layer, self.config.pool_top_k
        if k == 1:  # min pooling of distances: the similarity is computed on (B, P) values only
            return layer.similarity(layer.nearest_distances(z))
        return layer.pooled_similarity(layer.distances(z), k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *spatial) -> (B, C) logits."""
        self.validate_input(x)
        return self.last_layer(self.pooled_similarities(self.latent(x)) * self.prototype_mask)

    def forward_parts(self, x: torch.Tensor, spacing: torch.Tensor | None = None) -> ProtoPNetOutputs:
        """One pass returning latent, distances, similarities, logits and physical outputs.

        Args:
            x: (B, C_in, *spatial) network input.
            spacing: (B, dims) mm per pixel of ``x``; only a count head that resamples uses it
                (without it, ``x`` is taken to be at the canonical spacing).
        """
        self.validate_input(x)
        feats = self.backbone(x)  # (B, F, *latent)
        z = self.add_on(feats)
        maps, min_d = self.prototype_layer.min_distances(z)
        k = self.config.pool_top_k
        sims = self.prototype_layer.similarity(min_d) if k == 1 else self.prototype_layer.pooled_similarity(maps, k)  # (B, P)
        logits = self.last_layer(sims * self.prototype_mask)
        quantities, fractions = None, None
        if isinstance(self.physical, LesionCountHead):
            fractions = self._count_fractions(self.physical, x, feats, spacing)
            if self.config.measure_dihedral_views and not self.training:
                fractions = self._dihedral_fractions(self.physical, x, fractions, spacing)
            quantities = self.physical.standardised(fractions)
        elif self.physical is not None:
            quantities = self.physical(reduce(z, "b d ... -> b d", "mean"))
        return ProtoPNetOutputs(z, maps, min_d, sims, logits, quantities, fractions)

    def _count_fractions(self, head: LesionCountHead, x: torch.Tensor, feats: torch.Tensor | None,
                         spacing: torch.Tensor | None) -> torch.Tensor:
        """The count head's (B, 1, *tiles) fraction map of ``x`` (``head`` is ``self.physical``). Its
        context is the given pass's features ``feats``, or a pass on ``x`` resampled to the canonical
        grid through the model's backbone (``measure_context="canonical"``) or the head's own
        (``"own"``); detached with ``measure_detach``."""
        canonical = self.config.measure_context != "given"
        if canonical:
            own = head.context_backbone
            feats = (self.backbone if own is None else own)(head.to_canonical(x, spacing))
        assert feats is not None
        feats = feats.detach() if self.config.measure_detach else feats
        return head.fraction_map(x, feats, spacing, canonical_feats=canonical)

    def _dihedral_fractions(self, head: LesionCountHead, x: torch.Tensor, identity: torch.Tensor,
                            spacing: torch.Tensor | None) -> torch.Tensor:
        """The count head's (B, 1, *tiles) map averaged over the 8 views of the image plane
        (``identity`` is the first view's map), each turned back onto ``x``'s tiles."""
        def one_view(view: torch.Tensor, view_spacing: torch.Tensor | None) -> tuple[torch.Tensor]:
            feats = self.backbone(view) if self.config.measure_context == "given" else None
            return (self._count_fractions(head, view, feats, view_spacing),)

        given = None if spacing is None else self.input_spec.check_spacing(spacing, batch=x.shape[0]).to(x.device)
        mean = dihedral_mean(one_view, x, given, (True,), identity=(identity,))[0]
        assert mean is not None  # every view gives a map
        return mean

    @torch.no_grad()
    def explain(self, x: torch.Tensor, spacing: Any = None) -> PrototypeExplanation:
        """Explain ``x``: similarities, their maps and localisation, contributions, measurements.

        Args:
            x: (B, C_in, *spatial) network input (after the intensity transform).
            spacing: mm per axis, one for the batch or one row per image, for the physical head;
                default: the model's canonical spacing.
        """
        s = resolve_spacing(self, spacing, x.shape[0], x.device)
        parts = self.forward_parts(x, s)
        maps = self.prototype_layer.similarity(parts.distance_maps)  # (B, P, *latent)
        localization = self.backbone.to_input(maps, x.shape[2:])  # (B, P, *spatial), on receptive-field centres
        masked = parts.similarities * self.prototype_mask  # (B, P)
        contributions = torch.einsum("bp,cp->bcp", masked, self.last_layer.weight)  # (B, C, P)
        measurements = {}
        if self.physical is not None and parts.quantities is not None and s is not None:
            measurements = self.physical.measure(parts.quantities, s)
        measurement_map = None  # (B, 1, *spatial)
        if isinstance(self.physical, LesionCountHead) and parts.lesion_fraction is not None:
            measurement_map = self.physical.to_input(parts.lesion_fraction, x.shape[2:], s)
        return PrototypeExplanation(
            logits=parts.logits,
            label_names=self.label_names,
            measurements=measurements,
            inputs=x,
            similarities=parts.similarities,
            similarity_maps=maps,
            localization=localization,
            contributions=contributions,
            bias=torch.zeros(self.num_classes, device=x.device),
            prototype_ids=torch.arange(self.num_prototypes, device=x.device),
            prototype_classes=self.prototype_classes,
            enabled=self.enabled,
            prototype_sources=copy.deepcopy(self._prototype_sources),
            measurement_map=measurement_map,
        )

    # -- metadata ---------------------------------------------------------------------------------
    def export_metadata(self) -> dict[str, Any]:
        """Push records, saved in config.json next to the weights."""
        return {} if self._prototype_sources is None else {"prototype_sources": copy.deepcopy(self._prototype_sources)}

    def import_metadata(self, metadata: dict[str, Any]) -> None:
        """Restore push records written by :meth:`export_metadata`."""
        records = metadata.get("prototype_sources")
        if records is not None and len(records) != self.num_prototypes:
            # Loading with overrides that change the classes re-initialises the prototypes.
            log.warning("dropping %d push records: this configuration has %d prototypes", len(records), self.num_prototypes)
            records = None
        self.set_prototype_sources(None if records is None else [None if r is None else dict(r) for r in records])


register_backbones(ProtoPNet, ("resnet8", "resnet18"), "ProtoPNet (This Looks Like That) on a {backbone} backbone.")

