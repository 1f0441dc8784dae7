"""The measurement bottleneck: the rule is the published definition, exactly, on constructed maps;
each part of the decision can be acted on; each loss term trains what it should and only on the cases
that carry its truth; validation ignores unlabelled cases."""
from __future__ import annotations

import math

import pytest
import torch

import mlmi_zoo
from mlmi_zoo.architectures.blocks.stages import training_for
from mlmi_zoo.training.validation import classification_metrics

SPACING = (0.05, 0.05)  # DD per pixel: a disc diameter is 20 px


def model(**overrides: object) -> mlmi_zoo.InterpretableModel:
    m = mlmi_zoo.create_model("measurement_resnet18", img_size=(64, 64), spacing=SPACING, hidden=4, **overrides)
    return m.eval()


def test_rule_is_the_definition_on_constructed_maps() -> None:
    m = model()
    grid = (8, 8)
    ys, xs = m.cell_centres(grid)
    lesion = torch.full((3, *grid), -8.0)  # no lesion anywhere
    lesion[1, 0, 0] = 8.0  # one lesion cell far from the landmark
    lesion[2, 3, 4] = 8.0  # one lesion cell next to it
    landmark = torch.tensor([[float(xs[4]), float(ys[4])]] * 3)
    out = m.rule_scores(lesion, landmark, torch.tensor([SPACING] * 3))
    expected_far = math.hypot(float(xs[0] - xs[4]) * SPACING[1], float(ys[0] - ys[4]) * SPACING[0])
    assert math.isnan(float(out["distance"][0]))
    assert float(out["distance"][1]) == pytest.approx(expected_far)
    assert float(out["distance"][2]) == pytest.approx(float(ys[4] - ys[3]) * SPACING[0])
    assert out["logits"].argmax(-1).tolist() == [0, 1, 2]
    assert torch.isnan(out["nearest_xy"][0]).all()
    assert out["nearest_xy"][1:].tolist() == [[float(xs[0]), float(ys[0])], [float(xs[4]), float(ys[3])]]
    # the far lesion is within a radius larger than its distance: grade 2
    wide = m.rule_scores(lesion, landmark, torch.tensor([SPACING] * 3), radius=expected_far + 0.01)
    assert wide["logits"].argmax(-1).tolist() == [0, 2, 2]
    # a threshold above the lesion cells' probability finds none
    strict = m.rule_scores(lesion, landmark, torch.tensor([SPACING] * 3), threshold=1 - 1e-6)
    assert strict["logits"].argmax(-1).tolist() == [0, 0, 0]


def test_explain_follows_the_rule_and_every_action() -> None:
    torch.manual_seed(0)
    m = model()
    x = torch.rand(4, 3, 64, 64)
    for kwargs in ({}, {"threshold": 0.2}, {"threshold": 0.8}, {"radius": 0.3}, {"radius": 3.0},
                   {"landmark_xy": (5.0, 60.0)}, {"spacing": (0.1, 0.1)}):
        exp = m.explain(x, **kwargs)
        assert torch.equal(exp.logits.argmax(-1), exp.rule()), kwargs
        assert exp.decomposition_error() <= 1e-5
    given = m.explain(x, landmark_xy=(5.0, 60.0))
    assert given.landmark_given and torch.equal(given.landmark_xy, torch.tensor([[5.0, 60.0]] * 4))
    # distances are in the spacing's unit: twice the DD per pixel, twice the distance
    a, b = m.explain(x, threshold=0.01), m.explain(x, spacing=(0.1, 0.1), threshold=0.01)
    torch.testing.assert_close(b.distance, 2 * a.distance)
    torch.testing.assert_close(b.area, 4 * a.area)
    with pytest.raises(ValueError, match="landmark_xy"):
        m.explain(x, landmark_xy=(math.nan, 1.0))
    with pytest.raises(ValueError, match="threshold"):
        m.explain(x, threshold=1.5)


def test_the_landmark_is_the_refined_mode_of_its_map() -> None:
    m = model()
    logits = torch.full((1, 8, 8), -20.0)
    logits[0, 2, 5] = 5.0
    ys, xs = m.cell_centres((8, 8))
    xy = m.locate_landmark(logits)
    torch.testing.assert_close(xy, torch.tensor([[float(xs[5]), float(ys[2])]]), rtol=0, atol=1e-3)
    logits[0, 2, 6] = 5.0  # two equal cells: half-way between them
    xy = m.locate_landmark(logits)
    assert float(xy[0, 0]) == pytest.approx(float(xs[5] + xs[6]) / 2, abs=1e-3)


