"""The defaults of fine-tuning and the trainer's early stopping.

* :func:`default_stages`: the gradient stages share the step budget in the base model's proportions,
  keep its learning rates and get the early-stopping patience; special stages run as the base model
  ran them; ``epochs``, ``lr``, ``patience`` and ``steps`` given by the user win.
* :func:`plan_finetune` and the CLI: the documented defaults when nothing is said, explicit options
  and dotted overrides over them.
* the trainer: a stage with ``patience`` stops after that many epochs without a better val AUROC and
  the next stage starts from its best epoch's weights, also when the run was interrupted and resumed
  after that epoch.

Validation AUROCs of the early-stopping tests are scripted (the validation pass is replaced), so that
which epoch is best is known; the runs are tiny (baseline_resnet8 on 16x16 phantoms).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mlmi_zoo.training import finetune as ft
from mlmi_zoo.training.finetune import default_stages, plan_finetune
from mlmi_zoo.training.data_spec import DataSpec
from mlmi_zoo.training.recipe import ModelSection, Recipe, StageSection, apply_recipe_overrides
from mlmi_zoo.training.trainer import Trainer

XRAY = "protopnet_resnet8.pneumoniamnist"  # stages warmup 3 (lr 0.003), joint 9, push, last_layer 30 (lr 0.01)
BASELINE_XRAY = "baseline_resnet8.pneumoniamnist"  # one stage, joint 12

pytestmark = pytest.mark.usefixtures("one_thread")

PROTOPNET_STAGES = [StageSection("warmup", 3, 0.003), StageSection("joint", 9), StageSection("push", 1),
                    StageSection("last_layer", 30, 0.01)]
SPECIAL = ("push", "last_layer")


def write_xrays(root: Path, per_class: int = 10, seed: int = 0) -> Path:
    """``root/normal/*.png`` (dark) and ``root/pneumonia/*.png`` (bright), 28x28 8-bit class folders."""
    rng = np.random.default_rng(seed)
    for name, (lo, hi) in {"normal": (0, 120), "pneumonia": (100, 256)}.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(lo, hi, (28, 28)).astype(np.uint8)).save(root / name / f"{name}{i}.png")
    return root


# -- the rule ------------------------------------------------------------------------------------------
def test_gradient_stages_share_the_step_budget_in_the_parents_proportions():
    stages, record = default_stages(PROTOPNET_STAGES, SPECIAL, train_cases=480, batch_size=16, steps=1200)
    by_name = {s.name: s for s in stages}
    assert [s.name for s in stages] == ["warmup", "joint", "push", "last_layer"]  # the parent's order
    assert record["steps_per_epoch"] == 30  # ceil(480 / 16)
    # 1200 steps = 40 epochs of 30 steps, split 3 : 9 like the parent's warmup : joint
    assert (by_name["warmup"].epochs, by_name["joint"].epochs) == (10, 30)
    assert by_name["warmup"].lr == 0.003 and by_name["joint"].lr is None  # the parent's rates (None: optim.lr)
    assert by_name["warmup"].patience == by_name["joint"].patience == (ft.DEFAULT_PATIENCE or None)  # 0: none
    # special stages as the parent ran them, never early-stopped
    assert by_name["last_layer"] == StageSection("last_layer", 30, 0.01)
    assert by_name["push"].patience is None

    # more data, fewer epochs for the same budget; at least one epoch however large the data
    more, _ = default_stages(PROTOPNET_STAGES, SPECIAL, train_cases=4800, batch_size=16, steps=1200)
    assert {s.name: s.epochs for s in more}["joint"] == 3
    huge, _ = default_stages(PROTOPNET_STAGES, SPECIAL, train_cases=10**6, batch_size=16, steps=1200)
    assert {s.name: s.epochs for s in huge}["warmup"] == 1
    # the default budget
    base, record = default_stages([StageSection("joint", 12)], (), train_cases=ft.DEFAULT_STEPS, batch_size=1)
    assert base == (StageSection("joint", 1, None, ft.DEFAULT_PATIENCE or None),) and record["steps"] == ft.DEFAULT_STEPS


def test_large_images_get_fewer_steps_down_to_a_floor():
    assert ft.default_steps(None) == ft.default_steps(()) == ft.DEFAULT_STEPS  # bags of cached features
    for small in ((28, 28), (256, 256), (28, 28, 28), (50, 50, 50)):  # up to 2**17 pixels or voxels
        assert ft.default_steps(small) == ft.DEFAULT_STEPS, small
    assert ft.default_steps((64, 64, 64)) == 500  # 2**18 voxels: half the steps
    assert ft.default_steps((512, 512)) == 500
    assert ft.default_steps((72, 72, 72)) == round(ft.DEFAULT_STEPS * ft.STEP_VOXELS / 72**3) == 351
    assert ft.default_steps((80, 80, 80)) == ft.default_steps((2048, 2048)) == ft.MIN_STEPS  # the floor (256, 31)
    with pytest.raises(ValueError, match="image_shape"):
        ft.default_steps((64, 0))

    stages, record = default_stages([StageSection("joint", 12)], (), train_cases=480, batch_size=16,
                                    image_shape=(64, 64, 64))
    assert record["steps"] == 500 and record["image_shape"] == [64, 64, 64]
    assert stages[0].epochs == round(500 / 30) and "1000 scaled to images of 64x64x64" in record["rule"]
    given, record = default_stages([StageSection("joint", 12)], (), train_cases=480, batch_size=16, steps=900,
                                   image_shape=(64, 64, 64))  # the user's steps win over the size rule
    assert record["steps"] == 900 and given[0].epochs == 30 and "scaled" not in record["rule"]


def test_explicit_epochs_lr_and_patience_win():
    stages, record = default_stages(PROTOPNET_STAGES, SPECIAL, train_cases=480, batch_size=16, epochs=4, lr=3e-4,
                                    patience=0)
    gradient = [s for s in stages if s.name not in SPECIAL]
    assert all(s.epochs == 4 and s.lr == 3e-4 and s.patience is None for s in gradient)
    assert record["steps"] is None and record["patience"] is None
    assert [s for s in stages if s.name == "last_layer"] == [StageSection("last_layer", 30, 0.01)]
    stages, record = default_stages(PROTOPNET_STAGES, SPECIAL, train_cases=480, batch_size=16, patience=4)
    assert [s.patience for s in stages] == [4, 4, None, None] and record["patience"] == 4  # gradient stages only
    for bad in ({"epochs": 0}, {"steps": 0}, {"patience": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            default_stages(PROTOPNET_STAGES, SPECIAL, train_cases=480, batch_size=16, **bad)


# -- the plan and the CLI ------------------------------------------------------------------------------
def test_the_default_plan_is_the_documented_rule(tmp_path):
    data = write_xrays(tmp_path / "xrays", per_class=40)  # 80 images, 64 after the 20% validation split
    plan = plan_finetune(XRAY, data, out_dir=tmp_path / "run")
    recipe = plan.recipe
    assert recipe.model.freeze == ft.DEFAULT_FREEZE
    assert recipe.optim.lr == 1e-3 and recipe.optim.batch_size == 16  # the parent's peak rate
    schedule = plan.record["schedule"]
    assert schedule["train_cases"] == 64 and schedule["steps_per_epoch"] == 4
    assert set(schedule["defaults"]) == {"freeze", "epochs", "lr", "patience", "steps"}
    epochs = {s.name: s.epochs for s in recipe.stages}
    # DEFAULT_STEPS steps of 4 per epoch, shared 3 : 9 between warmup and joint
    assert epochs["warmup"] == round(ft.DEFAULT_STEPS / 4 * 3 / 12)
    assert epochs["joint"] == round(ft.DEFAULT_STEPS / 4 * 9 / 12)
    assert all(s.patience == (ft.DEFAULT_PATIENCE or None) for s in recipe.stages if s.name in ("warmup", "joint"))
    assert [(s.epochs, s.lr) for s in recipe.stages if s.name == "last_layer"] == [(30, 0.01)]
    assert schedule["stages"] == [{"name": s.name, "epochs": s.epochs, "lr": s.lr, "patience": s.patience}
                                  for s in recipe.stages]


def test_the_plan_of_64_cubed_volumes_has_the_size_rules_steps(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    for name in ("normal", "hyperplasia"):
        (tmp_path / "vols" / name).mkdir(parents=True)
        for i in range(5):
            volume = rng.random((64, 64, 64), dtype=np.float32)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vols" / name / f"{name}{i}.nii.gz")
    plan = plan_finetune("baseline_resnet8.adrenalmnist3d", tmp_path / "vols", out_dir=tmp_path / "run")
    schedule = plan.record["schedule"]
    assert schedule["image_shape"] == [64, 64, 64] and schedule["steps"] == ft.default_steps((64, 64, 64)) == 500
    assert "steps" in schedule["defaults"] and "scaled to images of 64x64x64" in schedule["rule"]
    assert plan.recipe.stages[0].epochs == round(500 / schedule["steps_per_epoch"])
    small = plan_finetune(XRAY, write_xrays(tmp_path / "xrays"), out_dir=tmp_path / "run28").record["schedule"]
    assert small["image_shape"] == [28, 28] and small["steps"] == ft.DEFAULT_STEPS


def test_prototypes_are_learnt_where_push_projects_unless_overridden(tmp_path):
    data = write_xrays(tmp_path / "xrays")
    plan = plan_finetune(XRAY, data, out_dir=tmp_path / "a")
    assert ft.DEFAULT_TRAINING["protopnet"] == {"cluster_on_push_cells": True}
    assert plan.recipe.training["cluster_on_push_cells"] is True
    assert plan.record["schedule"]["training"] == {"cluster_on_push_cells": True}
    off = plan_finetune(XRAY, data, out_dir=tmp_path / "b", overrides=["training.cluster_on_push_cells=false"])
    assert off.recipe.training["cluster_on_push_cells"] is False
    assert off.record["schedule"]["training"] == {"cluster_on_push_cells": False}
    black_box = plan_finetune(BASELINE_XRAY, data, out_dir=tmp_path / "c")  # a family without the setting
    assert "cluster_on_push_cells" not in black_box.recipe.training
    assert black_box.record["schedule"]["training"] == {}


def test_explicit_options_and_overrides_override_the_defaults(tmp_path):
    data = write_xrays(tmp_path / "xrays")
    plan = plan_finetune(XRAY, data, out_dir=tmp_path / "a", freeze=("backbone",), epochs=2, lr=3e-4, patience=0)
    assert plan.recipe.model.freeze == ("backbone",) and plan.recipe.optim.lr == 3e-4
    assert [(s.epochs, s.lr, s.patience) for s in plan.recipe.stages if s.name in ("warmup", "joint")] \
        == [(2, 3e-4, None), (2, 3e-4, None)]
    assert plan.record["schedule"]["defaults"] == ["steps"]
    # a dotted override of one stage wins over the derived stage; the rest keeps the rule
    plan = plan_finetune(BASELINE_XRAY, data, out_dir=tmp_path / "b", steps=40, overrides=["stages.0.patience=2"])
    assert plan.recipe.stages == (StageSection("joint", 40 // 1, None, 2),)  # 16 images / 16 = 1 step per epoch
    with pytest.raises(ValueError, match="patience must be >= 0"):
        plan_finetune(BASELINE_XRAY, data, out_dir=tmp_path / "c", patience=-1)


def test_cli_leaves_unsaid_options_to_the_rule_and_passes_said_ones():
    from mlmi_zoo.training.cli import _parse

    args = _parse(["finetune", "NAME", "--data", "D"])
    assert (args.epochs, args.steps, args.patience, args.lr, args.freeze) == (None, None, None, None, None)
    args = _parse(["finetune", "NAME", "--data", "D", "--patience", "3", "steps=200", "freeze=backbone", "lr=1e-4"])
    assert (args.patience, args.steps, args.freeze, args.lr) == (3, 200, ("backbone",), 1e-4)
    assert _parse(["finetune", "NAME", "--data", "D", "--freeze", "none"]).freeze == ()
    # --help states the defaults of finetune.py
    from mlmi_zoo.training.cli import FINETUNE_KEYS

    assert f"default {ft.DEFAULT_STEPS}" in FINETUNE_KEYS["steps"].meaning
    assert f"default {ft.DEFAULT_PATIENCE}" in FINETUNE_KEYS["patience"].meaning
    assert ft.DEFAULT_FREEZE == () and "default: none" in FINETUNE_KEYS["freeze"].meaning


# -- early stopping in the trainer -----------------------------------------------------------------------
def _phantom_recipe(stages: list[dict[str, Any]]) -> Recipe:
    """baseline_resnet8 on 24 16x16 nodule phantoms (3 steps of 8 per epoch), the given stages."""
    model = ModelSection("baseline_resnet8", {"img_size": [16, 16], "intensity": {
        "kind": "window", "low": -1000.0, "high": 400.0, "unit": "HU"}})
    data = DataSpec("nodule_phantom", {"size": 16, "seed": 0, "spacing_range": [1.5, 2.0],
                                       "diameter_range_mm": [4.0, 14.0]}, train_size=24, val_size=8, test_size=8)
    recipe = Recipe(model=model, data=data, stages=tuple(StageSection(**s) for s in stages), seed=0, device="cpu")
    return apply_recipe_overrides(recipe, ["optim.batch_size=8", "optim.lr=0.01"])


class Scripted:
    """Replaces ``Trainer._validate``: val AUROC from a script per stage; records the weights it saw."""

    def __init__(self, script: dict[int, list[float]], fail_at: tuple[int, int] | None = None) -> None:
        self.script, self.fail_at = script, fail_at
        self.position: Any = None  # the trainer's Position, set by the patched _train_epoch
        self.seen: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.stage_start: dict[int, dict[str, torch.Tensor]] = {}

    def validate(self, trainer: Trainer, model: Any, adapter: Any, stage: str) -> dict[str, float]:
        pos = self.position
        if self.fail_at == (pos.stage, pos.epoch):
            raise KeyboardInterrupt("interrupted")
        self.seen[(pos.stage, pos.epoch)] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"val_auroc": self.script[pos.stage][pos.epoch], "val_loss": 0.5, "val_accuracy": 0.5}


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: Recipe, scripted: Scripted,
         resume: bool = False) -> Path:
    """Train ``recipe`` with the scripted validation; record each stage's weights before its first step."""
    original_epoch = Trainer._train_epoch

    def train_epoch(self: Trainer, model: Any, run: Any, pos: Any) -> dict[str, Any]:
        scripted.position = pos
        if pos.epoch == 0 and pos.batch == 0:
            scripted.stage_start[pos.stage] = {k: v.clone() for k, v in model.state_dict().items()}
        return original_epoch(self, model, run, pos)

    monkeypatch.setattr(Trainer, "_train_epoch", train_epoch)
    monkeypatch.setattr(Trainer, "_validate", lambda self, model, adapter, stage: scripted.validate(
        self, model, adapter, stage))
    return Trainer(recipe, tmp_path / "run", quiet=True).fit(resume=resume)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _lines(run: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_patience_stops_the_stage_and_the_next_starts_from_its_best_epoch(tmp_path, monkeypatch):
    # stage 0: best at its 2nd epoch, then 2 epochs without a better AUROC -> stops after epoch 4 of 8
    recipe = _phantom_recipe([{"name": "joint", "epochs": 8, "patience": 2}, {"name": "joint", "epochs": 2}])
    scripted = Scripted({0: [0.6, 0.8, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9], 1: [0.5, 0.5]})
    _run(tmp_path, monkeypatch, recipe, scripted)
    lines = [x for x in _lines(tmp_path / "run") if x.get("type") == "epoch"]
    first = [x for x in lines if x["stage_index"] == 0]
    assert len(first) == 4 and first[-1]["early_stop"] and first[-1]["stage_best_epoch"] == 2
    assert len([x for x in lines if x["stage_index"] == 1]) == 2  # a stage without patience runs every epoch
    best = scripted.seen[(0, 1)]  # the weights validated after epoch 2 (position epoch 1 while validating)
    assert _same(scripted.stage_start[1], best)
    assert not _same(scripted.seen[(0, 3)], best)  # the last epoch run was not the best one: restoring mattered


def test_patience_that_never_runs_out_keeps_the_best_epoch_of_the_stage(tmp_path, monkeypatch):
    recipe = _phantom_recipe([{"name": "joint", "epochs": 3, "patience": 5}, {"name": "joint", "epochs": 1}])
    scripted = Scripted({0: [0.6, 0.9, 0.7], 1: [0.5]})
    _run(tmp_path, monkeypatch, recipe, scripted)
    first = [x for x in _lines(tmp_path / "run") if x.get("type") == "epoch" and x["stage_index"] == 0]
    assert len(first) == 3 and "early_stop" not in first[-1] and first[-1]["stage_best_epoch"] == 2
    assert _same(scripted.stage_start[1], scripted.seen[(0, 1)])


def test_a_run_resumed_after_the_best_epoch_restores_it_from_disk(tmp_path, monkeypatch):
    recipe = _phantom_recipe([{"name": "joint", "epochs": 6, "patience": 2}, {"name": "joint", "epochs": 1}])
    script = {0: [0.6, 0.8, 0.7, 0.7, 0.9, 0.9], 1: [0.5]}
    interrupted = Scripted(script, fail_at=(0, 3))  # after the best epoch (2) and one worse one
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, monkeypatch, recipe, interrupted)
    resumed = Scripted(script)
    _run(tmp_path, monkeypatch, recipe, resumed, resume=True)  # a new Trainer: nothing kept in memory
    first = [x for x in _lines(tmp_path / "run") if x.get("type") == "epoch" and x["stage_index"] == 0]
    assert len(first) == 4 and first[-1]["early_stop"] and first[-1]["stage_best_epoch"] == 2
    assert _same(resumed.stage_start[1], interrupted.seen[(0, 1)])


def test_stage_patience_must_be_positive():
    with pytest.raises(ValueError, match="patience must be >= 1"):
        StageSection("joint", 3, None, 0)


def test_validate_where_used_scores_only_the_epochs_a_number_is_read_from(tmp_path, monkeypatch):
    stages = [{"name": "joint", "epochs": 3}, {"name": "joint", "epochs": 2, "patience": 5}, {"name": "joint", "epochs": 2}]
    recipe = apply_recipe_overrides(_phantom_recipe(stages), ["validate=where_used"])
    scripted = Scripted({0: [0.6, 0.7, 0.8], 1: [0.5, 0.6], 2: [0.7, 0.9]})
    _run(tmp_path, monkeypatch, recipe, scripted)
    # stage 0: its last epoch only; stage 1 (patience): every epoch; stage 2 (the last: selection): every epoch
    assert sorted(scripted.seen) == [(0, 2), (1, 0), (1, 1), (2, 0), (2, 1)]
    lines = [x for x in _lines(tmp_path / "run") if x.get("type") == "epoch"]
    assert [("val_auroc" in x) for x in lines] == [False, False, True, True, True, True, True]
    assert [x for x in lines if x.get("best")][-1]["val_auroc"] == 0.9  # selection still sees every last-stage epoch
    with pytest.raises(ValueError, match=r"recipe.validate: expected one of \['every_epoch', 'where_used'\]"):
        apply_recipe_overrides(_phantom_recipe(stages), ["validate=sometimes"])


def test_fine_tuning_validates_where_used_unless_told(tmp_path):
    data = write_xrays(tmp_path / "xrays")
    assert plan_finetune(XRAY, data, out_dir=tmp_path / "a").recipe.validate == "where_used"
    told = plan_finetune(XRAY, data, out_dir=tmp_path / "b", overrides=["validate=every_epoch"])
    assert told.recipe.validate == "every_epoch"
