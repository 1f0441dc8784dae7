"""Invariants every family keeps, checked on inputs that hypothesis draws.

Each property is parametrised over the registered families (:func:`mlmi_zoo.families.families`)
and built from the tiny configurations of ``tests/_cases.py``, so a new family is checked the day
it is registered. Models are small and freshly seeded from a drawn integer in every example.

- a decomposable explanation rebuilds the logits from its contributions;
- switching a contribution off *in the model* moves the logit by exactly that contribution
  (ProtoPNet prototypes; CBM concepts set to the value whose bottleneck entry is 0) — and, for
  additive MIL, where the attention is a softmax, excluding an instance renormalises the others;
- padding a bag changes nothing on its real instances (MIL);
- a measurement follows the spacing: a length, area or volume scales with spacing**k, exactly.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mlmi_zoo
import mlmi_zoo.registry
from mlmi_zoo.architectures.blocks.heads import PhysicalHead, from_pixel_domain, spacing_exponent, to_pixel_domain
from mlmi_zoo.architectures.mil.heads import InstanceAreaHead
from mlmi_zoo.architectures.mil.model import TUMOUR_AREA
from mlmi_zoo.families import Family, families
from mlmi_zoo.specs import QuantitySpec
from mlmi_zoo.units import convert

from _cases import Case, case_for

FAMILIES: dict[str, Family] = families()
TOL = 1e-5
seeds = st.integers(0, 2**31 - 1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on one thread: on a shared 2-core machine, two torch threads make a 32-px
    convolution ~100x slower (they spin waiting for a busy core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def architecture_of(family: str) -> str:
    """The cheapest registered architecture of ``family`` (cached-feature bags, then resnet8)."""
    names = [n for n in mlmi_zoo.list_models() if mlmi_zoo.registry.get_entry(n).model_class.family == family]
    assert names, f"family {family!r} registers no architecture"
    return min(names, key=lambda n: (not n.endswith("_features"), not n.endswith("_resnet8"), n))


def architectures_of(family: str) -> list[str]:
    return sorted(n for n in mlmi_zoo.list_models() if mlmi_zoo.registry.get_entry(n).model_class.family == family)


def build(name: str, seed: int, **extra) -> tuple[mlmi_zoo.InterpretableModel, Case]:
    """A seeded model of architecture ``name`` in eval mode, with its tiny case."""
    family = mlmi_zoo.registry.get_entry(name).model_class.family
    case = case_for(name, family)
    torch.manual_seed(seed)
    return mlmi_zoo.create_model(name, **{**case.overrides, **extra}).eval(), case


def scaled_inputs(model: mlmi_zoo.InterpretableModel, case: Case, batch: int, scale: float) -> tuple[torch.Tensor, ...]:
    """The case's inputs times ``scale`` in [0, 1] of the widest factor the model accepts: 1.5 for
    images and tiles (the input check allows half the value range beyond it), 15 for feature bags."""
    x, *rest = case.make_input(batch)
    return (x * scale * (15.0 if model.input_spec.value_range is None else 1.5), *rest)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def random_mask(batch: int, n: int, seed: int) -> torch.Tensor:
    """(B, N) bool with at least one valid instance per bag."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, n, generator=g) < 0.7
    mask[torch.arange(batch), torch.randint(n, (batch,), generator=g)] = True
    return mask


def families_where(predicate) -> list[str]:
    return sorted(name for name, f in FAMILIES.items() if predicate(f))


# --------------------------------------------------------------------------------------------------
# contributions sum to the logit
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_family_record_states_whether_the_explanation_decomposes(family: str) -> None:
    model, case = build(architecture_of(family), 0)
    exp = model.explain(*case.make_input(2), **case.explain_kwargs)
    assert exp.decomposable == FAMILIES[family].decomposes, (
        f"family record says decomposes={FAMILIES[family].decomposes}, {type(exp).__name__}.decomposable={exp.decomposable}")
    if not exp.decomposable:
        with pytest.raises(NotImplementedError):
            exp.logits_from_contributions()


