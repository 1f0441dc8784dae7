"""Attention-based multiple-instance learning: attention MIL and additive MIL over bags of tiles.

A slide is a *bag* of ``N`` instances (tiles), each a feature vector of width ``D`` (cached from a
frozen encoder) or a raw RGB tile that the model encodes itself. Bags of different sizes are padded
into one ``(B, N, D)`` tensor with a ``(B, N)`` boolean mask.

Implements:

- Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018
  (:class:`ABMIL`): instance embedding ``h_n``; attention ``a_n = w^T tanh(V h_n)`` or, gated,
  ``a_n = w^T (tanh(V h_n) * sigmoid(U h_n))``; softmax over the bag; the bag embedding
  ``z = sum_n attn_n h_n`` goes to a classifier.
- Javed et al., "Additive MIL: Intrinsically Interpretable Multiple Instance Learning for
  Pathology", NeurIPS 2022 (:class:`AdditiveMIL`): the classifier ``psi`` is applied to *each*
  attention-weighted instance, ``c_n = psi(attn_n h_n)`` (B, N, C), and the logits are their sum,
  so every instance's signed, per-class contribution is exact.
- Zhang et al., "Attention-Challenging Multiple Instance Learning for Whole Slide Image
  Classification", ECCV 2024: its Stochastic Top-K Instance Masking, as a training option of both
  models (``top_instance_masking``; :func:`~mlmi_zoo.architectures.mil.heads.challenge_mask`).

The attention pooling and the tumour-area head live in :mod:`mlmi_zoo.architectures.mil.heads`, the
explanations in :mod:`mlmi_zoo.architectures.mil.explanations`, the registered model names in
:mod:`mlmi_zoo.architectures.mil.registration`.

What we changed:

- The softmax is *masked*: padding gets exactly zero attention and never changes a result; a bag
  without any valid instance is refused with a ``ValueError`` instead of producing NaN.
- Additive MIL: ``psi`` has no biases and one global bias ``(C,)`` is added once per bag. A
  bias-free ReLU MLP satisfies ``psi(0) = 0`` and ``psi(a h) = a psi(h)`` for ``a >= 0``, so
  padding contributes nothing, the logits do not drift with the bag size ``N`` (a per-instance bias
  would add ``N`` times itself), and we compute ``c_n = attn_n * psi(h_n)``, the same number
  without an ``(B, N, hidden)`` rescaled copy of the embeddings.
- A bag-level physical head (:class:`InstanceAreaHead`): each instance gets the fraction of its
  tile covered by tumour, in ``[0, 1]``; times the tile's area in mm² (``tile_size`` pixels at
  ``microns_per_pixel``, converted with pint) this is the instance's tumour area, and the bag's
  tumour area is their sum. The measurement is therefore attributed to instances in mm², exactly,
  and every share is non-negative. The fraction is computed from a linear score of the instance's
  *features* (not of the embedding: a slide-wide shift of the features then moves every score of
  the slide by one constant, whereas through the ReLU embedding it also changes which units are
  active, i.e. the slope of the score per slide).
- Bag context (``bag_context``) of the area head: summed over hundreds of tiles, one per-slide
  error of the fraction logits dominates the bag area, so the logits are those of an
  empirical-Bayes posterior whose slide-level terms are estimated from the slide itself: an offset
  that aligns the scores with the slide's tumour-free tiles (stain or scanner shift) and the prior
  log-odds of the slide's tumour share, both an MLP of the quantiles of the slide's instance scores
  (one mean cannot tell a shifted tumour-free slide from one with much tumour; the quantiles can),
  plus a calibration of the centred score (see :class:`InstanceAreaHead`). Its parameters are
  stored divided by a constant gain (the equalised learning rate of Karras et al., ICLR 2018), so
  that at the model's learning rate it reaches its much larger optimal weights.
- Bag context of the attention: one offset from the bag's mean embedding is added to the raw
  attention scores of a bag: the softmax is invariant to it, so no prediction changes, but raw
  scores become comparable across slides (trained only by the optional instance-label loss of
  :mod:`mlmi_zoo.architectures.mil.training`). It starts at zero.
- Bag normalisation (``bag_normalise``): the bag's mean feature is subtracted from every instance
  before the embedding, so attention scores and logits do not change when every feature of a slide
  is shifted by the same vector (a slide-level stain or scanner effect); without it such a shift
  also changes which ReLU units are active, i.e. how each tile is scored. In a bag with tumour the
  mean includes the tumour tiles, which moves every centred tile of that bag by the same amount
  along the tumour direction (at most the tumour share times the signal of a tumour tile).
- The per-instance networks run over the bag in chunks of ``instance_chunk`` instances, with and
  without autograd. On CPU this keeps every activation small enough to be served from the
  allocator's free lists: one (N, hidden) tensor of a 100k-instance bag is 51 MB, above glibc's mmap
  threshold, so it would be mapped fresh and page-faulted in on every step, and the step time would
  grow faster than N. Chunking changes no result: each instance is processed independently.
- Without autograd (inference, ``explain``) the attention's ``tanh`` and ``sigmoid`` overwrite
  the projection's buffer instead of allocating new tensors, and a call without a mask applies
  none; both give exactly the numbers of the masked, out-of-place computation.
- Raw-tile models encode instances in chunks of ``encoder_chunk`` at inference, so encoder
  activations do not grow with ``N``; training subsamples instances instead (see
  :mod:`mlmi_zoo.architectures.mil.training`).
- Unlike MONAI's ``MILModel`` there is no ``mode=`` string; attention is returned, not discarded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn

from mlmi_zoo.architectures.blocks.backbones import create_backbone
from mlmi_zoo.architectures.mil.heads import (
    AttentionPool,
    AttentionWeights,
    InstanceAreaHead,
    challenge_mask,
    check_bag_mask,
    masked_softmax,
)
from mlmi_zoo.architectures.mil.config import TUMOUR_AREA, MILConfig
from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.architectures.mil.explanations import AdditiveMILExplanation, MILExplanation, percentile_normalise
from mlmi_zoo.specs import InputSpec, InputSpecError, Measurement
from mlmi_zoo.units import convert

__all__ = [
    "TUMOUR_AREA",
    "AttentionPool",
    "AttentionWeights",
    "InstanceAreaHead",
    "MILConfig",
    "BagOutputs",
    "ABMIL",
    "AdditiveMIL",
    "MILExplanation",
    "AdditiveMILExplanation",
    "masked_softmax",
    "challenge_mask",
    "check_bag_mask",
    "percentile_normalise",
]


@dataclass(frozen=True)
class BagOutputs:
    """Everything one pass over a bag computes; ``forward`` returns only ``logits``."""

    logits: torch.Tensor  # (B, C)
    attention: torch.Tensor  # (B, N)
    attention_scores: torch.Tensor  # (B, N)
    mask: torch.Tensor  # (B, N) bool
    contributions: torch.Tensor | None  # (B, N, C) additive MIL only
    area_logits: torch.Tensor | None  # (B, N, Q) covered-fraction logits of the physical head
    instance_logits: torch.Tensor | None = None  # (B, N, C) additive MIL: psi(h_n), before the attention weight


class _Chunks:
    """One (B, N, ...) output of the per-instance pass, assembled from its chunks along N.

    Args:
        length: N.
        direct: write each chunk into one bag-sized tensor (without autograd); else keep the
            chunks and concatenate them at the end (autograd records the concatenation).
    """

    def __init__(self, length: int, direct: bool) -> None:
        self.length = length
        self.direct = direct
        self.parts: list[torch.Tensor] = []
        self.out: torch.Tensor | None = None

    def put(self, sl: slice, value: torch.Tensor) -> None:
        """Add the (B, n, ...) result of the chunk ``sl``."""
        if not self.direct:
            self.parts.append(value)
            return
        if self.out is None:
            self.out = value.new_empty(value.shape[0], self.length, *value.shape[2:])
        self.out[:, sl] = value

    def gather(self) -> torch.Tensor | None:
        """The (B, N, ...) output, or None when no chunk was added."""
        if self.direct or not self.parts:
            return self.out
        return torch.cat(self.parts, 1)


class _MILModel(InterpretableModel[MILConfig]):
    """Shared plumbing of both MIL families: encoding, embedding, attention, physical head."""

    config_class = MILConfig
    explanation_class: ClassVar[type[MILExplanation]] = MILExplanation
    # Whether the classifier pools the instance embeddings (then every chunk's embedding is kept for
    # the pooling), or reads only the per-instance terms of _instance_terms.
    pools_embeddings: ClassVar[bool] = True

    def __init__(self, config: MILConfig) -> None:
        super().__init__(config)
        self.encoder: nn.Module | None = None
        self.encoder_projection: nn.Module | None = None
        if config.instance_encoder is not None:
            self.encoder = create_backbone(config.instance_encoder, config.in_channels, spatial_dims=2, feature_stride=32)
            width = self.encoder.out_channels
            self.encoder_projection = nn.Identity() if width == config.in_features else nn.Linear(width, config.in_features)
        # In-place ReLUs: on 100k-instance bags every (N, hidden) activation not kept is ~50 MB saved.
        self.embed = nn.Sequential(nn.Linear(config.in_features, config.hidden), nn.ReLU(inplace=True), nn.Dropout(config.dropout))
        self.attention = AttentionPool(config.hidden, config.attention_hidden, config.gated)
        self.score_offset: nn.Linear | None = None
        if config.bag_context:
            # One offset per bag: invisible to the softmax, it only aligns raw scores across bags.
            self.score_offset = nn.Linear(config.hidden, 1)
            nn.init.zeros_(self.score_offset.weight)
            nn.init.zeros_(self.score_offset.bias)
        self.area_head = (InstanceAreaHead(config.in_features, config.quantities, config.tile_size, config.microns_per_pixel,
                                           bag_context=config.bag_context, gain=config.area_head_gain)
                          if config.quantities else None)

    # -- input contract ------------------------------------------------------------------------------
    @property
    def input_spec(self) -> InputSpec:
        c = self.config
        if c.instance_encoder is None:  # feature bags (B, N, D); written out, as torch.compile cannot trace super() properties
            return InputSpec(in_channels=c.in_channels, spatial_dims=0, size=tuple(c.img_size), spacing=c.spacing,
                             intensity=c.intensity, modality=c.modality, value_range=None)
        # Raw-tile models: the spec describes one tile of the (B, N, C, t, t) bag.
        return InputSpec(in_channels=c.in_channels, spatial_dims=2, size=(c.tile_size, c.tile_size),
                         intensity=c.intensity, modality=c.modality, value_range=(0.0, 1.0))

    def validate_input(self, x: torch.Tensor, spacing: Any = None) -> None:
        """Check a bag's layout and dtype: (B, N, D) features, or (B, N, C, t, t) tiles for raw-tile
        models. Its values are checked by :meth:`checked_bag`, which knows the mask."""
        c = self.config
        if c.instance_encoder is None:
            self.input_spec.check_layout(x, name="feats")
            self._check_dtype(x)
            return
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputSpecError(f"expected raw tiles (B, N, {c.in_channels}, {c.tile_size}, {c.tile_size}), got {shape}")
        if tuple(x.shape[-2:]) != (c.tile_size, c.tile_size):
            raise InputSpecError(f"expected {c.tile_size}x{c.tile_size} tiles (the tile area depends on it), "
                                 f"got {tuple(x.shape[-2:])}; re-tile or set tile_size")
        self.input_spec.check_layout(rearrange(x, "b n c h w -> (b n) c h w"), name="feats")
        self._check_dtype(x)

    def checked_bag(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a padded batch of bags and its mask (see :meth:`forward_bag`).

        Only valid instances must be finite (and, for raw tiles, in range): the model never reads
        the others, so NaN or Inf there is accepted and comes back as 0.

        Returns:
            the features the model reads, and the (B, N) bool mask.

        Raises:
            InputSpecError: for a bag or mask that does not fit, naming the bag and instance of a bad value.
        """
        self.validate_input(feats)
        mask = check_bag_mask(mask, feats.shape[0], feats.shape[1], feats.device)
        return self.input_spec.check_values(feats, valid=mask, name="feats"), mask

    # -- the computation -----------------------------------------------------------------------------
    def encode_instances(self, tiles: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode the valid raw tiles of a bag into (B, N, in_features) features (0 at padding).

        In training mode all valid tiles go through the encoder in one pass (batch-norm statistics
        then see the whole subsample). Otherwise they go in chunks of ``encoder_chunk``, so encoder
        activations do not grow with N; under ``torch.no_grad`` (as in :meth:`explain`) no graph is
        kept either. Chunking does not change the result: each tile is encoded independently.

        Args:
            tiles: (B, N, C, t, t) tiles in network range.
            mask: (B, N) bool.
        """
        if self.encoder is None or self.encoder_projection is None:
            raise ValueError(f"{self.architecture} takes cached features and has no tile encoder; "
                             f"use a raw-tile model such as {self.family}_resnet8")
        b_idx, n_idx = mask.nonzero(as_tuple=True)  # (V,), (V,)
        chunk = b_idx.numel() if self.training else self.config.encoder_chunk
        encoded = []
        for start in range(0, b_idx.numel(), max(chunk, 1)):
            sel = slice(start, start + chunk)
            maps = self.encoder(tiles[b_idx[sel], n_idx[sel]])  # (v, F, h, w)
            encoded.append(self.encoder_projection(maps.mean(dim=(-2, -1))))  # (v, D)
        feats = torch.cat(encoded)  # (V, D)
        out = feats.new_zeros(*mask.shape, feats.shape[-1])  # (B, N, D)
        return out.index_put((b_idx, n_idx), feats)

    def _instance_terms(self, h: torch.Tensor) -> torch.Tensor | None:
        """(B, n, F) embeddings of one chunk -> per-instance classifier terms, or None (pooled classifier)."""
        return None

    def _classify(self, hs: list[torch.Tensor], terms: torch.Tensor | None, attn: torch.Tensor,
                  bounds: list[slice]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, C) and contributions (B, N, C) or None.

        Args:
            hs: per chunk, (B, n, F) instance embeddings (empty unless ``pools_embeddings``).
            terms: (B, N, C) what :meth:`_instance_terms` returned, chunk by chunk, or None.
            attn: (B, N) attention, 0 at padding.
            bounds: per chunk, its instance slice of the bag.
        """
        raise NotImplementedError

    def _instance_pass(self, feats: torch.Tensor, mask: torch.Tensor) -> tuple[
            list[torch.Tensor], torch.Tensor | None, list[slice], torch.Tensor, torch.Tensor | None]:
        """The per-instance networks, chunk by chunk (see ``instance_chunk``).

        Args:
            feats: (B, N, D) instance features.
            mask: (B, N) bool.

        Returns:
            embeddings per chunk (only for a classifier that pools them, else empty), classifier
            terms (B, N, C) or None, the chunk slices, raw attention scores (B, N), and
            covered-fraction logits (B, N, Q) or None.
        """
        n = feats.shape[1]
        step = self.config.instance_chunk
        bounds = [slice(start, min(start + step, n)) for start in range(0, n, step)]
        weights = mask.to(feats.dtype)  # (B, N)
        hs: list[torch.Tensor] = []
        # Without autograd each chunk's results are written into bag-sized outputs: no
        # concatenation copies, and no small tensors left between one chunk's large temporaries
        # and the next's, which fragments the C heap (a 1M-instance bag's peak memory then grew
        # by one attention buffer per chunk in some runs).
        direct = not torch.is_grad_enabled()
        scores, terms, own = _Chunks(n, direct), _Chunks(n, direct), _Chunks(n, direct)
        # The bag's mean embedding serves only the score offset (bag_context).
        total = feats.new_zeros(feats.shape[0], self.config.hidden) if self.score_offset is not None else None  # (B, F)
        project, *tail = self.embed  # Linear, then ReLU and Dropout (slicing a Sequential builds a new module)
        assert isinstance(project, nn.Linear)  # built in __init__
        centre = None
        if self.config.bag_normalise:
            # embed(x - m) = ReLU(W x + b - W m): subtracting W m (B, F) after the projection is the
            # same number without a centred (B, N, D) copy of the features kept for backward.
            mean = torch.einsum("bn,bnd->bd", weights, feats) / weights.sum(1, keepdim=True)  # (B, D)
            centre = nn.functional.linear(mean, project.weight)[:, None]  # (B, 1, F)
        for sl in bounds:
            h = project(feats[:, sl])  # (B, n, F)
            if centre is not None:
                h = h - centre
            for layer in tail:
                h = layer(h)
            if self.pools_embeddings:
                hs.append(h)
            if self.area_head is not None:
                # The area head scores the instance features linearly (see InstanceAreaHead).
                own.put(sl, self.area_head.fraction(feats[:, sl]))  # (B, n, Q) each tile's own evidence
            scores.put(sl, self.attention.scores(h)[:, 0])  # (B, n)
            term = self._instance_terms(h)
            if term is not None:
                terms.put(sl, term)
            if total is not None:
                total = total + torch.bmm(weights[:, None, sl], h)[:, 0]  # (B, F) sum of valid embeddings
        raw = scores.gather()  # (B, N)
        assert raw is not None  # every chunk has scores
        if self.score_offset is not None and total is not None:
            context = total / weights.sum(1, keepdim=True)  # (B, F) mean embedding; every bag has a valid instance
            raw = raw + self.score_offset(context)  # (B, 1) broadcast: one offset per bag
        area_logits = None
        if self.area_head is not None:
            own_scores = own.gather()
            assert own_scores is not None  # every chunk has them
            area_logits = self.area_head.with_prior(own_scores, mask)  # (B, N, Q)
        return hs, terms.gather(), bounds, raw, area_logits

    def forward_bag(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> BagOutputs:
        """One pass over a padded batch of bags.

        Args:
            feats: (B, N, D) cached features, or (B, N, C, t, t) raw tiles for raw-tile models.
            mask: (B, N) bool, True at valid instances; ``None`` = all valid.

        Raises:
            InputSpecError: when ``feats`` does not fit the input spec, a valid instance holds NaN or
                Inf, or for an empty bag, a mask of the wrong shape or dtype, or an all-False mask.
        """
        every_valid = mask is None
        feats, mask = self.checked_bag(feats, mask)
        if self.encoder is not None:
            feats = self.encode_instances(feats, mask)  # (B, N, D)
        hs, terms, bounds, scores, area_logits = self._instance_pass(feats, mask)
        if self.training and self.config.top_instance_masking > 0:
            pooled = challenge_mask(scores, mask, self.config.top_instance_k, self.config.top_instance_masking)
            attn = masked_softmax(scores, pooled)  # (B, N); 0 at padding and at masked instances
        elif every_valid:
            attn = scores.softmax(-1)  # (B, N); no mask given: nothing to mask, the same numbers
        else:
            attn = masked_softmax(scores, mask)  # (B, N); 0 at padding
        logits, contributions = self._classify(hs, terms, attn, bounds)
        return BagOutputs(logits=logits, attention=attn, attention_scores=scores, mask=mask,
                          contributions=contributions, area_logits=area_logits,
                          instance_logits=terms)

    def explanation_bias(self) -> torch.Tensor | None:
        """(C,) the global bias of an exact decomposition, or None when there is none."""
        return None

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, C) of a padded batch of bags (see :meth:`forward_bag`)."""
        return self.forward_bag(feats, mask).logits

    def instance_measurements(self, out: BagOutputs, microns_per_pixel: Any = None) -> dict[str, torch.Tensor]:
        """name -> (B, N) each instance's area in the quantity's unit (0 at padding)."""
        if self.area_head is None or out.area_logits is None:
            return {}
        tile_area = self.area_head.tile_area(out.mask.shape[0], microns_per_pixel, out.mask.device)  # (B, Q)
        areas = self.area_head.instance_areas(out.area_logits, out.mask, tile_area)  # (B, N, Q)
        return {q.name: areas[..., j] for j, q in enumerate(self.area_head.quantities)}

    @torch.no_grad()
    def explain(self, feats: torch.Tensor, mask: torch.Tensor | None = None, coords: torch.Tensor | None = None,
                microns_per_pixel: Any = None) -> MILExplanation:
        """Explain a padded batch of bags.

        Args:
            feats: (B, N, D) cached features, or (B, N, C, t, t) raw tiles for raw-tile models.
            mask: (B, N) bool, True at valid instances; ``None`` = all valid.
            coords: (B, N, 2|3) tile coordinates (grid or pixel) for heat maps.
            microns_per_pixel: float or (B,) pixel size of the tiles; default: the configured one.

        Returns:
            attention, raw scores, contributions (additive MIL), per-instance and bag measurements.
        """
        out = self.forward_bag(feats, mask)
        if coords is not None and not isinstance(coords, torch.Tensor):
            raise InputSpecError(f"coords must be a torch.Tensor (B, N, 2|3), got {type(coords).__name__}")
        if coords is not None and (coords.ndim != 3 or tuple(coords.shape[:2]) != tuple(out.mask.shape)
                                   or coords.shape[-1] not in (2, 3)):
            raise InputSpecError(f"expected coords of shape (B, N, 2|3) with (B, N) = {tuple(out.mask.shape)}, "
                                 f"got {tuple(coords.shape)}")
        per_instance = self.instance_measurements(out, microns_per_pixel)
        units = {q.name: q.unit for q in self.config.quantities}
        measurements = {name: Measurement(name, v.sum(1), units[name]) for name, v in per_instance.items()}
        for radius, area in self.config.equivalent_radii:  # the disc of the same area: r = sqrt(A / pi), in mm
            mm2 = per_instance[area].sum(1) * float(convert(1.0, units[area], "mm^2"))
            measurements[radius] = Measurement(radius, torch.sqrt(mm2.clamp_min(0.0) / math.pi), "mm")
        return self.explanation_class(
            logits=out.logits, label_names=self.label_names, measurements=measurements,
            attention=out.attention, attention_scores=out.attention_scores, mask=out.mask,
            contributions=out.contributions, bias=self.explanation_bias(),
            instance_measurements=per_instance, coords=coords,
        )


def _classifier(in_features: int, hidden: int, out_features: int, bias: bool) -> nn.Module:
    if hidden == 0:
        return nn.Linear(in_features, out_features, bias=bias)
    return nn.Sequential(nn.Linear(in_features, hidden, bias=bias), nn.ReLU(inplace=True), nn.Linear(hidden, out_features, bias=bias))


class ABMIL(_MILModel):
    """Attention MIL (Ilse et al. 2018): attention-pooled bag embedding -> classifier.

    The explanation carries attention (where the model looked), not contributions: the classifier
    acts on the pooled embedding, so attention is not an exact attribution of the logit.
    """

    family = "abmil"
    explanation_class = MILExplanation

    def __init__(self, config: MILConfig) -> None:
        super().__init__(config)
        self.classifier = _classifier(config.hidden, config.classifier_hidden, config.num_classes, bias=True)

    def _classify(self, hs: list[torch.Tensor], terms: torch.Tensor | None, attn: torch.Tensor,
                  bounds: list[slice]) -> tuple[torch.Tensor, None]:
        z = torch.bmm(attn[:, None, bounds[0]], hs[0])  # (B, 1, F) bag embedding, summed over the chunks
        for sl, h in zip(bounds[1:], hs[1:]):
            z = z + torch.bmm(attn[:, None, sl], h)
        return self.classifier(z[:, 0]), None


class AdditiveMIL(_MILModel):
    """Additive MIL (Javed et al. 2022): ``logits = sum_n psi(attn_n h_n) + bias``.

    ``psi`` is a bias-free ReLU MLP, so ``psi(attn_n h_n) = attn_n psi(h_n)`` and padding contributes
    exactly 0; one global ``bias`` (C,) is added once per bag.
    """

    family = "additive_mil"
    explanation_class = AdditiveMILExplanation
    pools_embeddings = False  # the logits are sums of psi(h_n): no embedding outlives its chunk

    def __init__(self, config: MILConfig) -> None:
        super().__init__(config)
        self.classifier = _classifier(config.hidden, config.classifier_hidden, config.num_classes, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.num_classes))

    def _instance_terms(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(h)  # (B, n, C) psi(h_n), before the attention weight

    def _classify(self, hs: list[torch.Tensor], terms: torch.Tensor | None, attn: torch.Tensor,
                  bounds: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
        assert terms is not None  # _instance_terms returns every chunk's psi(h_n)
        contributions = attn[..., None] * terms  # (B, N, C); attn is exactly 0 at padding
        return contributions.sum(1) + self.bias, contributions

    def explanation_bias(self) -> torch.Tensor:
        return self.bias.detach()
