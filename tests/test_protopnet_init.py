"""ProtoPNet's opt-in data-driven prototype start (the training setting ``prototype_init="data"``).

The start picks, for each class, latent cells of its own training images (k-means++ seeding); it is
deterministic under its seed, leaves the global RNG and every other tensor alone, and the default
``"uniform"`` changes nothing, in the adapter and in the trainer.
"""
from __future__ import annotations

import dataclasses

import json

import pytest
import torch
import yaml
from einops import rearrange
from torch.utils.data import Dataset

import mlmi_zoo
from mlmi_zoo.architectures.protopnet import training as protopnet_training
from mlmi_zoo.architectures.protopnet.config import ProtoPNetConfig, ProtoPNetTrainingSettings
from mlmi_zoo.architectures.protopnet.model import ProtoPNet
from mlmi_zoo.architectures.protopnet.data_init import initialise_prototypes_from_data, kmeans_pp_pick
from mlmi_zoo.architectures.blocks.stages import training_for
from mlmi_zoo.training.recipe import load_recipe
from mlmi_zoo.training.trainer import derive_seed, train


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(similarity: str = "log_l2", **overrides) -> ProtoPNet:
    """3 classes x 2 prototypes on resnet8, 16-px images, 2x2 latent grid.

    How the prototypes start is a training setting, not part of the model: the tests give
    ``{"prototype_init": "data"}`` to :func:`training_for` (or call the start directly).
    """
    torch.manual_seed(0)
    return mlmi_zoo.create_model("protopnet_resnet8", img_size=(16, 16), prototypes_per_class=2, prototype_dim=8,
                                 label_names=("a", "b", "c"), similarity=similarity, **overrides)