@pytest.mark.parametrize("family", families_where(lambda f: f.decomposes))
@settings(max_examples=15, deadline=None)
@given(seed=seeds, batch=st.integers(1, 4), scale=st.floats(0.0, 1.0), masked=st.booleans())
def test_contributions_sum_to_the_logits(family: str, seed: int, batch: int, scale: float, masked: bool) -> None:
    model, case = build(architecture_of(family), seed)
    inputs = scaled_inputs(model, case, batch, scale)
    kwargs = dict(case.explain_kwargs)
    if FAMILIES[family].inputs == "bags" and masked:
        kwargs["mask"] = random_mask(batch, inputs[0].shape[1], seed)
    exp = model.explain(*inputs, **kwargs)
    assert exp.decomposable
    error = max_abs(exp.logits_from_contributions(), exp.logits)
    assert error <= TOL, f"|bias + sum(contributions) - logits| = {error:.3g} (seed {seed}, batch {batch}, scale {scale})"
    assert max_abs(exp.logits, model(*inputs, **({"mask": kwargs["mask"]} if "mask" in kwargs else {}))) <= TOL


# --------------------------------------------------------------------------------------------------
# switching one contribution off in the model
# --------------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(seed=seeds, batch=st.integers(1, 4), scale=st.floats(0.0, 1.0), data=st.data())
def test_switching_off_prototypes_removes_exactly_their_contributions(seed: int, batch: int, scale: float, data) -> None:
    model, case = build(architecture_of("protopnet"), seed)
    ids = data.draw(st.sets(st.integers(0, model.num_prototypes - 1), min_size=1), label="switched off")
    x, = scaled_inputs(model, case, batch, scale)
    before = model.explain(x)
    model.disable_prototypes(ids)
    after = model.explain(x)
    off = sorted(ids)
    expected = before.logits - before.contributions[:, :, off].sum(-1)  # (B, C)
    error = max_abs(model(x), expected)
    assert error <= TOL, f"switching off prototypes {off} moved the logits {error:.3g} away from minus their contributions"
    assert max_abs(after.logits, expected) <= TOL
    assert torch.equal(after.contributions[:, :, off], torch.zeros_like(after.contributions[:, :, off]))
    kept = [p for p in range(model.num_prototypes) if p not in ids]
    assert torch.equal(after.contributions[:, :, kept], before.contributions[:, :, kept])


def _cbm_with_fitted_statistics(seed: int):
    """A CBM whose continuous concepts have non-trivial training statistics (loc != 0, scale != 1)."""
    model, case = build(architecture_of("cbm"), seed)
    codec = model.codec
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        codec.loc.copy_(torch.randn(codec.loc.shape, generator=g) * 3)
        codec.scale.copy_(0.5 + 1.5 * torch.rand(codec.scale.shape, generator=g))
    return model, case


def concept_contribution(exp, codec, j: int) -> torch.Tensor:
    """(B, C) the contribution of concept ``j`` (summed over its bottleneck units)."""
    return exp.contributions[:, :, codec.slices[j]].sum(-1)


