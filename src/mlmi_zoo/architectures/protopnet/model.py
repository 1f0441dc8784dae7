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
  spacing: by default an MLP reads the globally averaged add-on features; with ``count_head``, it
  measures lesion sizes by counting the lesion pixels of a fraction map predicted on small tiles
  from the image and the backbone grid (:class:`~mlmi_zoo.architectures.blocks.heads.LesionCountHead`),
  the map being the measurement's explanation.
- Push records (where each prototype comes from) are JSON metadata saved with the weights.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from mlmi_zoo.architectures.baseline.model import resolve_spacing
from mlmi_zoo.architectures.blocks.backbones import create_backbone
from mlmi_zoo.architectures.blocks.heads import (
    LesionCountHead,
    PhysicalHead,
    dihedral_mean,
)
from mlmi_zoo.architectures.protopnet.config import ProtoPNetConfig
from mlmi_zoo.architectures.protopnet.explanations import PrototypeExplanation
from mlmi_zoo.architectures.protopnet.prototypes import PrototypeLayer
from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.registry import register_backbones

__all__ = ["ProtoPNet", "ProtoPNetOutputs", "AddOn"]

log = logging.getLogger(__name__)


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
        lesion_fraction: (B, 1, *tiles) lesion fraction of each tile (with ``count_head``), or None.
    """

    latent: torch.Tensor  # (B, D, *latent)
    distance_maps: torch.Tensor  # (B, P, *latent)
    min_distances: torch.Tensor  # (B, P)
    similarities: torch.Tensor  # (B, P)
    logits: torch.Tensor  # (B, C)
    quantities: torch.Tensor | None  # (B, Q)
    lesion_fraction: torch.Tensor | None = None  # (B, 1, *tiles)


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
        self.backbone = create_backbone(config.backbone, config.in_channels, dims, config.feature_stride, tile=config.tile_px)
        _set_padding(self.backbone, config.padding_mode)
        self.add_on = AddOn(self.backbone.out_channels, D, dims)
        self.prototype_layer = PrototypeLayer(P, D, config.similarity, config.epsilon)
        self.last_layer = nn.Linear(P, config.num_classes, bias=False)
        classes = torch.arange(P) // config.prototypes_per_class  # (P,)
        # Derived from the config, so not saved; the switch-off mask is state, so it is.
        self.register_buffer("prototype_class_identity", F.one_hot(classes, config.num_classes).float(), persistent=False)  # (P, C)
        self.register_buffer("prototype_mask", torch.ones(P))  # (P,) 1 = enabled
        self.physical: PhysicalHead | LesionCountHead | None = None
        count = config.count_head
        if config.quantities and count is not None:
            own = None
            if count.context == "own":
                own = create_backbone(config.backbone, config.in_channels, dims, config.feature_stride)
                _set_padding(own, config.padding_mode)
            self.physical = LesionCountHead(self.backbone.out_channels, config.quantities, dims, self.backbone.stride,
                                            count.tile, config.in_channels, self.backbone.offset,
                                            canonical_spacing=config.spacing if count.resample else None,
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
            assert self.config.count_head is not None  # a LesionCountHead is built from it
            if self.config.count_head.dihedral_views and not self.training:
                fractions = self._dihedral_fractions(self.physical, x, fractions, spacing)
            quantities = self.physical.standardised(fractions)
        elif self.physical is not None:
            quantities = self.physical(reduce(z, "b d ... -> b d", "mean"))
        return ProtoPNetOutputs(z, maps, min_d, sims, logits, quantities, fractions)

    def _count_fractions(self, head: LesionCountHead, x: torch.Tensor, feats: torch.Tensor | None,
                         spacing: torch.Tensor | None) -> torch.Tensor:
        """The count head's (B, 1, *tiles) fraction map of ``x`` (``head`` is ``self.physical``). Its
        context is the given pass's features ``feats``, or a pass on ``x`` resampled to the canonical
        grid through the model's backbone (``count_head.context="canonical"``) or the head's own
        (``"own"``); detached with ``count_head.detach``."""
        count = self.config.count_head
        assert count is not None  # only the count head calls this
        canonical = count.context != "given"
        if canonical:
            own = head.context_backbone
            feats = (self.backbone if own is None else own)(head.to_canonical(x, spacing))
        assert feats is not None
        feats = feats.detach() if count.detach else feats
        return head.fraction_map(x, feats, spacing, canonical_feats=canonical)

    def _dihedral_fractions(self, head: LesionCountHead, x: torch.Tensor, identity: torch.Tensor,
                            spacing: torch.Tensor | None) -> torch.Tensor:
        """The count head's (B, 1, *tiles) map averaged over the 8 views of the image plane
        (``identity`` is the first view's map), each turned back onto ``x``'s tiles."""
        count = self.config.count_head
        assert count is not None  # only the count head calls this

        def one_view(view: torch.Tensor, view_spacing: torch.Tensor | None) -> tuple[torch.Tensor]:
            feats = self.backbone(view) if count.context == "given" else None
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
        s = resolve_spacing(self, spacing, x)
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


register_backbones(ProtoPNet, ("resnet8", "resnet18", "tf_efficientnet_lite0"), "ProtoPNet (This Looks Like That) on a {backbone} backbone.")

