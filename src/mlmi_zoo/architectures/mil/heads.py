"""The per-instance parts of the MIL models of :mod:`mlmi_zoo.architectures.mil.model`: masked attention
pooling and the tumour-area head (see that module's docstring for the models and what we changed).

Implements:

- the attention of Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning",
  ICML 2018 (:class:`AttentionPool`), over a masked softmax (:func:`masked_softmax`);
- Stochastic Top-K Instance Masking of Zhang et al., "Attention-Challenging Multiple Instance
  Learning for Whole Slide Image Classification", ECCV 2024 (:func:`challenge_mask`): in training,
  each of a bag's ``K`` highest-scored instances is left out of the softmax with probability ``p``,
  so the attention's mass passes to the other instances and the classifier must also learn from
  instances that are not the bag's most salient ones;
- the per-instance tumour-area head with its bag context (:class:`InstanceAreaHead`), whose
  parameters use the equalised learning rate of Karras et al., "Progressive Growing of GANs",
  ICLR 2018 (:class:`_ScaledLinear`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn

from mlmi_zoo.specs import InputSpecError, QuantitySpec
from mlmi_zoo.units import convert

__all__ = ["AttentionPool", "AttentionWeights", "InstanceAreaHead", "challenge_mask", "check_bag_mask", "instance_ranks",
           "masked_softmax"]

_TILE_AREA_UNIT = "um**2"  # tile_size * microns_per_pixel, squared


# --------------------------------------------------------------------------------------------------
# masked attention pooling
# --------------------------------------------------------------------------------------------------
def check_bag_mask(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Return a (B, N) bool mask of valid instances, refusing bags with none.

    Args:
        mask: (B, N) bool mask, ``True`` = valid instance, or an integer mask of 0 and 1 (read as
            bool); ``None`` = all valid.
        batch: B.
        length: N.
        device: where the mask should live.

    Raises:
        InputSpecError: for a wrong type, shape or dtype, an integer mask with values other than 0
            and 1, an empty bag (N = 0) or a bag whose mask is all False.
    """
    if length == 0:
        raise InputSpecError("expected bags with at least one instance, got N=0; drop empty bags before the model")
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor):
        raise InputSpecError(f"mask must be a torch.Tensor (B, N) of bool, got {type(mask).__name__}")
    if mask.is_floating_point():
        raise InputSpecError(f"expected a bool mask (B, N), got dtype {mask.dtype}; use mask.bool() on 0/1 masks")
    if tuple(mask.shape) != (batch, length):
        raise InputSpecError(f"expected a mask of shape (B, N) = {(batch, length)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        values = mask.unique()
        other = values[(values != 0) & (values != 1)]
        if other.numel():
            raise InputSpecError(f"an integer mask holds 0 and 1 only; got values {other[:5].tolist()}")
    mask = mask.to(device=device, dtype=torch.bool)
    empty = (~mask.any(1)).nonzero().flatten()
    if empty.numel():
        raise InputSpecError(f"bag(s) {empty.tolist()} have no valid instance (all-False mask); "
                             f"attention over an empty bag is undefined: drop them")
    return mask


def instance_ranks(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N) position of each instance in its bag's order of decreasing score (0 = highest);
    padding (``mask`` False) comes after every valid instance.

    Args:
        scores: (B, N) instance scores.
        mask: (B, N) bool, True at valid instances.
    """
    ranked = scores.masked_fill(~mask, -math.inf).argsort(-1, descending=True)  # (B, N)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(ranked)
    return torch.empty_like(ranked).scatter_(1, ranked, positions)


def challenge_mask(scores: torch.Tensor, mask: torch.Tensor, k: int, p: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic top-K instance masking (Zhang et al., ECCV 2024): ``mask`` without a random part
    of each bag's highest-scored instances.

    Each of the ``min(k, n_valid - 1)`` valid instances with the highest ``scores`` of a bag is
    dropped independently with probability ``p``; every bag keeps at least one instance.

    Args:
        scores: (B, N) raw attention scores (only their order within a bag is used; no gradient).
        mask: (B, N) bool, True at valid instances.
        k: candidates per bag.
        p: drop probability of each candidate.
        generator: random source; default: torch's global one.

    Returns:
        (B, N) bool, a subset of ``mask``.
    """
    n_valid = mask.sum(1, keepdim=True)  # (B, 1)
    candidates = (instance_ranks(scores.detach(), mask) < torch.clamp(n_valid - 1, max=k)) & mask  # (B, N)
    drop = torch.rand(mask.shape, generator=generator, device=mask.device) < p
    return mask & ~(candidates & drop)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``mask``; masked entries get exactly 0.

    Args:
        scores: (..., N) raw scores.
        mask: (..., N) bool, broadcastable to ``scores``; every row needs a True entry
            (see :func:`check_bag_mask`).

    Returns:
        (..., N) weights summing to 1 over the valid entries.
    """
    return scores.masked_fill(~mask, -math.inf).softmax(-1)


@dataclass(frozen=True)
class AttentionWeights:
    """What an :class:`AttentionPool` computed: keep the scores, they are part of the explanation."""

    scores: torch.Tensor  # (B, K, N) raw pre-softmax scores (padding keeps its score, it is masked later)
    weights: torch.Tensor  # (B, K, N) masked softmax, 0 at padding, sums to 1 over valid instances


class AttentionPool(nn.Module):
    """Attention scores over a bag (Ilse et al. 2018, eqs. 8-9).

    Args:
        in_features: width of the instance embeddings.
        hidden: width of the attention MLP.
        gated: ``tanh(V h) * sigmoid(U h)`` when True, ``tanh(V h)`` otherwise.
        branches: independent attention distributions (e.g. one per class).
    """

    def __init__(self, in_features: int, hidden: int, gated: bool, branches: int = 1) -> None:
        super().__init__()
        if branches < 1:
            raise ValueError(f"branches must be >= 1, got {branches}")
        self.gated = gated
        self.branches = branches
        # V and U share one matmul: a single (in, 2*hidden) product is faster than two on long bags.
        self.project = nn.Linear(in_features, 2 * hidden if gated else hidden)
        self.score = nn.Linear(hidden, branches)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, F) instance embeddings -> (B, K, N) raw attention scores."""
        projected = self.project(h)  # (B, N, A) or (B, N, 2A)
        # Without a graph to record (inference, explain) the activations overwrite the projection's
        # own buffer: the same numbers without two or three fresh (B, N, A) tensors per chunk, which
        # on long bags cost more in page faults than the arithmetic. Autograd keeps the out-of-place
        # form (tanh and sigmoid save their outputs for the backward pass).
        inplace = not projected.requires_grad
        if self.gated and inplace:
            width = projected.shape[-1] // 2
            v, u = projected.narrow(-1, 0, width), projected.narrow(-1, width, width)
            a = v.tanh_().mul_(u.sigmoid_())  # (B, N, A), a view of the projection's buffer
        elif self.gated:
            # chunk, not narrow: the backward of a split writes both halves' gradients into one
            # tensor, where each narrow would zero-fill a (B, N, 2A) gradient of its own.
            v, u = projected.chunk(2, dim=-1)
            a = torch.tanh(v) * torch.sigmoid(u)  # (B, N, A)
        else:
            a = projected.tanh_() if inplace else torch.tanh(projected)  # (B, N, A)
        return self.score(a).transpose(1, 2)  # (B, K, N)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> AttentionWeights:
        """Attention over the valid instances.

        Args:
            h: (B, N, F) instance embeddings.
            mask: (B, N) bool, checked with :func:`check_bag_mask`.

        Returns:
            raw scores and masked-softmax weights, both (B, K, N).
        """
        s = self.scores(h)  # (B, K, N)
        return AttentionWeights(scores=s, weights=masked_softmax(s, mask[:, None, :]))


# --------------------------------------------------------------------------------------------------
# physical head: tumour area as a sum over tiles
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _um2_to(unit: str) -> float:
    return float(convert(1.0, _TILE_AREA_UNIT, unit))


class _ScaledLinear(nn.Linear):
    """``nn.Linear`` whose parameters are stored divided by a constant ``gain`` and multiplied back in
    ``forward`` (the equalised learning rate of Karras et al., "Progressive Growing of GANs", ICLR 2018).

    The function and its initial values are those of ``nn.Linear``; only the optimiser's view
    changes: Adam moves every stored parameter by about the learning rate per step, so the effective
    parameters move ``gain`` times as fast.
    """

    def __init__(self, in_features: int, out_features: int, gain: float) -> None:
        super().__init__(in_features, out_features)
        self.gain = float(gain)
        with torch.no_grad():
            self.weight.div_(self.gain)
            self.bias.div_(self.gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.gain, self.bias * self.gain)


class InstanceAreaHead(nn.Module):
    """Per-instance fraction of the tile covered by each quantity (e.g. tumour), in area units.

    Each instance has its own evidence, a linear score ``u_n = w^T x_n + b`` of its features per
    quantity (the model passes the instance features, not the embedding; see the module docstring). Without
    bag context the covered fraction is ``sigmoid(u_n)``. With ``bag_context`` it is the posterior
    of an empirical-Bayes model whose slide-level terms are estimated from the slide itself::

        fraction_n = sigmoid(c(u_n - beta) + gamma),   (beta, gamma) = g(stats of u_1..u_N)

    ``stats`` are the bag's mean score, ``len(QUANTILE_LEVELS)`` quantiles of the scores relative to
    that mean, and ``log N``; ``g`` is a small MLP. ``beta`` aligns the instance scores with the
    bag's tumour-free tiles (a slide-level stain or scanner shift moves every score of a slide by the
    same amount) and ``gamma`` is the prior log-odds of the slide's tumour share. The scores' quantiles
    are what identifies both: a tumour-free slide's scores form one noise-wide mode, a slide with
    tumour has an upper tail whose mass is the share; one mean (or a linear map of the mean
    embedding) cannot tell a shifted tumour-free slide from one with much tumour. ``c(z) = z +
    sum_k v_k tanh(a_k z + d_k)`` is a monotone-at-start calibration of the centred score: the
    posterior mean of a tile's covered fraction is not a logistic function of a linear score (most
    tiles are tumour-free, tumour tiles are often fully covered). Summed over hundreds of tiles, a
    per-slide error of the logit dominates the bag area, which is why the head is built around it.
    ``g``'s last layer and the ``v_k`` start at zero, so training starts from the context-free head.

    The bag area is the sum of the instance areas, each in ``[0, tile area]``: every instance's
    share is exact and non-negative. Quantiles are the order statistics at ``round(q (N - 1))``
    (padding excluded); gradients flow through the selected scores.

    Args:
        in_features: width of the instance features the head scores.
        quantities: area quantities (units convertible to mm²).
        tile_size: tile side in pixels.
        microns_per_pixel: default pixel size of the tiles.
        bag_context: estimate ``beta`` and ``gamma`` from the bag (see above); False scores every
            instance alone.
        context_hidden: hidden width of ``g``.
        calibration_hidden: number of ``tanh`` terms of ``c`` per quantity.
        gain: every parameter of the head is stored divided by ``gain`` (see :class:`_ScaledLinear`):
            the head trains alongside the rest of the model at one learning rate, and its optimal
            weights (a linear score of hundreds of features, log-odds of a few units) are far larger
            than the steps of that learning rate; the function computed does not depend on it.
    """

    QUANTILE_LEVELS: ClassVar[tuple[float, ...]] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

    def __init__(self, in_features: int, quantities: tuple[QuantitySpec, ...], tile_size: int,
                 microns_per_pixel: float, bag_context: bool = False, context_hidden: int = 32,
                 calibration_hidden: int = 8, gain: float = 1.0) -> None:
        super().__init__()
        if not gain > 0:
            raise ValueError(f"gain must be positive, got {gain}")
        self.quantities = tuple(quantities)
        self.tile_size = tile_size
        self.microns_per_pixel = microns_per_pixel
        q = len(self.quantities)
        self.gain = float(gain)
        self.fraction = _ScaledLinear(in_features, q, self.gain)
        nn.init.zeros_(self.fraction.weight)  # grows along the directions that predict the fraction only
        self.prior: nn.Sequential | None = None
        if bag_context:
            n_stats = q * (len(self.QUANTILE_LEVELS) + 1) + 1
            first = _ScaledLinear(n_stats, context_hidden, self.gain)
            last = _ScaledLinear(context_hidden, 2 * q, self.gain)
            self.prior = nn.Sequential(first, nn.ReLU(), last)
            nn.init.zeros_(last.weight)  # start as the context-free head
            nn.init.zeros_(last.bias)
            # c(z) = z + sum_k v_k tanh(a_k z + d_k), per quantity; v = 0 starts at the identity. Stored
            # divided by the gain, like the linear maps.
            self.calibration_in = nn.Parameter(torch.randn(q, calibration_hidden) / self.gain)  # a (Q, K)
            self.calibration_bias = nn.Parameter(torch.linspace(-2.0, 2.0, calibration_hidden).repeat(q, 1) / self.gain)  # d
            self.calibration_out = nn.Parameter(torch.zeros(q, calibration_hidden))  # v (Q, K)

    def bag_statistics(self, own: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The bag summary that ``g`` reads.

        Args:
            own: (B, N, Q) each instance's own score ``u_n``.
            mask: (B, N) bool, True at valid instances (at least one per bag).

        Returns:
            (B, Q + Q K + 1): the mean score per quantity, the K quantiles relative to it per
            quantity, then ``log N``.
        """
        n = mask.sum(1)  # (B,) >= 1
        weights = mask.to(own.dtype)[..., None]  # (B, N, 1)
        mean = (own * weights).sum(1) / n[:, None].to(own.dtype)  # (B, Q)
        ordered = own.masked_fill(~mask[..., None], math.inf).sort(dim=1).values  # (B, N, Q) valid first
        levels = torch.tensor(self.QUANTILE_LEVELS, dtype=own.dtype, device=own.device)  # (K,)
        rank = torch.round(levels[None] * (n[:, None] - 1).to(own.dtype)).long()  # (B, K)
        quantiles = ordered.gather(1, rank[..., None].expand(-1, -1, own.shape[-1]))  # (B, K, Q)
        centred = rearrange(quantiles - mean[:, None], "b k q -> b (q k)")
        return torch.cat([mean, centred, torch.log(n.to(own.dtype))[:, None]], 1)  # (B, Q + Q K + 1)

    def bag_prior(self, own: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slide-level terms of each bag: score offset ``beta`` and prior log-odds ``gamma``.

        Args:
            own: (B, N, Q) each instance's own score ``u_n``.
            mask: (B, N) bool, True at valid instances.

        Returns:
            ``beta`` and ``gamma``, each (B, Q).

        Raises:
            ValueError: when the head was built without ``bag_context``.
        """
        if self.prior is None:
            raise ValueError("this area head has no bag prior (bag_context=False)")
        beta, gamma = self.prior(self.bag_statistics(own, mask)).chunk(2, dim=-1)
        return beta, gamma

    def calibrate(self, z: torch.Tensor) -> torch.Tensor:
        """(B, N, Q) centred scores -> (B, N, Q) ``c(z)`` (identity when built without bag context)."""
        if self.prior is None:
            return z
        t = torch.tanh((z[..., None] * self.calibration_in + self.calibration_bias) * self.gain)  # (B, N, Q, K)
        return z + (t * self.calibration_out).sum(-1) * self.gain

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Covered-fraction logits of whole bags (the model evaluates ``u_n`` chunk by chunk).

        Args:
            h: (B, N, F) instance features.
            mask: (B, N) bool, True at valid instances; required when the head has a bag prior.

        Returns:
            (B, N, Q) logits.
        """
        if self.prior is not None and mask is None:
            raise ValueError("this area head adds a bag prior: pass the (B, N) mask of valid instances")
        return self.with_prior(self.fraction(h), mask)

    def with_prior(self, own: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Covered-fraction logits of each instance in its bag.

        Args:
            own: (B, N, Q) each instance's own score ``u_n``.
            mask: (B, N) bool, True at valid instances; may be None only without bag context.

        Returns:
            (B, N, Q) logits ``c(u_n - beta) + gamma``, or ``u_n`` without bag context.

        Raises:
            ValueError: when the head has a bag prior and ``mask`` is None.
        """
        if self.prior is None:
            return own
        if mask is None:
            raise ValueError("this area head adds a bag prior: pass the (B, N) mask of valid instances")
        beta, gamma = self.bag_prior(own, mask)  # (B, Q) each
        return self.calibrate(own - beta[:, None]) + gamma[:, None]

    def tile_area(self, batch: int, microns_per_pixel: Any = None, device: torch.device | None = None) -> torch.Tensor:
        """(B, Q) area of one tile in each quantity's unit.

        Args:
            batch: B.
            microns_per_pixel: float or (B,) pixel sizes; default: the configured one.
            device: device of the result.

        Raises:
            ValueError: for a non-positive or wrongly shaped pixel size.
        """
        mpp = torch.as_tensor(self.microns_per_pixel if microns_per_pixel is None else microns_per_pixel,
                              dtype=torch.float32, device=device)
        if mpp.ndim == 0:
            mpp = mpp.expand(batch)
        if mpp.shape != (batch,) or not bool((mpp > 0).all()) or not bool(torch.isfinite(mpp).all()):
            raise ValueError(f"expected microns_per_pixel as a positive float or ({batch},) tensor, got {mpp.tolist()}")
        side_um = self.tile_size * mpp  # (B,)
        factors = torch.tensor([_um2_to(q.unit) for q in self.quantities], dtype=torch.float32, device=device)
        return side_um[:, None] ** 2 * factors  # (B, Q)

    def instance_areas(self, fraction_logits: torch.Tensor, mask: torch.Tensor, tile_area: torch.Tensor) -> torch.Tensor:
        """(B, N, Q) logits, (B, N) mask, (B, Q) tile area -> (B, N, Q) areas, 0 at padding."""
        return torch.sigmoid(fraction_logits) * tile_area[:, None, :] * mask[..., None]