@settings(max_examples=15, deadline=None)
@given(seed=seeds, batch=st.integers(1, 4), spacing=st.floats(0.2, 3.0), data=st.data())
def test_a_concept_at_its_baseline_removes_exactly_its_contribution(seed: int, batch: int, spacing: float, data) -> None:
    """Binary concepts at 0 and continuous ones at their training mean have bottleneck entry 0, so
    intervening to that value removes exactly the concept's contribution from every logit."""
    model, case = _cbm_with_fitted_statistics(seed)
    codec = model.codec
    zeroable = list(codec.binary) + list(codec.continuous)
    j = data.draw(st.sampled_from(zeroable), label="concept")
    x, = case.make_input(batch)
    s = (spacing, spacing)
    before = model.explain(x, spacing=s)
    values = torch.full((batch, model.num_concepts), torch.nan)
    if j in codec.continuous:  # the value whose standardised pixel-domain entry is 0, in the concept's unit
        at_mean = torch.zeros(batch, codec.width)
        values[:, j] = codec.continuous_value(at_mean, j, model.codec_spacing(torch.tensor([s])))
    else:
        values[:, j] = 0.0
    known = torch.zeros(batch, model.num_concepts, dtype=torch.bool)
    known[:, j] = True
    after = model.intervene_vector(x, values, known, spacing=s)
    assert max_abs(after.concept_vector[:, codec.slices[j]], torch.zeros(batch, 1)) <= TOL
    expected = before.logits - concept_contribution(before, codec, j)
    error = max_abs(after.logits, expected)
    assert error <= TOL, f"setting {codec.specs[j].name!r} to its baseline moved the logits {error:.3g} from the expected"
    others = [u for u in range(codec.width) if codec.unit_owner[u] != j]
    assert torch.equal(after.contributions[:, :, others], before.contributions[:, :, others])


@settings(max_examples=10, deadline=None)
@given(seed=seeds, batch=st.integers(1, 4), data=st.data())
def test_a_level_concept_set_to_a_level_contributes_exactly_that_levels_weight(seed: int, batch: int, data) -> None:
    """An ordinal/categorical concept has no value with a zero contribution (its units are a
    one-hot of the level): setting it to level ``l`` replaces its contribution by the label head's
    weight of unit ``l``."""
    model, case = build(architecture_of("cbm"), seed)
    codec = model.codec
    j = data.draw(st.sampled_from(codec.leveled), label="concept")
    level = data.draw(st.integers(0, codec.specs[j].width - 1), label="level")
    x, = case.make_input(batch)
    before = model.explain(x, **case.explain_kwargs)
    after = model.intervene(x, {codec.specs[j].name: codec.specs[j].levels[level]}, **case.explain_kwargs)
    weight = model.label_head.weight.detach()[:, codec.slices[j].start + level]  # (C,)
    expected = before.logits - concept_contribution(before, codec, j) + weight
    error = max_abs(after.logits, expected)
    assert error <= TOL, f"setting {codec.specs[j].name!r} to level {level} moved the logits {error:.3g} from the expected"


@settings(max_examples=15, deadline=None)
@given(seed=seeds, batch=st.integers(1, 3), n=st.integers(2, 8), scale=st.floats(0.1, 10.0), data=st.data())
def test_excluding_an_instance_renormalises_the_others_additive_mil(seed: int, batch: int, n: int, scale: float, data) -> None:
    """Masking instance ``j`` out of an additive-MIL bag does *not* just subtract its contribution:
    the softmax renormalises the attention of the others by ``1 / (1 - a_j)``, so the exact
    statement is ``(1 - a_j) (logits' - bias) = logits - bias - c_j``, every other contribution
    divided by ``1 - a_j``, and the excluded instance's contribution exactly 0.

    This holds because an instance enters the other instances' terms through the softmax only. With
    ``bag_normalise=True`` it also enters every embedding through the bag mean, and the statement
    does not hold (not a default; the case leaves it off).
    """
    model, case = build(architecture_of("additive_mil"), seed, bag_normalise=False)
    j = data.draw(st.integers(0, n - 1), label="excluded instance")
    feats = torch.randn(batch, n, case.make_input(1)[0].shape[-1]) * scale
    before = model.explain(feats)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[:, j] = False
    after = model.explain(feats, mask=mask)
    a_j = before.attention[:, j, None]  # (B, 1)
    keep = 1.0 - a_j
    bias = before.bias  # (C,)
    c_j = before.contributions[:, j]  # (B, C)
    error = max_abs(keep * (after.logits - bias), before.logits - bias - c_j)
    assert error <= TOL, f"(1 - a_j)(logits' - bias) differs from logits - bias - c_j by {error:.3g}"
    others = [i for i in range(n) if i != j]
    assert max_abs(after.attention[:, others] * keep, before.attention[:, others]) <= 1e-6
    assert max_abs(after.contributions[:, others] * keep[..., None], before.contributions[:, others]) <= TOL
    assert torch.equal(after.attention[:, j], torch.zeros(batch)) and torch.equal(after.contributions[:, j], torch.zeros_like(c_j))


