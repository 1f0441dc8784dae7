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
  feature map *before* global average pooling, so every bottleneck unit has a map whose mean is
  exactly its pooled logit (the 1x1 convolution is linear, so pooling commutes with it).
- **missing concept labels are masked** in the loss, and the concept losses are class-balanced.
- the concept -> label head is linear by default, which makes the decision an exact sum of
  ``weight x concept`` terms; an MLP head is offered and documented as not decomposable.

Training modes (Koh et al. section 3) are run by :class:`~.cbm_training.CBMTraining`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from einops import rearrange, reduce
from torch import nn
from torch.nn import functional as F

from mlmi_zoo.architectures.backbones import create_backbone
from mlmi_zoo.architectures.baseline import resolve_spacing
from mlmi_zoo.architectures.concepts import ConceptCodec, parse_concept_value
from mlmi_zoo.architectures.heads import spacing_exponent
from mlmi_zoo.base import InterpretableModel, ModelConfig
from mlmi_zoo.explanations import Explanation, html_table, image_to_png, png_data_uri
from mlmi_zoo.registry import register_backbones
from mlmi_zoo.specs import ConceptSpec, Measurement

__all__ = ["CBMConfig", "CBM", "ConceptExplanation", "MLPConceptExplanation", "NODULE_CONCEPTS"]

