"""Concept bottleneck models: image -> named concepts -> label, with test-time interventions.

Reimplements Koh, Nguyen, Tang, Mussmann, Pierson, Kim and Liang, "Concept Bottleneck Models",
ICML 2020: a network predicts human-interpretable concepts, and the label is predicted from those
concepts only, so a clinician can read, and correct, what the decision rests on.

What we changed with respect to the paper:

- **typed concepts with units** (:mod:`.concepts`): binary, ordinal, categorical (one logit per
  level) and continuous concepts in physical units. Lengths, areas and volumes are predicted in the
  pixel domain and converted with the spacing, as the physical heads do, so ``diameter_mm``
  follows the spacing the user passes; ``mean_hu`` is not scaled.
- **spatial concept maps**: the concept predictor is a 1x1 convolution applied to the backbone's
  feature map *before* spatial pooling, so every bottleneck unit has a map whose mean is exactly
  its pooled logit (the 1x1 convolution is linear, so pooling commutes with it).
- optional **attention pooling** (:attr:`CBMConfig.pooling`): with global mean pooling a concept
  can be read from everywhere, and is: a ResNet cell sees far beyond its own window, so "the
  nodule is small" is best told by the many cells that see no nodule, and the map of such a unit
  is low on the lesion and high around it. Attention pooling reads every concept where one shared,
  learnt spatial attention ``a`` looks (a 1x1 convolution and a softmax over the grid: the
  attention pooling of Ilse, Tomczak and Welling, ICML 2018, over latent cells): the concept logit
  is ``sum_p a_p m_k(p)``, and the unit's map is the per-location term ``N a_p m_k(p)`` (``N``
  cells), whose mean is still exactly the logit. Continuous concepts (a diameter, a mean density)
  are measurements of the whole lesion and stay mean-pooled: read from the one cell the attention
  picks they vary more between two renderings of one object (on the nodule phantom the diameter's
  spacing-invariance difference grew from 0.48 to 0.57 mm on 200 test cases). The level logits of an
  ordinal/categorical concept are centred over its levels at every location (a softmax does not
  change when all its logits move together, so probabilities, losses and decisions are those of
  the uncentred logits), so the most probable level always has a non-negative logit and its map
  shows where it was read rather than an arbitrary offset.
- optional **fine-annotation cost on the attention** (:attr:`CBMConfig.fa_coef`), after IAIA-BL
  (Barnett, Schwartz, Tao, Chen, Ren, Lo and Rudin, Nature Machine Intelligence 2021), which
  penalises prototype activation outside the annotated lesion: here the attention mass that falls
  on latent cells with no lesion in their window is penalised (:mod:`.cbm_training`). Where it is
  switched on, the concept maps are *taught* to lie on the lesion by the masks of the training
  split, so their localization on held-out cases measures how well that teaching generalises, not
  where an unsupervised model chose to look.
- optional **max pooling of binary concepts** (:attr:`CBMConfig.pooling` ``"max"``): a finding that is
  present when it is seen anywhere (a lesion type in a fundus photograph) is read at its strongest
  latent cell, so the concept's map says where; the logit is exactly the map's maximum, and the map
  can be taught cell by cell from lesion masks (:mod:`.training`, ``map_coef``). An area concept stays
  mean-pooled: the mean of a per-cell map is a sum over cells, the form an area has; with
  :attr:`CBMConfig.area_maps` each cell's term is the share of the cell the finding covers (a sigmoid)
  times the cell's pixels, so the area is a sum of per-cell shares, never negative, and each share can
  be taught from the finding's masks.
- **missing concept labels are masked** in the loss, and the concept losses are class-balanced.
- the concept -> label head is linear by default, which makes the decision an exact sum of
  ``weight x concept`` terms; an MLP head is offered and documented as not decomposable.
- **size as a category as well as a length** (the nodule default): a linear head cannot put a
  threshold on a continuous concept, but each level of an ordinal concept is its own bottleneck
  unit (a one-hot in the true vector), so with ``size_category`` (Lung-RADS-like cut points at 8
  and 15 mm) a size-threshold rule is a weighted sum of concepts, and correcting every concept can
  reach the accuracy of the true concepts while the decision stays an exact sum.
- optional **resampling onto the canonical grid** (:attr:`CBMConfig.resample`): given the spacing,
  the image is resampled to the canonical spacing (same size and centre) before the concept
  predictor and its maps are sampled back onto the input's pixels, so sizes the network sees are
  physical ones; the same object at two spacings then gives nearly the same concepts.
- optional **dihedral averaging at inference** (:attr:`CBMConfig.dihedral_views`): in eval mode the
  concept maps (and the attention) are the mean over the eight flips and quarter turns of the
  image plane, each map turned back onto the original grid. Every concept logit is still the exact
  mean of its map and the label head is unchanged, so the decomposition stays exact; what one
  view gets wrong at a boundary pixel the others average out (test-time augmentation with the
  group the model was trained under, so the predictor no longer depends on the orientation).

Training modes (Koh et al. section 3) are run by :class:`~.cbm_training.CBMTraining`; what ``explain``
returns is in :mod:`.explanations`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from einops import rearrange, reduce
from torch import nn

from mlmi_zoo.architectures.blocks.backbones import create_backbone
from mlmi_zoo.architectures.baseline.model import resolve_spacing
from mlmi_zoo.architectures.cbm.concept_values import parse_concept_value
from mlmi_zoo.architectures.cbm.concepts import ConceptCodec
from mlmi_zoo.architectures.cbm.config import NODULE_CONCEPTS, CBMConfig
from mlmi_zoo.architectures.cbm.explanations import ConceptExplanation, MLPConceptExplanation
from mlmi_zoo.architectures.blocks.heads import canonical_scale, dihedral_mean, scaled_sample
from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.registry import register_backbones
from mlmi_zoo.specs import ConceptSpec, Measurement

__all__ = ["CBMConfig", "CBM", "NODULE_CONCEPTS"]


class CBM(InterpretableModel[CBMConfig]):
    """Backbone -> 1x1-conv concept maps -> global mean (or attention) pooling -> concept bottleneck
    -> label head.

    ``forward(x)`` returns label logits (B, C) and needs no spacing: the label head sees
    pixel-domain sizes. Data with varying spacing should be resampled to the canonical spacing so
    that those sizes are physical ones: with ``config.resample`` the model does it itself whenever a
    spacing is passed (``concept_logits(x, spacing)``, ``explain``, ``intervene``; ``forward(x)``
    takes ``x`` to be at the canonical spacing already).
    """

    family = "cbm"
    config_class = CBMConfig

    _attended: torch.Tensor  # (K,) buffer
    _maxed: torch.Tensor  # (K,) buffer

    def __init__(self, config: CBMConfig) -> None:
        super().__init__(config)
        self.backbone = create_backbone(config.backbone, config.in_channels, config.spatial_dims, config.feature_stride)
        self.codec = ConceptCodec(config.concepts, balance=config.balance_concepts, calibrated=config.calibrated_concepts)
        conv = nn.Conv3d if config.spatial_dims == 3 else nn.Conv2d
        f = self.backbone.out_channels
        if config.concept_hidden:
            self.concept_head: nn.Module = nn.Sequential(
                conv(f, config.concept_hidden, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                conv(config.concept_hidden, self.codec.width, kernel_size=1))
        else:
            self.concept_head = conv(f, self.codec.width, kernel_size=1)
        # One attention map shared by every concept: where the model reads its concepts.
        self.attention_head = (conv(self.backbone.out_channels, 1, kernel_size=1)
                               if config.pooling == "attention" else None)
        # Units of ordinal/categorical concepts, whose logits are centred over their levels.
        self._level_slices = tuple(sl for s, sl in zip(config.concepts, self.codec.slices)
                                   if s.kind in ("ordinal", "categorical"))
        # (K,) 1 for units read through the attention, 0 for continuous (mean-pooled) ones.
        attended = torch.cat([torch.full((s.width,), float(s.kind != "continuous")) for s in config.concepts])
        self.register_buffer("_attended", attended, persistent=False)
        # (K,) True for units read at their strongest cell (pooling="max": the binary concepts).
        maxed = torch.cat([torch.full((s.width,), config.pooling == "max" and s.kind == "binary") for s in config.concepts])
        self.register_buffer("_maxed", maxed, persistent=False)
        # a Python bool, from the config (which refuses max pooling without a binary concept): the graph of
        # forward does not branch on a tensor, nor on a meta one
        self._any_maxed = config.pooling == "max"
        self._spacing_unit = config.spacing_unit  # read once: pint has no place in a compiled forward
        # (unit, continuous index) of each area read as a sum of per-cell shares (config.area_maps)
        names = [c.name for c in config.concepts]
        self._share_units = tuple((self.codec.slices[names.index(a)].start, self.codec.continuous.index(names.index(a)))
                                  for a, _ in config.area_maps)
        k, c = self.codec.width, config.num_classes
        if config.head == "linear":
            self.label_head: nn.Module = nn.Linear(k, c)
        else:
            self.label_head = nn.Sequential(nn.Linear(k, config.head_hidden), nn.ReLU(), nn.Linear(config.head_hidden, c))

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def concept_specs(self) -> tuple[ConceptSpec, ...]:
        return self.config.concepts

    @property
    def num_concepts(self) -> int:
        """Number of concepts ``Kc``."""
        return self.codec.num_concepts

    @property
    def concept_names(self) -> tuple[str, ...]:
        """Names of the ``K`` bottleneck units."""
        return self.codec.unit_names

    @property
    def spacing_unit(self) -> str:
        """``"DD"`` when the concepts measure in optic-disc diameters, else ``"mm"`` (the input spec carries it)."""
        return self._spacing_unit

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, K, *latent) concept maps -> (B, K) concept logits: the maximum over cells for the units
        ``pooling="max"`` reads at their strongest cell, the mean for the others."""
        mean = reduce(maps, "b k ... -> b k", "mean")
        if not self._any_maxed:
            return mean
        return torch.where(self._maxed.to(maps.device), reduce(maps, "b k ... -> b k", "max"), mean)

    def _area_terms(self, maps: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
        """Turn the head's logits of each ``area_maps`` unit into its per-cell terms of the standardised area.

        A cell's share ``s_p = sigmoid(l_p)`` of its ``P`` pixels (the image's pixels over the cells) is lesion;
        the term ``(N P s_p - loc) / scale`` over the ``N`` cells has mean ``(P sum_p s_p - loc) / scale``: the
        pixel-domain area ``P sum_p s_p``, standardised as the codec standardises the concept's targets.
        """
        if not self._share_units:
            return maps
        cells = math.prod(maps.shape[2:])
        pixels = math.prod(spatial) / cells
        channels = list(maps.unbind(1))
        for unit, c in self._share_units:
            area = cells * pixels * torch.sigmoid(maps[:, unit])
            channels[unit] = (area - self.codec.loc[c]) / self.codec.scale[c]
        return torch.stack(channels, 1)

    def cell_shares(self, maps: torch.Tensor, area: str, spatial: tuple[int, ...]) -> torch.Tensor:
        """(B, K, *latent) concept maps -> (B, *latent) share of each cell covered by the finding of ``area``
        (an ``area_maps`` concept), on an input of ``spatial`` pixels; the inverse of :meth:`_area_terms`."""
        j = [c.name for c in self.concept_specs].index(area)
        unit, c = self.codec.slices[j].start, self.codec.continuous.index(j)
        cells = math.prod(maps.shape[2:])
        pixels = math.prod(spatial) / cells
        return (maps[:, unit] * self.codec.scale[c] + self.codec.loc[c]) / (cells * pixels)

    # -- canonical grid ---------------------------------------------------------------------------
    def _grid_scale(self, x: torch.Tensor, spacing: Any) -> torch.Tensor | None:
        """(B, dims) canonical / given spacing in ``affine_grid`` axis order (last axis first), or
        ``None`` when the input is used as given (no resampling, no spacing, or already canonical)."""
        if not self.config.resample or spacing is None:
            return None
        return canonical_scale(self.config.spacing, self.input_spec.check_spacing(spacing, batch=x.shape[0]), x)

    def to_canonical(self, x: torch.Tensor, spacing: Any = None) -> torch.Tensor:
        """(B, C, *S) images at ``spacing`` -> the same field around the centre on the canonical grid.

        The identity unless ``config.resample`` is set and a spacing other than the canonical one is
        given. Bilinear; beyond the image's field of view (a finer spacing covers less than the
        canonical grid) the value is 0, the low end of the intensity window.
        """
        scale = self._grid_scale(x, spacing)
        return x if scale is None else scaled_sample(x, scale)

    def from_canonical(self, maps: torch.Tensor, spacing: Any = None) -> torch.Tensor:
        """Inverse of :meth:`to_canonical` for maps (B, K, *S) on the canonical grid."""
        scale = self._grid_scale(maps, spacing)
        return maps if scale is None else scaled_sample(maps, 1.0 / scale)

    def codec_spacing(self, spacing: Any) -> torch.Tensor | None:
        """The spacing that converts this model's pixel-domain values: the canonical one when the
        model resamples its inputs (then a pixel is always a canonical pixel), else ``spacing``."""
        if not self.config.resample or spacing is None:
            return spacing
        s = torch.as_tensor(spacing, dtype=torch.float32)
        batch = s.shape[0] if s.ndim == 2 else 1
        return torch.tensor(self.config.spacing, dtype=torch.float32, device=s.device).expand(batch, -1)

    # -- the computation --------------------------------------------------------------------------
    def _centre_levels(self, maps: torch.Tensor) -> torch.Tensor:
        """Subtract, at every location, the mean over levels of each ordinal/categorical concept."""
        if not self._level_slices:
            return maps
        parts, start = [], 0
        for sl in self._level_slices:
            parts += [maps[:, start:sl.start], maps[:, sl] - maps[:, sl].mean(1, keepdim=True)]
            start = sl.stop
        parts.append(maps[:, start:])
        return torch.cat(parts, 1)

    def concept_maps_and_attention(self, x: torch.Tensor,
                                   spacing: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent concept maps and the attention they are pooled with.

        Args:
            x: (B, C_in, *spatial) network input (after the intensity transform).
            spacing: (dims,) or (B, dims) mm per pixel of ``x``; only used when ``config.resample``.

        Returns:
            ``(maps, attention)``: maps (B, K, *latent) whose spatial mean (maximum for the units
            ``pooling='max'`` reads at their strongest cell) is each concept logit
            (mean pooling: the 1x1-conv outputs; attention pooling: ``N a_p m_k(p)`` with level
            logits centred, continuous units as mean pooling gives them), and the attention (B, 1, *latent) summing to 1 over the grid, or
            ``None`` with mean pooling. On the canonical grid when the model resamples.
        """
        self.validate_input(x)
        if self._averages_views:
            # the means (the concept logits) are exact; a latent cell turned back lies right only to
            # within the stride (the explanation's maps are averaged on the input's pixels, _concept_pass)
            maps, attention = dihedral_mean(self._maps_and_attention, x, self._given_spacing(x, spacing), (True, True))
            assert maps is not None  # every view gives maps
            return maps, attention
        return self._maps_and_attention(x, spacing)

    @property
    def _averages_views(self) -> bool:
        """Whether outputs are averaged over the dihedral views (``dihedral_views``, eval mode)."""
        return self.config.dihedral_views and not self.training

    def _maps_and_attention(self, x: torch.Tensor, spacing: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass of the concept network; see :meth:`concept_maps_and_attention`."""
        x = self.to_canonical(x, spacing)
        feats = self.backbone(x)
        maps = self._area_terms(self.concept_head(feats), tuple(x.shape[2:]))  # (B, K, *latent)
        if self.attention_head is None:
            return maps, None
        scores = self.attention_head(feats)  # (B, 1, *latent)
        attention = rearrange(scores, "b 1 ... -> b (...)").softmax(-1).reshape(scores.shape)
        cells = attention[0, 0].numel()
        # N a_p m_k(p): the mean over the grid is sum_p a_p m_k(p), the attention-pooled logit;
        # continuous units keep weight 1 (mean pooling).
        attended = self._attended.view(1, -1, *([1] * (maps.ndim - 2))).to(maps.dtype)
        weight = attended * (attention * cells) + (1.0 - attended)  # (B, K, *latent)
        return self._centre_levels(maps) * weight, attention

    def concept_maps_latent(self, x: torch.Tensor, spacing: Any = None) -> torch.Tensor:
        """(B, C_in, *spatial) -> (B, K, *latent) concept maps whose spatial means (maxima for max-pooled units)
        are the concept logits (on the canonical grid when the model resamples and ``spacing`` is given); see
        :meth:`concept_maps_and_attention`."""
        return self.concept_maps_and_attention(x, spacing)[0]

    def concept_logits(self, x: torch.Tensor, spacing: Any = None) -> torch.Tensor:
        """(B, C_in, *spatial) -> (B, K) raw concept outputs (logits / standardised values).

        Args:
            x: network input (after the intensity transform).
            spacing: (dims,) or (B, dims) mm per pixel of ``x``; only used when ``config.resample``.
        """
        return self.pool(self.concept_maps_latent(x, spacing))

    def predict_label(self, concept_vector: torch.Tensor) -> torch.Tensor:
        """(B, K) bottleneck vectors -> (B, C) label logits (the concept -> label head)."""
        return self.label_head(concept_vector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.concept_logits(x)  # (B, K)
        return self.predict_label(self.codec.bottleneck(raw))  # (B, C)

    # -- concept vectors from values a person gives --------------------------------------------------
    def true_bottleneck(self, values: torch.Tensor, spacing: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Kc) natural-unit concept values -> (B, K) bottleneck vectors.

        Missing (NaN) concepts are imputed from training-split statistics stored in the model.

        Args:
            values: binary 0..1, level index, continuous in the concept's unit; NaN = missing.
            spacing: (B, dims) mm of the image the values describe, for length/area/volume concepts.
        """
        return self.codec.target_bottleneck(self.internal_targets(values, spacing))

    def internal_targets(self, values: torch.Tensor, spacing: Any = None) -> torch.Tensor:
        """(B, Kc) natural-unit concept values of images at ``spacing`` -> (B, Kc) loss targets."""
        return self.codec.to_internal(values, self.codec_spacing(spacing))

    def corrected_bottleneck(self, vector: torch.Tensor, values: torch.Tensor, known: torch.Tensor,
                             spacing: torch.Tensor | None = None) -> torch.Tensor:
        """Replace the ``known`` concepts of predicted vectors (B, K) by ``values`` (B, Kc, natural)."""
        values = torch.where(known, values.to(vector.device, torch.float32), torch.nan)
        if torch.isnan(values[known]).any():
            raise ValueError("an intervention marks a concept as known but gives NaN; give a value or set known=False")
        given = self.true_bottleneck(values, spacing)  # (B, K)
        return torch.where(self.codec.unit_mask(known), given.to(vector.dtype), vector)

    # -- explanation and interventions --------------------------------------------------------------
    def _explanation(self, x: torch.Tensor, maps: torch.Tensor, raw: torch.Tensor, vector: torch.Tensor,
                     spacing: torch.Tensor | None, intervened: torch.Tensor,
                     attention: torch.Tensor | None = None) -> ConceptExplanation:
        logits = self.predict_label(vector)  # (B, C)
        concepts = self.codec.describe(vector, self.codec_spacing(spacing))
        measurements = {k: v for k, v in concepts.items() if isinstance(v, Measurement)}
        explanation_class: type[ConceptExplanation] = MLPConceptExplanation
        contributions, bias = None, None  # the mlp head is not a sum of concept terms
        if isinstance(self.label_head, nn.Linear):  # head="linear"
            weight = self.label_head.weight.detach()  # (C, K)
            contributions = rearrange(vector, "b k -> b 1 k") * weight  # (B, C, K)
            bias = self.label_head.bias.detach().clone()  # (C,)
            explanation_class = ConceptExplanation
        return explanation_class(logits=logits, label_names=self.label_names, measurements=measurements, inputs=x,
                                 concepts=concepts, concept_vector=vector, concept_logits=raw, concept_maps=maps,
                                 concept_names=self.concept_names, concept_specs=self.concept_specs,
                                 contributions=contributions, bias=bias, intervened=intervened, attention=attention)

    def _concept_pass(self, x: torch.Tensor, spacing: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Concept maps (B, K, *spatial) and attention (B, 1, *spatial) on the input's pixels, and
        the raw concept outputs (B, K). With ``dihedral_views`` (eval mode) the outputs are the mean
        over the 8 views and each view's maps are turned back on the input's pixels, where a flip
        is exact (on the latent grid it is not: its cells sit off the image's centre)."""
        if not self._averages_views:
            return self._one_view(x, spacing)
        maps, raw, attention = dihedral_mean(self._one_view, x, self._given_spacing(x, spacing), (True, False, True))
        assert maps is not None and raw is not None  # every view gives maps and concept outputs
        return maps, raw, attention

    def _one_view(self, x: torch.Tensor, spacing: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        maps, attention = self._maps_and_attention(x, spacing)  # (B, K, *latent), (B, 1, *latent)
        raw = self.pool(maps)
        upsampled = self.from_canonical(self.backbone.to_input(maps, x.shape[2:]), spacing)  # on the input's pixels
        if attention is not None:
            attention = self.from_canonical(self.backbone.to_input(attention, x.shape[2:]), spacing)
        return upsampled, raw, attention

    def _given_spacing(self, x: torch.Tensor, spacing: Any) -> torch.Tensor | None:
        return None if spacing is None else self.input_spec.check_spacing(spacing, batch=x.shape[0]).to(x.device)

    @torch.no_grad()
    def explain(self, x: torch.Tensor, spacing: Any = None) -> ConceptExplanation:
        """Concepts (in units), their maps, and the label as a sum of concept contributions.

        Args:
            x: (B, C_in, *spatial) network input (after the intensity transform).
            spacing: (dims,) or (B, dims) mm per pixel for length/area/volume concepts; default:
                the model's canonical spacing.
        """
        s = resolve_spacing(self, spacing, x)
        maps, raw, attention = self._concept_pass(x, s)
        intervened = torch.zeros(x.shape[0], self.num_concepts, dtype=torch.bool, device=x.device)
        return self._explanation(x, maps, raw, self.codec.bottleneck(raw), s, intervened, attention)

    @torch.no_grad()
    def intervene_vector(self, x: torch.Tensor, values: torch.Tensor, known: torch.Tensor,
                         spacing: Any = None) -> ConceptExplanation:
        """Fix concepts per case and recompute everything downstream (batched form).

        Args:
            x: (B, C_in, *spatial) network input.
            values: (B, Kc) natural units (binary 0..1, level index, continuous in the concept's unit);
                ignored where ``known`` is False.
            known: (B, Kc) bool, which concepts to fix.
            spacing: (dims,) or (B, dims) mm; default: canonical.
        """
        s = resolve_spacing(self, spacing, x)
        maps, raw, attention = self._concept_pass(x, s)
        known = known.to(device=x.device, dtype=torch.bool)
        vector = self.corrected_bottleneck(self.codec.bottleneck(raw), values, known, s)
        return self._explanation(x, maps, raw, vector, s, known, attention)

    @torch.no_grad()
    def intervene(self, x: torch.Tensor, values: Mapping[str, Any], spacing: Any = None) -> ConceptExplanation:
        """Set named concepts and recompute the decision (Koh et al.'s test-time intervention).

        ``model.intervene(x, {"spiculation": 1, "texture": "solid", "diameter_mm": "1.4 cm"})``

        Args:
            x: (B, C_in, *spatial) network input.
            values: concept name -> binary 0/1/probability; level name or index; number in the
                concept's unit or a quantity string/pint quantity in any compatible unit; a tensor
                (B,) sets one value per case.
            spacing: (dims,) or (B, dims) mm; default: canonical.

        Raises:
            ValueError: for an unknown concept, level or unit.
        """
        b = x.shape[0]
        table = torch.full((b, self.num_concepts), torch.nan)
        known = torch.zeros(b, self.num_concepts, dtype=torch.bool)
        for name, value in values.items():
            j = self.codec.index(name)
            table[:, j] = parse_concept_value(self.concept_specs[j], value, batch=b).expand(b)
            known[:, j] = True
        return self.intervene_vector(x, table, known, spacing)


register_backbones(CBM, ("resnet8", "resnet18", "tf_efficientnet_lite0"), "Concept bottleneck model (Koh et al. 2020) on a {backbone} backbone.")