# --------------------------------------------------------------------------------------------------
# padding a bag changes nothing
# --------------------------------------------------------------------------------------------------
BAG_ARCHITECTURES = [name for family in families_where(lambda f: f.inputs == "bags") for name in architectures_of(family)]


@pytest.mark.parametrize("name", BAG_ARCHITECTURES)
@settings(max_examples=10, deadline=None)
@given(seed=seeds, sizes=st.lists(st.integers(1, 5), min_size=1, max_size=3), extra=st.integers(0, 4),
       area_head=st.booleans(), bag_normalise=st.booleans(), data=st.data())
def test_padded_bags_equal_unpadded_bags(name: str, seed: int, sizes: list[int], extra: int, area_head: bool,
                                         bag_normalise: bool, data) -> None:
    # the case turns the area head off; half the examples turn it back on (its bag prior reads quantiles); the
    # black-box bag baseline has neither option, and no attention: its logits alone must ignore padding
    explains = FAMILIES[mlmi_zoo.registry.get_entry(name).model_class.family].interpretable
    options = {"bag_normalise": bag_normalise, **({"quantities": (TUMOUR_AREA,)} if area_head else {})} if explains else {}
    model, case = build(name, seed, **options)
    n = max(sizes) + extra
    instance_shape = case.make_input(1)[0].shape[2:]  # (D,) features or (C, t, t) tiles
    tiles = len(instance_shape) > 1

    def instances(count: int) -> torch.Tensor:
        return torch.rand(count, *instance_shape) if tiles else torch.randn(count, *instance_shape)

    padded = instances(len(sizes) * n).reshape(len(sizes), n, *instance_shape) * (1.0 if tiles else 50.0)  # junk padding
    mask = torch.zeros(len(sizes), n, dtype=torch.bool)
    real_bags = []
    for b, size in enumerate(sizes):
        where = sorted(data.draw(st.lists(st.integers(0, n - 1), min_size=size, max_size=size, unique=True), label="real"))
        bag = instances(size)
        padded[b, where] = bag
        mask[b, where] = True
        real_bags.append((where, bag[None]))
    out = model.explain(padded, mask=mask)
    if not explains:
        for b, (where, bag) in enumerate(real_bags):
            assert max_abs(out.logits[b], model.explain(bag).logits[0]) <= TOL, f"bag {b}: logits change with padding"
        return
    assert torch.equal(out.attention[~mask], torch.zeros(int((~mask).sum()))), "padding gets attention"
    if out.contributions is not None:
        assert torch.equal(out.contributions[~mask], torch.zeros_like(out.contributions[~mask])), "padding contributes"
    for b, (where, bag) in enumerate(real_bags):
        alone = model.explain(bag)
        assert max_abs(out.logits[b], alone.logits[0]) <= TOL, f"bag {b}: logits change with padding"
        assert max_abs(out.attention[b, where], alone.attention[0]) <= TOL, f"bag {b}: attention changes with padding"
        assert max_abs(out.attention_scores[b, where], alone.attention_scores[0]) <= TOL, f"bag {b}: raw scores change"
        if out.contributions is not None:
            assert max_abs(out.contributions[b, where], alone.contributions[0]) <= TOL, f"bag {b}: contributions change"
        for q, areas in out.instance_measurements.items():
            assert max_abs(areas[b, where], alone.instance_measurements[q][0]) <= TOL * max(1.0, float(areas.abs().max()))
            assert float(areas[b][~mask[b]].abs().sum()) == 0.0