# The nodule phantom's concepts and measurements: the default, so `create_model("cbm_resnet18")`
# builds a model that trains on `NodulePhantom` without further configuration.
NODULE_CONCEPTS: tuple[ConceptSpec, ...] = (
    ConceptSpec("spiculation", "binary", group="margin"),
    ConceptSpec("calcification", "binary", group="density"),
    ConceptSpec("texture", "categorical", levels=("solid", "part-solid", "ground-glass"), group="density"),
    ConceptSpec("margin_sharp", "binary", group="margin"),
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
        mode: how the model is trained (Koh et al.): ``independent`` (label head on true concepts),
            ``sequential`` (label head on the frozen concept model's predictions) or ``joint``
            (``L_y + joint_lambda * L_c`` end to end). Sequential is the default: Koh et al. found
            it close to joint in task accuracy while keeping concepts as accurate as independent
            training, and interventions stay effective.
        joint_lambda: weight of the concept loss in joint training (Koh et al.'s lambda).
        feature_stride: cut the backbone at this stride, so concept maps stay fine enough to
            localise evidence on small patches.
        head_hidden: hidden width of the ``mlp`` head.
        balance_concepts: weight concept losses by inverse class frequency (training split).
    """

    concepts: tuple[ConceptSpec, ...] = NODULE_CONCEPTS
    head: Literal["linear", "mlp"] = "linear"
    mode: Literal["independent", "sequential", "joint"] = "sequential"
    joint_lambda: float = 1.0
    feature_stride: int = 8
    head_hidden: int = 32
    balance_concepts: bool = True

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
        if self.joint_lambda < 0:
            raise ValueError(f"joint_lambda must be >= 0, got {self.joint_lambda}")
        if self.head not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', got {self.head!r}")
        if self.mode not in ("independent", "sequential", "joint"):
            raise ValueError(f"mode must be 'independent', 'sequential' or 'joint', got {self.mode!r}")

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)


@dataclass(frozen=True, kw_only=True)
class ConceptExplanation(Explanation):
    """What a concept bottleneck model decided, from which concepts, and where it saw them.

    ``contributions.sum(-1) + bias == logits`` exactly (linear head).

    Attributes:
        concepts: name -> (B,) probability (binary), (B, L) level probabilities (ordinal /
            categorical), or :class:`Measurement` with a (B,) value in the concept's unit
            (continuous; lengths are left out when no spacing is known).
        concept_vector: (B, K) what the label head saw: probabilities, level probabilities,
            standardised pixel-domain values.
        concept_logits: (B, K) pooled raw concept-head outputs (the mean of each latent map).
        concept_maps: (B, K, *spatial) concept-head outputs upsampled to the input size.
        concept_names: the K bottleneck unit names (``"texture=solid"``).
        concept_specs: the concepts (Kc of them).
        contributions: (B, C, K) weight x concept_vector per class and unit.
        bias: (C,) label-head bias.
        intervened: (B, Kc) which concepts were fixed by an intervention.
    """

    family = "cbm"
    decomposable = True

    concepts: dict[str, Any]
    concept_vector: torch.Tensor  # (B, K)
    concept_logits: torch.Tensor  # (B, K)
    concept_maps: torch.Tensor  # (B, K, *spatial)
    concept_names: tuple[str, ...]
    concept_specs: tuple[ConceptSpec, ...]
    contributions: torch.Tensor | None  # (B, C, K); None for the mlp head
    bias: torch.Tensor | None  # (C,); None for the mlp head
    intervened: torch.Tensor  # (B, Kc) bool

    def logits_from_contributions(self) -> torch.Tensor:
        """(B, C) bias + sum of concept contributions."""
        return self.contributions.sum(-1) + self.bias  # type: ignore[union-attr]

    def concept_contributions(self, i: int, c: int) -> dict[str, float]:
        """Concept name -> its contribution (summed over its units) to class ``c`` of case ``i``."""
        out, start = {}, 0
        for s in self.concept_specs:
            out[s.name] = float(self.contributions[i, c, start:start + s.width].sum())  # type: ignore[index]
            start += s.width
        return out

    def _value_text(self, spec: ConceptSpec, i: int) -> str:
        v = self.concepts.get(spec.name)
        if v is None:
            return "n/a (no spacing given)"
        if isinstance(v, Measurement):
            return f"{float(v.value[i]):.3g} {v.unit}"
        if spec.kind == "binary":
            return f"p = {float(v[i]):.3f}"
        level = int(v[i].argmax())
        return f"{spec.levels[level]} (p = {float(v[i, level]):.3f})"  # type: ignore[index]

    def html_sections(self, i: int) -> list[tuple[str, str]]:
        sections = super().html_sections(i)
        c = int(self.logits[i].argmax())
        contrib = self.concept_contributions(i, c) if self.decomposable else {}
        rows = []
        for j, s in enumerate(self.concept_specs):
            rows.append((s.name + (" (set)" if bool(self.intervened[i, j]) else ""), self._value_text(s, i),
                         f"{contrib[s.name]:+.3f}" if contrib else "n/a (mlp head)"))
        label = self.label_names[c] if self.label_names else str(c)
        sections.append((f"Concepts (contribution to '{label}')",
                         html_table(("concept", "value", f"contribution to {label}"), rows)))
        if self.inputs is not None and self.inputs.ndim >= 4:
            if self.decomposable:
                units = self.contributions[i, c].abs().argsort(descending=True)[:3].tolist()  # type: ignore[index]
            else:
                units = list(range(min(3, len(self.concept_names))))
            imgs = []
            for u in units:
                uri = png_data_uri(image_to_png(self.inputs[i], self.concept_maps[i, u]))
                imgs.append(f'<div class="card"><img src="{uri}" width="192"><br>{self.concept_names[u]}</div>')
            sections.append(("Concept maps", '<div class="gallery">' + "".join(imgs) + "</div>"))
        return sections


@dataclass(frozen=True, kw_only=True)
class MLPConceptExplanation(ConceptExplanation):
    """Explanation of a CBM with an MLP label head: concepts and maps, but no exact decomposition
    (``contributions`` and ``bias`` are None)."""

    decomposable = False

    def logits_from_contributions(self) -> torch.Tensor:
        raise NotImplementedError("an MLP concept->label head is not an exact sum of concept contributions; "
                                  "use head='linear' for a decomposable model")


class CBM(InterpretableModel):
    """Backbone -> 1x1-conv concept maps -> global mean -> concept bottleneck -> label head.

    ``forward(x)`` returns label logits (B, C) and needs no spacing: the label head sees
    pixel-domain sizes. Data with varying spacing should be resampled to the canonical spacing so
    that those sizes are physical ones.
    """

    family = "cbm"
    config_class = CBMConfig

    def __init__(self, config: CBMConfig) -> None:
        super().__init__(config)
        self.backbone = create_backbone(config.backbone, config.in_channels, config.spatial_dims, config.feature_stride)
        self.codec = ConceptCodec(config.concepts, balance=config.balance_concepts)
        conv = nn.Conv3d if config.spatial_dims == 3 else nn.Conv2d
        self.concept_head = conv(self.backbone.out_channels, self.codec.width, kernel_size=1)
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

    # -- the computation --------------------------------------------------------------------------
    def concept_maps_latent(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *spatial) -> (B, K, *latent) raw concept maps."""
        self.validate_input(x)
        return self.concept_head(self.backbone(x))

    def concept_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *spatial) -> (B, K) raw concept outputs (logits / standardised values)."""
        return reduce(self.concept_maps_latent(x), "b k ... -> b k", "mean")

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
            spacing: (B, dims) mm, for length/area/volume concepts.
        """
        return self.codec.target_bottleneck(self.codec.to_internal(values, spacing))

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
                     spacing: torch.Tensor | None, intervened: torch.Tensor) -> ConceptExplanation:
        logits = self.predict_label(vector)  # (B, C)
        mode = "trilinear" if maps.ndim == 5 else "bilinear"
        upsampled = F.interpolate(maps, size=tuple(x.shape[2:]), mode=mode, align_corners=False)  # (B, K, *spatial)
        concepts = self.codec.describe(vector, spacing)
        measurements = {k: v for k, v in concepts.items() if isinstance(v, Measurement)}
        common = dict(logits=logits, label_names=self.label_names, measurements=measurements, inputs=x,
                      concepts=concepts, concept_vector=vector, concept_logits=raw, concept_maps=upsampled,
                      concept_names=self.concept_names, concept_specs=self.concept_specs, intervened=intervened)
        if self.config.head == "linear":
            weight = self.label_head.weight.detach()  # (C, K)
            contributions = rearrange(vector, "b k -> b 1 k") * weight  # (B, C, K)
            return ConceptExplanation(contributions=contributions, bias=self.label_head.bias.detach().clone(), **common)
        return MLPConceptExplanation(contributions=None, bias=None, **common)

    def _concept_pass(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.concept_maps_latent(x)  # (B, K, *latent)
        return maps, reduce(maps, "b k ... -> b k", "mean")

    @torch.no_grad()
    def explain(self, x: torch.Tensor, spacing: Any = None) -> ConceptExplanation:
        """Concepts (in units), their maps, and the label as a sum of concept contributions.

        Args:
            x: (B, C_in, *spatial) network input (after the intensity transform).
            spacing: (dims,) or (B, dims) mm per pixel for length/area/volume concepts; default:
                the model's canonical spacing.
        """
        maps, raw = self._concept_pass(x)
        s = resolve_spacing(self, spacing, x.shape[0], x.device)
        intervened = torch.zeros(x.shape[0], self.num_concepts, dtype=torch.bool, device=x.device)
        return self._explanation(x, maps, raw, self.codec.bottleneck(raw), s, intervened)

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
        maps, raw = self._concept_pass(x)
        s = resolve_spacing(self, spacing, x.shape[0], x.device)
        known = known.to(device=x.device, dtype=torch.bool)
        vector = self.corrected_bottleneck(self.codec.bottleneck(raw), values, known, s)
        return self._explanation(x, maps, raw, vector, s, known)

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
            table[:, j] = parse_concept_value(self.concept_specs[j], value).expand(b)
            known[:, j] = True
        return self.intervene_vector(x, table, known, spacing)


register_backbones(CBM, ("resnet8", "resnet18"), "Concept bottleneck model (Koh et al. 2020) on a {backbone} backbone.")