class ClassImages(Dataset):
    """Images whose intensity level depends on the class, so the classes' latent cells differ."""

    def __init__(self, n: int = 30, seed: int = 0, classes: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % classes
        level = self.labels.float().view(-1, 1, 1, 1) / max(classes - 1, 1)
        self.images = (0.8 * level + 0.2 * torch.rand(n, 1, 16, 16, generator=g))  # (N, 1, 16, 16)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


@torch.no_grad()
def latent_cells(model: ProtoPNet, ds: ClassImages) -> tuple[torch.Tensor, torch.Tensor]:
    """All latent cells (N*L, D) of ``ds`` in eval mode and the class of each cell's image."""
    was = model.training
    model.eval()
    z = model.latent(model.input_spec.intensity(ds.images))  # (N, D, *latent)
    model.train(was)
    cells = rearrange(z, "b d ... -> b (...) d")  # (N, L, D)
    return cells.reshape(-1, cells.shape[-1]), ds.labels.repeat_interleave(cells.shape[1])


# -- k-means++ seeding --------------------------------------------------------------------------------
def test_kmeans_pp_spreads_over_separated_clusters_and_is_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    cells = (centres[:, None, :] + 0.01 * torch.randn(3, 50, 2, generator=g)).reshape(-1, 2)  # 3 tight clusters
    picks = kmeans_pp_pick(cells, 3, torch.Generator().manual_seed(1))
    assert sorted((picks // 50).tolist()) == [0, 1, 2]  # one pick per cluster
    assert torch.equal(picks, kmeans_pp_pick(cells, 3, torch.Generator().manual_seed(1)))
    cos = kmeans_pp_pick(cells + 1.0, 3, torch.Generator().manual_seed(1), similarity="cosine")
    assert cos.shape == (3,) and cos.dtype == torch.long


def test_kmeans_pp_with_fewer_distinct_cells_than_picks_repeats_rows() -> None:
    picks = kmeans_pp_pick(torch.ones(4, 3), 3, torch.Generator().manual_seed(0))
    assert picks.shape == (3,) and picks.max() < 4
    with pytest.raises(ValueError, match="non-empty"):
        kmeans_pp_pick(torch.zeros(0, 3), 1, torch.Generator())


# -- the data-driven start ----------------------------------------------------------------------------
@pytest.mark.parametrize("similarity", ["log_l2", "cosine"])
def test_data_init_picks_own_class_latent_cells(similarity) -> None:
    ds = ClassImages()
    model = tiny(similarity)
    summary = initialise_prototypes_from_data(model, ds, seed=3)
    assert summary["initialised_classes"] == [0, 1, 2] and summary["images_per_class"] == [10, 10, 10]
    cells, cell_class = latent_cells(model, ds)
    protos = model.prototype_layer.prototypes.detach()  # (P, D)
    gap = (protos[:, None, :] - cells[None]).abs().amax(-1)  # (P, N*L) largest coordinate difference
    for j, c in enumerate(model.prototype_classes.tolist()):
        own = gap[j][cell_class == c]
        assert float(own.min()) < 1e-5, f"prototype {j} is no latent cell of a class-{c} image"
    # The two prototypes of a class are two different cells (k-means++ never re-picks a cell it has).
    assert all(not torch.equal(protos[2 * c], protos[2 * c + 1]) for c in range(3))


def test_data_init_picks_only_the_cells_the_rule_allows() -> None:
    ds = ClassImages()
    model = tiny()
    seen = []

    def first_cell(batch, x, latent_shape):  # the cells push may use: here only the first
        seen.append(sorted(batch))
        allowed = torch.zeros(x.shape[0], int(torch.Size(latent_shape).numel()), dtype=torch.bool)
        allowed[:, 0] = True
        return allowed

    summary = initialise_prototypes_from_data(model, ds, seed=3, cells=first_cell, keys=("index",))
    assert seen and all(keys == ["image", "index"] for keys in seen)
    assert summary["cells_per_class"] == [10, 10, 10]  # one cell per image
    cells, cell_class = latent_cells(model, ds)
    first = torch.arange(len(cells)) % (len(cells) // len(ds)) == 0
    protos = model.prototype_layer.prototypes.detach()
    for j, c in enumerate(model.prototype_classes.tolist()):
        gap = (protos[j] - cells[first & (cell_class == c)]).abs().amax(-1)
        assert float(gap.min()) < 1e-5, f"prototype {j} is not the first cell of a class-{c} image"


def test_data_init_is_deterministic_and_seed_dependent() -> None:
    ds = ClassImages()
    a, b, c = (tiny() for _ in range(3))
    initialise_prototypes_from_data(a, ds, seed=5, images_per_class=4)
    initialise_prototypes_from_data(b, ds, seed=5, images_per_class=4)
    initialise_prototypes_from_data(c, ds, seed=6, images_per_class=4)
    assert torch.equal(a.prototype_layer.prototypes, b.prototype_layer.prototypes)
    assert not torch.equal(a.prototype_layer.prototypes, c.prototype_layer.prototypes)


def test_data_init_touches_only_the_prototypes_and_not_the_global_rng() -> None:
    ds = ClassImages()
    model = tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    summary = training_for(model, {"prototype_init": "data"}).initialise(model, ds, seed=0, device=torch.device("cpu"))
    assert summary is not None and summary["initialised_classes"] == [0, 1, 2]
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["prototype_layer.prototypes"]  # batch-norm statistics untouched (eval-mode pass)
    assert model.training and all(m.training for m in model.modules())
    assert model.prototype_sources is None


def test_class_without_images_keeps_its_prototypes() -> None:
    ds = ClassImages(classes=2)  # labels 0 and 1 only; the model has 3 classes
    model = tiny()
    start = model.prototype_layer.prototypes.detach().clone()
    summary = initialise_prototypes_from_data(model, ds, seed=0)
    assert summary["initialised_classes"] == [0, 1]
    assert torch.equal(model.prototype_layer.prototypes[4:], start[4:])
    assert not torch.equal(model.prototype_layer.prototypes[:4], start[:4])


# -- "uniform" (the default) changes nothing -----------------------------------------------------------
def test_uniform_is_the_default_and_the_hook_does_nothing() -> None:
    assert ProtoPNetTrainingSettings.__dataclass_fields__["prototype_init"].default == "uniform"
    assert "prototype_init" not in ProtoPNetConfig.__dataclass_fields__  # a training setting only
    with pytest.raises(ValueError, match="prototype_init"):
        ProtoPNetTrainingSettings(prototype_init="kmeans")  # type: ignore[arg-type]
    model = tiny()
    with pytest.raises(ValueError, match="prototype_init"):
        training_for(model, {"prototype_init": "kmeans"})
    assert training_for(model).settings.prototype_init == "uniform"
    torch.manual_seed(0)
    reference = mlmi_zoo.create_model("protopnet_resnet8", img_size=(16, 16), prototypes_per_class=2,
                                      prototype_dim=8, label_names=("a", "b", "c"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    class Untouchable(Dataset):
        def __len__(self) -> int:
            raise AssertionError("uniform must not read the data")

        def __getitem__(self, i: int) -> dict:
            raise AssertionError("uniform must not read the data")

    assert training_for(model).initialise(model, Untouchable(), seed=0, device=torch.device("cpu")) is None
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and torch.equal(v, reference.state_dict()[k]), k


# -- the trainer hook ------------------------------------------------------------------------------------
RECIPE = {
    "model": {"name": "protopnet_resnet8",
              "config": {"img_size": [16, 16], "prototypes_per_class": 2, "prototype_dim": 8,
                         "intensity": {"kind": "window", "low": -1000.0, "high": 400.0, "unit": "HU"}}},
    "data": {"kind": "nodule_phantom",
             "params": {"size": 16, "seed": 0, "spacing_range": [1.5, 2.0], "diameter_range_mm": [4.0, 14.0]},
             "train_size": 24, "val_size": 8, "test_size": 8},
    "optim": {"name": "adamw", "lr": 0.01, "batch_size": 8, "schedule": "constant", "warmup_epochs": 0},
    "stages": [{"name": "warmup", "epochs": 1}],
    "seed": 0,
    "device": "cpu",
}


def _recipe(tmp_path, name: str, training: dict | None = None, **config):
    """RECIPE with ``config`` added to ``model.config`` and, if given, a ``training:`` section."""
    doc = json.loads(json.dumps(RECIPE))
    doc["model"]["config"].update(config)
    if training is not None:
        doc["training"] = training
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_recipe(path)


def test_trainer_calls_the_data_init_once_for_fresh_runs_only(tmp_path, monkeypatch) -> None:
    calls: list[dict] = []
    real = protopnet_training.initialise_prototypes_from_data

    def spy(model, dataset, seed, *args, **kwargs):
        out = real(model, dataset, seed, *args, **kwargs)
        calls.append({"seed": seed, "prototypes": model.prototype_layer.prototypes.detach().clone()})
        return out

    monkeypatch.setattr(protopnet_training, "initialise_prototypes_from_data", spy)
    train(_recipe(tmp_path, "uniform"), tmp_path / "uniform", quiet=True)
    assert calls == []  # uniform: never called
    final = train(_recipe(tmp_path, "data", training={"prototype_init": "data"}), tmp_path / "data", quiet=True)
    assert len(calls) == 1 and calls[0]["seed"] == derive_seed(0, "initialise")
    # The run records how it was trained: every training setting (defaults written out), in
    # final/config.json and final/recipe.yaml
    saved = json.loads((final / "config.json").read_text())
    expected = dataclasses.asdict(ProtoPNetTrainingSettings(prototype_init="data"))
    assert saved["recipe"]["training"] == expected
    assert "prototype_init" not in saved["config"]  # not part of the model
    assert load_recipe(final / "recipe.yaml").training == expected
    assert isinstance(mlmi_zoo.load(f"local-dir:{final}"), ProtoPNet)
    # A resume (here of a finished run) restores the checkpoint instead of re-initialising.
    train(_recipe(tmp_path, "data", training={"prototype_init": "data"}), tmp_path / "data", resume=True, quiet=True)
    assert len(calls) == 1


def test_a_recipe_with_prototype_init_under_model_config_still_asks_for_the_data_start(tmp_path) -> None:
    old = _recipe(tmp_path, "old", prototype_init="data")  # where recipes before config_version 2 kept it
    new = _recipe(tmp_path, "new", training={"prototype_init": "data"})
    assert old == new and old.training["prototype_init"] == "data" and "prototype_init" not in old.model.config


def test_trainer_with_uniform_equals_a_trainer_without_the_hook(tmp_path, monkeypatch) -> None:
    with_hook = train(_recipe(tmp_path, "a"), tmp_path / "a", quiet=True)
    from mlmi_zoo.training import trainer

    monkeypatch.setattr(trainer.FamilyTraining, "initialise", lambda *a, **k: None)
    monkeypatch.setattr(protopnet_training.ProtoPNetTraining, "initialise", lambda *a, **k: None)
    without = train(_recipe(tmp_path, "b"), tmp_path / "b", quiet=True)
    from mlmi_zoo._weights import load_weights

    wa, wb = load_weights(with_hook / "model.safetensors", None), load_weights(without / "model.safetensors", None)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
