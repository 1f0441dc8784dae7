"""The run directory around the training loop: the checks and files before it starts, ``final/`` after.

:func:`open_run_dir` refuses to overwrite a finished or running run, refuses to resume with a recipe
other than the saved ``recipe.yaml``, reads the checkpoint a resume continues from, and writes
``recipe.yaml`` (every default written out) and ``env.json`` (versions, platform, seed, device,
world size). :func:`write_final` writes ``final/``, a ``save_pretrained`` folder of the selected
weights with the recipe and the data description in its config. The layout of the whole folder is
in :mod:`mlmi_zoo.training.trainer`.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from mlmi_zoo._config import to_jsonable
from mlmi_zoo._weights import write_json_atomic, write_text_atomic
from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.training.checkpoint import (
    STATE_JSON,
    Checkpoint,
    find_checkpoint,
    load_checkpoint,
)
from mlmi_zoo.training.recipe import (
    Recipe,
    load_recipe,
    recipe_differences,
    recipe_to_yaml,
)

__all__ = ["open_run_dir", "write_final"]

# The trainer's logger: these lines keep the logger name they have always had.
log = logging.getLogger("mlmi_zoo.training.trainer")


def open_run_dir(run_dir: Path, recipe: Recipe, resume: bool, *, writer: bool, device: torch.device,
                 world_size: int) -> Checkpoint | None:
    """Check ``run_dir`` and write its ``recipe.yaml`` and ``env.json``; return the checkpoint to resume from.

    Args:
        resume: continue from ``checkpoints/last``; ``None`` is returned when there is none yet.
        writer: whether this process writes files (rank 0).

    Raises:
        FileExistsError: ``run_dir`` holds a run and ``resume`` is false.
        ValueError: a resume whose recipe differs from the saved one.
    """
    recipe_file = run_dir / "recipe.yaml"
    last = run_dir / "checkpoints" / "last"
    checkpoint = None
    if resume and find_checkpoint(last) is not None:
        diff = recipe_differences(load_recipe(recipe_file), recipe)
        if diff:
            raise ValueError(f"cannot resume {run_dir}: the recipe differs from the saved one in {diff}; "
                             "resume with the saved recipe (omit the recipe argument) or start a new run")
        checkpoint = load_checkpoint(last)
    elif resume:
        log.info("no checkpoint in %s yet; starting from the beginning", run_dir)
    elif find_checkpoint(last) is not None:
        raise FileExistsError(f"{run_dir} already holds a run; pass resume=True (--resume) or another run dir")
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(recipe_file, recipe_to_yaml(recipe))
        cuda = device.type == "cuda"
        env = {**_versions(), "platform": platform.platform(), "seed": recipe.seed, "device": str(device),
               "world_size": world_size, "cuda": torch.version.cuda if cuda else None,
               "gpu": torch.cuda.get_device_name(device) if cuda else None, "num_threads": torch.get_num_threads()}
        write_json_atomic(run_dir / "env.json", env)
    return checkpoint


def write_final(run_dir: Path, model: InterpretableModel, recipe: Recipe, data: dict[str, Any], *,
                device: torch.device, world_size: int, extra: dict[str, Any] | None = None) -> tuple[Path, str]:
    """Write ``final/`` from ``checkpoints/best`` (else ``model`` as it is); return it and ``"best"`` / ``"last"``.

    The folder is written as ``.final.tmp/`` and renamed to ``final/`` when complete, so a run that
    fails never leaves a ``final/`` that looks like a finished model.

    Args:
        model: the trained model; it is loaded with the best weights and moved to the CPU.
        data: the data description for ``config.json``.
        extra: further JSON-safe fields for ``config.json`` (e.g. what fine-tuning adapted to the data).
    """
    checkpoints = run_dir / "checkpoints"
    selected = "last"
    best = find_checkpoint(checkpoints / "best")
    state = json.loads((checkpoints / "last" / STATE_JSON).read_text()) if (checkpoints / "last").is_dir() else {}
    if best is not None:
        ckpt = load_checkpoint(best)
        model.load_state_dict({k: v.to(device) for k, v in ckpt.model_state.items()})
        model.import_metadata(ckpt.state.get("model_metadata") or {})
        state, selected = ckpt.state, "best"
    fields: dict[str, Any] = {
        **(extra or {}),
        "recipe": to_jsonable(recipe),
        "data": data,
        "training": {"selected": selected, "select_metric": recipe.select_metric,
                     "selected_epoch": state.get("position", {}).get("best", {}),
                     "seed": recipe.seed, "world_size": world_size},
    }
    if recipe.model.init_from:
        fields["base_model"] = recipe.model.init_from
    final, staging = run_dir / "final", run_dir / ".final.tmp"
    if staging.exists():  # left by a run killed while writing final/
        shutil.rmtree(staging)
    model.cpu().save_pretrained(staging, extra=fields)
    write_text_atomic(staging / "recipe.yaml", recipe_to_yaml(recipe))
    if final.exists():  # a finished run resumed: its final/ is written again
        shutil.rmtree(final)
    os.replace(staging, final)
    return final, selected


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    from mlmi_zoo import __version__

    out: dict[str, str | None] = {"python": sys.version.split()[0], "mlmi_zoo": __version__}
    for pkg in ("torch", "timm", "monai", "numpy", "scikit-learn", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