# --------------------------------------------------------------------------------------------------
# measurements follow the spacing
# --------------------------------------------------------------------------------------------------
UNITS = ["HU", "um", "mm", "cm", "mm^2", "cm^2", "mm^3", "mL"]


@settings(max_examples=25, deadline=None)
@given(unit=st.sampled_from(UNITS), spacing=st.lists(st.floats(0.05, 5.0), min_size=2, max_size=3),
       zoom=st.floats(0.1, 10.0), values=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=4))
def test_pixel_domain_conversions_are_inverse_and_scale_with_spacing_to_the_unit_power(
        unit: str, spacing: list[float], zoom: float, values: list[float]) -> None:
    """For a unit of mm^k: ``from_pixel_domain`` and ``to_pixel_domain`` are inverse, the value
    scales by zoom**k when every spacing does, an object zoomed out by ``zoom`` (pixel-domain size
    divided by zoom**k) measures the same, and units convert as pint says."""
    k = spacing_exponent(unit)
    spec, in_mm = QuantitySpec("q", unit, -float("inf")), QuantitySpec("q", f"mm**{k}" if k else unit, -float("inf"))
    v = torch.tensor(values, dtype=torch.float64)  # (B,)
    s = torch.tensor(spacing, dtype=torch.float64).expand(len(values), -1)  # (B, dims)
    measured = from_pixel_domain(v, s, spec)
    torch.testing.assert_close(to_pixel_domain(measured, s, spec), v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_pixel_domain(v, zoom * s, spec), zoom**k * measured, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_pixel_domain(v / zoom**k, zoom * s, spec), measured, rtol=1e-12, atol=1e-12)
    in_unit = torch.tensor([float(convert(m, in_mm.unit, unit)) for m in from_pixel_domain(v, s, in_mm).tolist()],
                           dtype=torch.float64)
    torch.testing.assert_close(measured, in_unit, rtol=1e-9, atol=1e-12)
    # what a pixel-domain unit is: at isotropic spacing s, s**k mm^k; an area of a 2D image (a volume
    # of a 3D one) counts pixels (voxels) of prod(spacing) mm^k, whatever the anisotropy
    iso = torch.full_like(s, spacing[0])
    torch.testing.assert_close(from_pixel_domain(v, iso, in_mm), v * spacing[0] ** k, rtol=1e-12, atol=1e-12)
    if k == s.shape[1]:
        torch.testing.assert_close(from_pixel_domain(v, s, in_mm), v * s.prod(-1), rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=seeds, unit=st.sampled_from(UNITS), dims=st.sampled_from([2, 3]), zoom=st.floats(0.1, 10.0),
       spacing=st.floats(0.1, 3.0))
def test_unit_heads_scale_with_spacing_for_a_fixed_pixel_input(seed: int, unit: str, dims: int, zoom: float,
                                                               spacing: float) -> None:
    """PhysicalHead: one pooled feature vector measured at spacing s and at zoom * s differs by
    zoom**k; InstanceAreaHead: tile areas scale with (microns per pixel)**2."""
    torch.manual_seed(seed)
    k = spacing_exponent(unit)
    head = PhysicalHead(8, (QuantitySpec("q", unit),), hidden=8)
    head.set_normalisation(torch.tensor([3.0]), torch.tensor([1.0]))
    out = head(torch.randn(4, 8))
    s = torch.full((4, dims), spacing)
    base, zoomed = head.measure(out, s)["q"].value, head.measure(out, zoom * s)["q"].value
    torch.testing.assert_close(zoomed, zoom**k * base, rtol=1e-5, atol=0.0)
    area = InstanceAreaHead(8, (QuantitySpec("a", "mm^2"),), tile_size=16, microns_per_pixel=spacing)
    logits, mask = torch.randn(2, 5, 1), torch.ones(2, 5, dtype=torch.bool)
    at = [area.instance_areas(logits, mask, area.tile_area(2, m)) for m in (spacing, zoom * spacing)]
    torch.testing.assert_close(at[1], zoom**2 * at[0], rtol=1e-5, atol=0.0)


