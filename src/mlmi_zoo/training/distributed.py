"""Seeds, the order of every epoch, and the ``torchrun`` process group of the trainer.

Everything random in a run is a function of the recipe's seed: :func:`derive_seed` turns the seed
and a purpose (``"order"``, an epoch, ...) into an independent 63-bit seed, and
:class:`EpochSampler` draws epoch ``e``'s permutation from ``(seed, e)`` and shards it between
processes, so a resumed epoch skips exactly the batches already done and N processes see what one
would. :class:`GlobalBatchNorm` gives batch norm global-batch statistics on CPU (gloo), where
``nn.SyncBatchNorm`` is not supported. :func:`all_reduce_sum` and :func:`gather_rows` combine
metrics across processes (each a no-op in a single process).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

__all__ = ["derive_seed", "seed_worker", "EpochSampler", "Dist", "init_distributed", "all_reduce_sum", "gather_rows",
           "GlobalBatchNorm", "convert_batchnorm"]


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed that depends on ``seed`` and ``parts`` (so (seed=0, epoch=1) != (seed=1, epoch=0))."""
    digest = hashlib.sha256(json.dumps([seed, *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python and numpy from the worker's torch seed."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a permutation fixed by ``(seed, epoch)``, sharded, resumable.

    Process ``rank`` of ``world_size`` takes positions ``rank, rank + world_size, ...`` of the
    (padded) permutation, so with a per-process batch of ``B / world_size`` the processes' j-th
    batches together are exactly the single-process j-th batch of size ``B``.

    Args:
        length: data set size.
        seed: recipe seed.
        shuffle: permute (training) or keep the order (validation, special stages).
        rank / world_size: this process and the number of processes.
        pad: repeat leading indices so every process gets as many (training); validation does not
            pad (each case is evaluated exactly once).
    """

    def __init__(self, length: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1, pad: bool = True) -> None:
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation and drop the first ``skip`` indices of this process."""
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        if self.pad and self.world_size > 1 and order:
            total = math.ceil(len(order) / self.world_size) * self.world_size
            order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.skip)


@dataclass(frozen=True)
class Dist:
    """This process's place in the ``torchrun`` group (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(values: dict[str, float], group: Dist, device: torch.device) -> dict[str, float]:
    """Sum each value over the processes (float64, so counts stay exact)."""
    if not group.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def gather_rows(t: torch.Tensor, group: Dist) -> torch.Tensor:
    """Concatenate ``t`` (N_rank, ...) from every process in rank order (the N_rank may differ)."""
    if not group.enabled:
        return t
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(group.world_size)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)  # all_gather needs equal shapes
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(group.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics span the batches of every process.

    ``nn.SyncBatchNorm`` does the same on GPUs only; this version works with any backend (gloo on
    CPU) through the differentiable ``torch.distributed.nn.functional.all_reduce``. Two passes (mean,
    then centred squares) keep the variance as accurate as single-process batch norm. State-dict
    keys are those of ``nn.BatchNorm*d``, so checkpoints load into the unconverted model.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"expected (B, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.ndim)]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        count = all_reduce(x.new_tensor(float(x.numel() // x.shape[1])))
        mean = all_reduce(x.sum(dims)) / count  # (C,)
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count  # (C,) biased, as batch norm normalises
        if self.track_running_stats:
            running_mean, running_var, tracked = self.running_mean, self.running_var, self.num_batches_tracked
            assert running_mean is not None and running_var is not None and tracked is not None  # tracked stats exist
            with torch.no_grad():
                tracked.add_(1)
                factor = (1.0 / float(tracked)) if self.momentum is None else self.momentum
                running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_batchnorm(module: nn.Module, cuda: bool) -> nn.Module:
    """Swap ``nn.BatchNorm{1,2,3}d`` for global-batch batch norm, keeping the same parameters and buffers."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        # exactly these classes (a subclass may compute something else); isinstance narrows the type
        if type(child) in _PLAIN_BATCHNORMS and isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_batchnorm(child, cuda)
    return module
