"""The data of one run: its training and validation splits, and the loaders that feed the training loop.

Epoch ``e`` visits the training cases in the permutation :class:`~mlmi_zoo.training.distributed.EpochSampler`
draws from ``(seed, e)``, sharded between processes, and a resumed epoch starts at its first batch not
yet done; augmentation (:func:`~mlmi_zoo.training.augment.augmented`) is a function of
``(seed, e, index)``. Each loader has its own generator, seeded from ``(seed, epoch, first batch)``,
that seeds its workers: nothing here draws from the global RNG.
"""
from __future__ import annotations

import math
from collections.abc import Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from mlmi_zoo.training.augment import augmented
from mlmi_zoo.training.data_spec import build_dataset, collate_for, describe
from mlmi_zoo.training.distributed import Dist, EpochSampler, derive_seed, seed_worker
from mlmi_zoo.training.recipe import Recipe

__all__ = ["RunData"]


class RunData:
    """The splits of ``recipe.data`` (or data sets built in code) and their loaders.

    Args:
        recipe: the run's recipe (data, seed, num_workers).
        datasets: optional ``{"train": ds, "val": ds}`` to use instead of ``recipe.data``.
        group: the process group; each process loads its shard.
        batch_size: training batch per process.
        eval_batch_size: validation and special-stage batch.
        pin_memory: pin host memory (training on a GPU).
    """

    def __init__(self, recipe: Recipe, datasets: dict[str, Dataset] | None, group: Dist, batch_size: int,
                 eval_batch_size: int, pin_memory: bool) -> None:
        self.recipe, self.datasets = recipe, datasets
        self.batch_size, self.eval_batch_size, self.pin_memory = batch_size, eval_batch_size, pin_memory
        self.train_set, val_set = self._split("train"), self._split("val")
        self.collate = collate_for(recipe.data) if datasets is None else default_collate
        self.sampler = EpochSampler(_size(self.train_set), recipe.seed, shuffle=True, rank=group.rank,
                                    world_size=group.world_size)
        self.steps_per_epoch = math.ceil(len(self.sampler) / batch_size)
        self.val_loader = self._loader(val_set, EpochSampler(_size(val_set), recipe.seed, False, group.rank,
                                                             group.world_size, pad=False), eval_batch_size, 0)

    def train_loader(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """This process's batches of epoch ``epoch`` (counted over the whole run), from batch ``start_batch`` on."""
        self.sampler.set_epoch(epoch, skip=start_batch * self.batch_size)
        epoch_set = augmented(self.train_set, self.recipe.data.augment, self.recipe.seed, epoch)
        return self._loader(epoch_set, self.sampler, self.batch_size, epoch, start_batch)

    def ordered_train_loader(self) -> DataLoader:
        """Every training case once, in index order, not augmented (special stages such as push)."""
        return self._loader(self.train_set, EpochSampler(_size(self.train_set), self.recipe.seed, False),
                            self.eval_batch_size, 0)

    def describe(self) -> dict[str, Any]:
        """What ``final/config.json`` records of the data (sizes only for data sets built in code)."""
        if self.datasets is not None:
            return {"kind": "custom", "splits": {k: {"size": _size(v)} for k, v in self.datasets.items()}}
        return describe(self.recipe.data)

    def _split(self, split: str) -> Dataset:
        if self.datasets is not None:
            return self.datasets[split]
        return build_dataset(self.recipe.data, split)

    def _loader(self, dataset: Dataset, sampler: EpochSampler, batch_size: int, epoch: int,
                start_batch: int = 0) -> DataLoader:
        g = torch.Generator().manual_seed(derive_seed(self.recipe.seed, "loader", epoch, start_batch))
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.recipe.num_workers,
                          collate_fn=self.collate, worker_init_fn=seed_worker, generator=g,
                          pin_memory=self.pin_memory, persistent_workers=False)


def _size(dataset: Dataset) -> int:
    if not isinstance(dataset, Sized):
        raise TypeError(f"the trainer needs map-style data sets with a length; got a {type(dataset).__name__} "
                        "without __len__")
    return len(dataset)