# How each family is given physical quantities, and the keyword naming the pixel size at explain time.
MEASURING = {
    "baseline": ({"quantities": (QuantitySpec("area_mm2", "mm^2"), QuantitySpec("diameter_mm", "mm"),
                                 QuantitySpec("mean_hu", "HU"))}, "spacing"),
    "protopnet": ({"quantities": (QuantitySpec("area_mm2", "mm^2"), QuantitySpec("diameter_mm", "mm")),
                   "count_head": None}, "spacing"),
    "cbm": ({}, "spacing"),  # diameter_mm and mean_hu are continuous concepts of the default concepts
    "abmil": ({"quantities": (QuantitySpec("tumour_area_mm2", "mm^2"),)}, "microns_per_pixel"),
    "additive_mil": ({"quantities": (QuantitySpec("tumour_area_mm2", "mm^2"),)}, "microns_per_pixel"),
    # every cell lesion (threshold near 0), so the distance to the nearest lesion cell is defined
    "measurement": ({"threshold": 1e-6, "spacing": (0.5, 0.5)}, "spacing"),
    "bag_baseline": None,  # no physical head: its config refuses quantities
}


def _spacing_power(unit: str) -> int:
    """Power of the spacing's unit in ``unit``: of length (mm^k), or of the optic-disc diameter (DD^k)."""
    from mlmi_zoo.units import ureg

    dims = dict(ureg().Quantity(1, unit).dimensionality)
    return int(dims.get("[optic_disc]", 0)) or spacing_exponent(unit)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=10, deadline=None)
@given(seed=seeds, batch=st.integers(1, 3), spacing=st.floats(0.1, 3.0), zoom=st.floats(0.1, 10.0))
def test_measurements_of_one_input_scale_with_the_given_spacing(family: str, seed: int, batch: int, spacing: float,
                                                                zoom: float) -> None:
    """The same pixels explained at spacing s and at zoom * s: every measurement in mm^k is
    multiplied by zoom**k (intensities, k = 0, do not move)."""
    assert family in MEASURING, f"family {family!r} has no row in MEASURING (how it is given physical quantities)"
    if MEASURING[family] is None:
        with pytest.raises(ValueError, match="quantities"):
            build(architecture_of(family), seed, quantities=(QuantitySpec("area_mm2", "mm^2"),))
        return
    overrides, keyword = MEASURING[family]
    model, case = build(architecture_of(family), seed, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # training statistics that keep the measurements positive, away from the clamp at 0
        for module in model.modules():
            if isinstance(getattr(module, "loc", None), torch.Tensor) and isinstance(getattr(module, "scale", None), torch.Tensor):
                module.loc.copy_(5.0 + torch.rand(module.loc.shape, generator=g))
                module.scale.copy_(0.1 + 0.1 * torch.rand(module.scale.shape, generator=g))
    inputs = case.make_input(batch)
    dims = model.config.spatial_dims
    given_at = (lambda z: (spacing * z,) * dims) if keyword == "spacing" else (lambda z: spacing * z)
    base = model.explain(*inputs, **{keyword: given_at(1.0)}).measurements
    zoomed = model.explain(*inputs, **{keyword: given_at(zoom)}).measurements
    assert base, f"{family}: no measurement with overrides {overrides}"
    for name, m in base.items():
        if m.unit == "px":  # a position in the image's own pixels does not move with the spacing
            torch.testing.assert_close(zoomed[name].value, m.value)
            continue
        k = _spacing_power(m.unit)
        assert float(m.value.min()) > 0, f"{name}: {m.value.tolist()} (the clamp at 0 would hide a scaling error)"
        torch.testing.assert_close(zoomed[name].value, zoom**k * m.value, rtol=1e-5, atol=0.0,
                                   msg=lambda text, where=f"{family} {name} [{m.unit}]": f"{where}: {text}")