def _batch(seg: bool, graded: bool) -> dict[str, torch.Tensor]:
    b = 2
    mask = torch.zeros(b, 1, 64, 64, dtype=torch.bool)
    mask[:, :, 10:14, 40:44] = True
    return {"image": torch.rand(b, 3, 64, 64), "label": torch.tensor([2, 0] if graded else [-1, -1]),
            "spacing": torch.tensor([SPACING] * b), "ex_mask": mask, "ex_annotated": torch.tensor([seg] * b),
            "fovea_xy": torch.tensor([[30.0, 30.0]] * b) if graded else torch.full((b, 2), math.nan)}


@pytest.mark.parametrize("seg, graded", [(True, False), (False, True)])
def test_each_loss_term_trains_on_the_cases_that_carry_its_truth(seg: bool, graded: bool) -> None:
    torch.manual_seed(0)
    m = model().train()
    out = training_for(m).loss(m, _batch(seg, graded), "maps")
    assert ("lesion" in out.logs) == seg and ("landmark" in out.logs) == graded and ("rule" in out.logs) == graded
    out.loss.backward()
    head_grad = m.landmark_head[2].weight.grad
    assert (head_grad is not None and bool(head_grad.abs().sum() > 0)) == graded  # the landmark's own loss
    assert bool(m.lesion_head[2].weight.grad.abs().sum() > 0)


def test_validation_metrics_ignore_unlabelled_cases() -> None:
    from mlmi_zoo.training.validation import validate
    from mlmi_zoo.training.distributed import Dist

    class Adapter:
        def loss(self, model, batch, stage):
            from mlmi_zoo.architectures.blocks.stages import LossOutput

            return LossOutput(torch.tensor(0.0), batch["logits"], {})

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([0, 1, 2, -1])
    metrics = validate(model(), Adapter(), [{"logits": logits, "label": labels}], "maps", device=torch.device("cpu"),
                       amp=False, group=Dist())
    assert metrics["val_accuracy"] == classification_metrics(logits[:3], labels[:3])["accuracy"] == 1.0


def test_a_task_of_three_classes_is_compared_with_the_baseline_class_by_class() -> None:
    import numpy as np

    from mlmi_zoo.evaluation._collect import _Collected
    from mlmi_zoo.evaluation._evidence_blocks import task_evidence
    from mlmi_zoo.evaluation.evidence import compare_auroc

    class Ctx:
        reference, n_boot, seed = None, 50, 0

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 0, 1] * 4)
    probs = torch.softmax(torch.randn(32, 3, generator=g) + 2 * torch.nn.functional.one_hot(labels, 3), -1)
    base = torch.softmax(torch.randn(32, 3, generator=g), -1)
    col = _Collected(n_cases=32)
    col.groups = [f"p{i}" for i in range(32)]
    out = task_evidence(probs, labels, col, Ctx(), base)  # type: ignore[arg-type]
    assert set(out) == {f"black_box_baseline_class_{c}" for c in range(3)}
    expected = compare_auroc("AUROC of class 2 against the others", probs[:, 2].numpy(),
                             {"black-box baseline": base[:, 2].numpy()}, (labels == 2).numpy().astype(np.int64),
                             np.asarray(col.groups), n_boot=50, seed=0)
    assert out["black_box_baseline_class_2"] == expected
    # a class with no case in the evaluated split has no one-vs-rest AUROC
    out = task_evidence(probs, torch.where(labels == 2, 1, labels), col, Ctx(), base)  # type: ignore[arg-type]
    assert set(out) == {"black_box_baseline_class_0", "black_box_baseline_class_1"}


def test_spacing_is_read_and_checked_in_the_models_unit() -> None:
    from mlmi_zoo.specs import InputSpecError

    m = model()
    assert m.input_spec.spacing_unit == "DD"
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(m.explain(x, spacing=("0.1 DD", "0.1 DD")).distance,
                               m.explain(x, spacing=(0.1, 0.1)).distance, equal_nan=True)
    with pytest.raises(InputSpecError, match="'0.7 mm' is not in DD"):
        m.explain(x, spacing=("0.7 mm", "0.7 mm"))
    with pytest.raises(InputSpecError, match=r"DD is at least 100x larger than the model's canonical spacing"):
        m.explain(x, spacing=(6.0, 6.0))
