"""Training checkpoints: safetensors and JSON only, written atomically, verified on reading.

A checkpoint folder holds ``model.safetensors``, ``trainer_state.safetensors`` (optimiser and RNG
tensors), ``trainer_state.json`` (:class:`Position`, schedule, RNG and optimiser scalars, model
metadata) and ``manifest.json`` (the sha256 of each file, written last). It is written to
``.NAME.tmp/`` and swapped in by renames, so a crash at any point leaves a complete checkpoint:
the new one, or the previous one in ``.NAME.old/`` (:func:`find_checkpoint`). Reading checks every
file against the manifest before anything is used. Nothing is unpickled.

:func:`save_training_state` writes what an exact resume needs (weights, :class:`Position`,
optimiser, learning-rate scheduler, RNG states); :func:`restore_optimisation` puts the optimiser
and scheduler back, :func:`set_rng_state` the generators.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlmi_zoo._config import to_jsonable
from mlmi_zoo._weights import load_weights, save_weights, sha256_file, write_json_atomic
from mlmi_zoo.base import InterpretableModel

__all__ = ["Position", "Checkpoint", "save_checkpoint", "find_checkpoint", "load_checkpoint", "save_training_state",
           "restore_optimisation", "optimizer_tensors", "load_optimizer", "rng_state", "set_rng_state"]

MODEL_FILE = "model.safetensors"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
MANIFEST = "manifest.json"


@dataclass
class Position:
    """Where a run stands; saved in every checkpoint.

    Attributes:
        stage: index of the current recipe stage (``len(stages)``: all done).
        epoch: epochs completed in that stage.
        batch: batches completed in the current epoch.
        global_step: optimiser steps since the start.
        global_epoch: epochs since the start over all stages (seeds the data order).
        metrics_lines: lines in metrics.jsonl when the checkpoint was written.
        best_value: best ``select_metric`` so far in the last stage (``None``: none yet).
        best: the metrics line of that epoch.
        stage_best_value: best ``select_metric`` so far in the current stage, for a stage with
            ``patience`` (``None``: none yet).
        stage_best_epoch: epochs of the current stage completed when that value was reached.
    """

    stage: int = 0
    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    global_epoch: int = 0
    metrics_lines: int = 0
    best_value: float | None = None
    best: dict[str, Any] = field(default_factory=dict)
    stage_best_value: float | None = None
    stage_best_epoch: int = 0


def optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state_dict into tensors (for safetensors) and the rest (for JSON)."""
    if optimizer is None:
        return {}, {}
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{pid}/{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state_scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore an optimiser from the two parts :func:`optimizer_tensors` wrote."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["state_scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    # JSON turned tuples (e.g. Adam's betas) into lists; only "params" is a list in torch's format.
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch (and CUDA), python and numpy generator states: tensors and JSON-safe values."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    version, internal, gauss = random.getstate()
    state = np.random.get_state(legacy=True)  # numpy's default: the tuple form, a dict only if not MT19937
    if isinstance(state, dict):
        raise TypeError(f"numpy's global generator is {state['bit_generator']}; checkpoints save MT19937 only")
    kind, keys, pos, has_gauss, cached = state
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore the generator states :func:`rng_state` returned."""
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(dest: Path, model: InterpretableModel, state: dict[str, Any],
                    tensors: dict[str, torch.Tensor]) -> None:
    """Write a checkpoint folder atomically.

    The files go to ``.{dest.name}.tmp/`` with ``manifest.json`` (their sha256s) last; the folder
    then replaces ``dest`` by renames (``dest`` -> ``.{name}.old``, tmp -> ``dest``). A crash at
    any point leaves either the old or the new checkpoint complete (see :func:`find_checkpoint`).

    Args:
        dest: e.g. ``RUN_DIR/checkpoints/last``.
        model: its state_dict goes to ``model.safetensors`` and ``export_metadata()`` into the JSON.
        state: JSON-safe trainer state.
        tensors: trainer tensors (optimiser state, RNG states) for ``trainer_state.safetensors``.
    """
    tmp = dest.parent / f".{dest.name}.tmp"
    old = dest.parent / f".{dest.name}.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shas = {
        MODEL_FILE: save_weights(model.state_dict(), tmp / MODEL_FILE, metadata={"architecture": model.architecture}),
        STATE_TENSORS: save_weights(tensors, tmp / STATE_TENSORS),
    }
    write_json_atomic(tmp / STATE_JSON, to_jsonable({**state, "model_metadata": model.export_metadata()}))
    shas[STATE_JSON] = sha256_file(tmp / STATE_JSON)
    write_json_atomic(tmp / MANIFEST, {"files": shas})
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old)


def find_checkpoint(dest: Path) -> Path | None:
    """``dest`` if it holds a complete checkpoint, else the previous one a crash left in ``.old``."""
    for candidate in (dest, dest.parent / f".{dest.name}.old"):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


@dataclass
class Checkpoint:
    """A checkpoint read back and verified (every file against the manifest's sha256)."""

    path: Path
    model_state: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`, checking every sha256 first.

    Raises:
        FileNotFoundError: no complete checkpoint at ``path`` (nor in its ``.old`` fallback).
        WeightsError: a file differs from the manifest.
    """
    found = find_checkpoint(Path(path))
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint at {path} (a complete one has {MANIFEST})")
    shas = json.loads((found / MANIFEST).read_text())["files"]
    if sha256_file(found / STATE_JSON) != shas[STATE_JSON]:
        from mlmi_zoo._weights import WeightsError

        raise WeightsError(f"{found / STATE_JSON} differs from its manifest; the checkpoint is corrupt")
    return Checkpoint(found, load_weights(found / MODEL_FILE, shas[MODEL_FILE]),
                      load_weights(found / STATE_TENSORS, shas[STATE_TENSORS]),
                      json.loads((found / STATE_JSON).read_text()))


def save_training_state(dest: Path, model: InterpretableModel, pos: Position,
                        optimizer: torch.optim.Optimizer | None = None,
                        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """Checkpoint everything an exact resume needs: weights, position, optimiser, LR scheduler, RNG states.

    Args:
        dest: e.g. ``RUN_DIR/checkpoints/last``.
        optimizer / scheduler: those of the current gradient stage (a resume at a stage boundary
            ignores them: the next stage starts fresh ones); ``None`` after a special stage and for
            ``checkpoints/best``.
    """
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    rng_tensors, rng_meta = rng_state()
    state = {"position": asdict(pos), "optimizer": opt_meta, "rng": rng_meta,
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    save_checkpoint(dest, model, state, {**opt_tensors, **rng_tensors})


def restore_optimisation(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer,
                         scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Put a mid-stage optimiser and its scheduler (step count, hence the next rate) back as they were saved."""
    load_optimizer(optimizer, checkpoint.tensors, checkpoint.state["optimizer"])
    scheduler.load_state_dict(checkpoint.state["scheduler"])
