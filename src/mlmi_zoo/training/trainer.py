"""The one training loop of the zoo: stages, validation, checkpoints, exact resume, ``torchrun``.

Read :meth:`Trainer.fit` top to bottom: it builds the data and the model, then runs each recipe
stage — gradient epochs with the family adapter's loss (:mod:`mlmi_zoo.architectures.blocks.stages`), or the
adapter's special stage (e.g. ProtoPNet's push) — validating after every epoch and writing the
run directory::

    RUN_DIR/recipe.yaml            the resolved recipe (every default written out)
    RUN_DIR/env.json               versions, platform, seed, device, world size
    RUN_DIR/metrics.jsonl          one JSON line per epoch / special stage, then one "final" line
    RUN_DIR/checkpoints/last/      model.safetensors, trainer_state.safetensors (optimiser and RNG
                                   tensors), trainer_state.json (position, schedule, RNG, best
                                   metric), manifest.json (sha256 of each file, written last)
    RUN_DIR/checkpoints/best/      the epoch of the last stage with the best ``select_metric`` on val
    RUN_DIR/final/                 ``save_pretrained`` folder of the selected weights, with the recipe
                                   and the data description in config.json

The pieces the loop calls live beside it: :mod:`~mlmi_zoo.training.run_dir` (the checks and files
around the loop, ``final/``), :mod:`~mlmi_zoo.training.run_data` (the splits and their seeded,
resumable loaders), :mod:`~mlmi_zoo.training.optim` (a stage's parameters, optimiser and
learning-rate schedule), :mod:`~mlmi_zoo.training.validation` (the validation pass and its metrics),
:mod:`~mlmi_zoo.training.progress` (progress bar, ``metrics.jsonl``, one log line per epoch),
:mod:`~mlmi_zoo.training.checkpoint` and :mod:`~mlmi_zoo.training.distributed`.

Determinism and exact resume (:mod:`mlmi_zoo.training.distributed`). Everything random is a
function of ``recipe.seed``: the model is initialised under ``torch.manual_seed(seed)``; the order
of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``
(:class:`EpochSampler`), so a resumed epoch skips the batches already done and sees the rest in the
same order; DataLoaders get their own seeded generators and never touch the global RNG; the
python/numpy/torch RNG states, the optimiser and the learning-rate scheduler are saved in every
checkpoint and restored. ``checkpoints/last`` is written after every epoch and every
``checkpoint_every_steps`` optimiser steps. On CPU a run killed mid-epoch and resumed ends with
bit-identical weights.

Checkpoints are never half-written: a checkpoint is written to ``.last.tmp/``, its manifest last,
then swapped in by renames; loading checks the manifest's sha256s, and falls back to the previous
checkpoint (``.last.old/``) if a crash hit between the two renames
(:mod:`mlmi_zoo.training.checkpoint`).

Test hook: environment variable ``MLMI_ZOO_TEST_KILL_AT_STEP=k`` makes the process SIGKILL itself
right after optimiser step ``k`` (and its step checkpoint, if one is due) — the resume tests use it
to interrupt an epoch at a known point. It is read only by this module and does nothing when unset.

Distributed (``torchrun --nproc_per_node=N -m mlmi_zoo.training train ...``): gloo on CPU, NCCL on
GPU, DDP, :class:`EpochSampler` shards each epoch's permutation between processes so that the
union of the N per-process batches of a step is the single-process batch of that step
(``optim.batch_size`` is global). With ``sync_batchnorm`` (default) batch norm uses global-batch
statistics (``nn.SyncBatchNorm`` on GPU; :class:`GlobalBatchNorm` on CPU, where the former is not
supported), so N processes compute what one process would, up to floating-point summation order.
Metrics are gathered from every process; only rank 0 writes files. Every process holds the same
RNG state.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mlmi_zoo.architectures.blocks.stages import FamilyTraining, training_for
from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.training._device import channels_last, prefers_channels_last, to_device
from mlmi_zoo.training.checkpoint import (
    Checkpoint,
    Position,
    load_checkpoint,
    restore_optimisation,
    save_training_state,
    set_rng_state,
)
from mlmi_zoo.training.distributed import (
    EpochSampler,
    GlobalBatchNorm,
    all_reduce_sum,
    convert_batchnorm,
    derive_seed,
    init_distributed,
)
from mlmi_zoo.training.init import apply_init
from mlmi_zoo.training.optim import GradientStage, gradient_stage, train_mode
from mlmi_zoo.training.progress import MetricsLog, progress_bar
from mlmi_zoo.training.recipe import Recipe, StageSection, model_config
from mlmi_zoo.training.run_data import RunData
from mlmi_zoo.training.run_dir import open_run_dir, write_final
from mlmi_zoo.training.validation import classification_metrics, validate

# EpochSampler, GlobalBatchNorm, load_checkpoint, classification_metrics, derive_seed: re-exported,
# callers have always imported them from here.
__all__ = ["Trainer", "train", "EpochSampler", "GlobalBatchNorm", "load_checkpoint", "classification_metrics",
           "derive_seed", "KILL_AT_STEP_ENV"]

log = logging.getLogger(__name__)

KILL_AT_STEP_ENV = "MLMI_ZOO_TEST_KILL_AT_STEP"


class Trainer:
    """Trains ``recipe`` into ``run_dir`` (see the module docstring for the layout).

    Args:
        recipe: the resolved recipe.
        run_dir: output folder (created).
        quiet: no progress bars; one log line per epoch (CI logs).
        datasets: optional ``{"train": ds, "val": ds}`` to train on data sets built in code
            instead of ``recipe.data`` (``describe`` then records only their sizes).
        final_extra: further JSON-safe fields for ``final/config.json`` (fine-tuning records there
            what it adapted to the data).
    """

    def __init__(self, recipe: Recipe, run_dir: str | Path, quiet: bool = False,
                 datasets: dict[str, Dataset] | None = None, final_extra: dict[str, Any] | None = None) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        self.datasets = datasets
        self.final_extra = final_extra
        want_cuda = recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available())
        if recipe.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("recipe.device is 'cuda' but torch sees no GPU; use device=auto or device=cpu")
        self.dist = init_distributed("cuda" if want_cuda else "cpu")
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if want_cuda else "cpu")
        if want_cuda:
            torch.cuda.set_device(self.device)
        if self.recipe.optim.batch_size % self.dist.world_size:
            raise ValueError(f"optim.batch_size={recipe.optim.batch_size} must be divisible by the "
                             f"{self.dist.world_size} processes (it is the global batch size)")
        self.batch_size = recipe.optim.batch_size // self.dist.world_size  # per process
        self.eval_batch_size = recipe.optim.eval_batch_size or recipe.optim.batch_size
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", writer=self.dist.main)
        self._stage_best: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None  # see _early_stopping

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> Path:
        """Run (or, with ``resume``, continue) training; return the ``final/`` model folder.

        With ``resume`` and no checkpoint yet, training starts from the beginning (so a
        pre-emptible job can always be launched with ``--resume``).
        """
        r = self.recipe
        resumed = self._open_run_dir(resume)  # the checkpoint to continue from, or None
        _seed_everything(r.seed)
        self.data = RunData(r, self.datasets, self.dist, self.batch_size, self.eval_batch_size,
                            pin_memory=self.device.type == "cuda")  # the splits and loaders the helpers use
        model, adapter = self._build_model(self.data.train_set, resumed)
        pos = self._start_position(resumed)

        while pos.stage < len(r.stages):
            stage = r.stages[pos.stage]
            if stage.name in adapter.special_stages:  # one step that is not gradient descent (ProtoPNet's push)
                self._continue_run(resumed, pos)
                resumed = None
                line = self._special_stage(model, adapter, stage, pos)
                line.update(self._validate(model, adapter, self._validation_loss(adapter, pos)))
                self._end_of_unit(model, None, pos, line, stage_done=True)
                continue

            run = gradient_stage(model, adapter, stage, r.optim, r.model.freeze, self.data.steps_per_epoch,
                                 ddp=self.dist.enabled, device=self.device)
            self._continue_run(resumed, pos, run)
            resumed = None
            for _ in range(pos.epoch, stage.epochs):
                line = self._train_epoch(model, run, pos)
                if self._validates(stage, pos):
                    line.update(self._validate(model, adapter, stage.name))
                pos.epoch, pos.batch, pos.global_epoch = pos.epoch + 1, 0, pos.global_epoch + 1
                stage_done = self._early_stopping(model, stage, pos, line) or pos.epoch >= stage.epochs
                self._end_of_unit(model, run, pos, line, stage_done=stage_done)
                if stage_done:
                    break
        return self._finish(model)

    # -- one epoch ----------------------------------------------------------------------------------
    def _train_epoch(self, model: InterpretableModel, run: GradientStage, pos: Position) -> dict[str, Any]:
        """One epoch of ``run.stage`` (the rest of it, resuming mid-epoch); return the training half of its line."""
        r, stage = self.recipe, run.stage
        train_mode(model)
        loader = self.data.train_loader(pos.global_epoch, pos.batch)
        started, sums = time.perf_counter(), {"loss": 0.0, "correct": 0.0, "n": 0.0}
        bar = progress_bar(loader, desc=f"{stage.name} {pos.epoch + 1}/{stage.epochs}",
                           total=self.data.steps_per_epoch, initial=pos.batch, show=not self.quiet and self.dist.main)
        for batch in bar:
            batch = to_device(batch, self.device)
            loss, logits, logs = self._step(run, batch)
            n = logits.shape[0]
            sums["loss"] += float(loss) * n
            sums["correct"] += float((logits.argmax(-1) == batch["label"]).sum())
            sums["n"] += n
            for key, value in logs.items():
                sums[f"train_{key}"] = sums.get(f"train_{key}", 0.0) + float(value) * n
            pos.batch += 1
            pos.global_step += 1
            if not bar.disable:
                bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.4f}", acc=f"{sums['correct'] / sums['n']:.3f}")
            # (not after the epoch's last step: the end-of-epoch checkpoint follows)
            if r.checkpoint_every_steps and pos.global_step % r.checkpoint_every_steps == 0 \
                    and pos.batch < self.data.steps_per_epoch:
                self._checkpoint("last", model, run, pos)
            _test_kill_hook(pos.global_step)
        elapsed, images = time.perf_counter() - started, sums["n"]
        train = all_reduce_sum(sums, self.dist, self.device)
        n = max(train["n"], 1)
        return {"type": "epoch", "stage": stage.name, "stage_index": pos.stage, "epoch": pos.epoch,
                "global_step": pos.global_step, "lr": run.optimizer.param_groups[0]["lr"],
                "train_loss": train["loss"] / n, "train_accuracy": train["correct"] / n,
                **{k: v / n for k, v in train.items() if k.startswith("train_")},
                "train_images_per_s": images * self.dist.world_size / max(elapsed, 1e-9), "train_time_s": elapsed}

    def _step(self, run: GradientStage, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
            loss, logits, logs = run.loss(batch)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.recipe.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(run.params, self.recipe.optim.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        return loss.detach(), logits.detach(), logs

    def _special_stage(self, model: InterpretableModel, adapter: FamilyTraining, stage: StageSection,
                       pos: Position) -> dict[str, Any]:
        """Run the adapter's special stage over the training cases in order; return its metrics line (without val)."""
        records = adapter.run_special_stage(model, stage.name, self.data.ordered_train_loader(), self.device,
                                            **_stage_options(adapter, stage))
        return {"type": "special_stage", "stage": stage.name, "stage_index": pos.stage, "records": records}

    def _validates(self, stage: StageSection, pos: Position) -> bool:
        """Whether the epoch ending now is scored on the validation split (``recipe.validate``): always, or
        where the number is used (selection in the last stage, early stopping, a stage's last epoch)."""
        return (self.recipe.validate == "every_epoch" or pos.stage == len(self.recipe.stages) - 1
                or stage.patience is not None or pos.epoch + 1 >= stage.epochs)

    def _validate(self, model: InterpretableModel, adapter: FamilyTraining, stage: str) -> dict[str, float]:
        return validate(model, adapter, self.data.val_loader, stage, device=self.device, amp=self._amp, group=self.dist)

    def _validation_loss(self, adapter: FamilyTraining, pos: Position) -> str:
        """The stage whose loss validates a special stage: the last gradient stage so far, else the family's first."""
        gradient = [s.name for s in self.recipe.stages[:pos.stage + 1] if s.name not in adapter.special_stages]
        return gradient[-1] if gradient else next(s for s in adapter.stage_names if s not in adapter.special_stages)

    # -- end of an epoch / special stage ---------------------------------------------------------------
    def _better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` of ``select_metric`` beats ``best`` (a NaN never does)."""
        minimise = self.recipe.select_metric in ("val_loss", "val_stage_loss")
        return math.isfinite(value) and (best is None or (value < best if minimise else value > best))

    def _early_stopping(self, model: InterpretableModel, stage: StageSection, pos: Position,
                        line: dict[str, Any]) -> bool:
        """Track the best epoch of a stage with ``patience``; return whether the stage ends here.

        The best epoch's weights are kept in ``checkpoints/stage_best``; when the stage ends (patience
        run out, or its last epoch) they are loaded back, so the next stage (or ``final/``) starts
        from them. Without ``patience`` nothing is tracked and the stage runs all its epochs.
        """
        if stage.patience is None:
            return False
        if pos.epoch == 1:
            pos.stage_best_value, pos.stage_best_epoch, self._stage_best = None, 0, None
        if self._better(line.get(self.recipe.select_metric, math.nan), pos.stage_best_value):
            pos.stage_best_value, pos.stage_best_epoch = line[self.recipe.select_metric], pos.epoch
            # in memory on every process; on disk for a resumed run
            self._stage_best = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                                model.export_metadata())
            self._checkpoint("stage_best", model, None, pos)
        stop = pos.epoch - pos.stage_best_epoch >= stage.patience
        if stop or pos.epoch >= stage.epochs:
            line["stage_best_epoch"] = pos.stage_best_epoch
            if stop and pos.epoch < stage.epochs:
                line["early_stop"] = True
            if pos.stage_best_epoch and pos.stage_best_epoch != pos.epoch:
                if self._stage_best is None:  # resumed after the best epoch: read back what it saved
                    saved = load_checkpoint(self.ckpt_dir / "stage_best")
                    self._stage_best = saved.model_state, saved.state.get("model_metadata") or {}
                weights, metadata = self._stage_best
                model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
                model.import_metadata(metadata)
            log.info("%s ends after epoch %d of %d%s; it continues from its best epoch, %d (%s %.4f)", stage.name,
                     pos.epoch, stage.epochs, f" ({stage.patience} without a better {self.recipe.select_metric})"
                     if line.get("early_stop") else "", pos.stage_best_epoch, self.recipe.select_metric,
                     pos.stage_best_value if pos.stage_best_value is not None else math.nan)
        return stop

    def _end_of_unit(self, model: InterpretableModel, run: GradientStage | None, pos: Position, line: dict[str, Any],
                     stage_done: bool) -> None:
        """Log the line, track the best epoch of the last stage, advance, checkpoint."""
        r = self.recipe
        if pos.stage == len(r.stages) - 1:  # final/ holds the best epoch of the last stage
            value = line.get(r.select_metric, math.nan)
            if self._better(value, pos.best_value):
                pos.best_value, pos.best = value, dict(line)
                line["best"] = True
        self.metrics.append(line)
        pos.metrics_lines += 1
        if stage_done:
            pos.stage, pos.epoch, pos.batch = pos.stage + 1, 0, 0
        if line.get("best"):
            self._checkpoint("best", model, None, pos)
        self._checkpoint("last", model, run, pos)

    def _checkpoint(self, which: str, model: InterpretableModel, run: GradientStage | None, pos: Position) -> None:
        if self.dist.main:
            save_training_state(self.ckpt_dir / which, model, pos, None if run is None else run.optimizer,
                                None if run is None else run.scheduler)

    def _finish(self, model: InterpretableModel) -> Path:
        """Write ``final/`` from the best checkpoint (else the last weights) and a "final" metrics line."""
        final = self.run_dir / "final"
        if self.dist.main:
            final, selected = write_final(self.run_dir, model, self.recipe, self.data.describe(), device=self.device,
                                          world_size=self.dist.world_size, extra=self.final_extra)
            self.metrics.append({"type": "final", "selected": selected, "path": str(final)})
            log.info("final model (%s weights) written to %s", selected, final)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()
        return final

    # -- setup ----------------------------------------------------------------------------------------
    def _open_run_dir(self, resume: bool) -> Checkpoint | None:
        resumed = open_run_dir(self.run_dir, self.recipe, resume, writer=self.dist.main, device=self.device,
                               world_size=self.dist.world_size)
        if resumed is None:
            self.metrics.start()
        return resumed

    def _build_model(self, train_set: Dataset, resumed: Checkpoint | None) -> tuple[InterpretableModel, FamilyTraining]:
        """The model on its device (initialised, or the checkpoint's weights) and its family's training adapter."""
        r = self.recipe
        model = self._create_model(resumed)
        adapter = training_for(model, r.training)
        self._check_stages(adapter)
        adapter.prepare(model, train_set)  # before restoring: a resumed run restores what it set
        model.to(self.device)
        if resumed is None and not r.model.init_from:
            # Data-dependent start (e.g. ProtoPNet's prototype_init="data"), from its own seed; a
            # resumed run restores the weights and init_from weights are trained already.
            adapter.initialise(model, train_set, derive_seed(r.seed, "initialise"), self.device)
        self._switches(model)
        if resumed is not None:
            model.load_state_dict({k: v.to(self.device) for k, v in resumed.model_state.items()})
            model.import_metadata(resumed.state.get("model_metadata") or {})
        if self.dist.enabled and r.sync_batchnorm:
            convert_batchnorm(model, cuda=self.device.type == "cuda")
        if prefers_channels_last(model):  # depthwise convolutions run faster channels-last
            channels_last(model)
        return model, adapter

    def _create_model(self, resumed: Checkpoint | None = None) -> InterpretableModel:
        """Random initialisation under ``torch.manual_seed(seed)`` and ``model.init``, or ``init_from`` weights.

        A pretrained ``model.init`` also appends its normalisation to the intensity transform and
        records ``base_weights`` (:func:`~mlmi_zoo.training.init.apply_init`); a resumed run sets
        both as well but takes its weights from the checkpoint. An ``init_from`` model inherits
        the ``base_weights`` of its parent (``load`` reads them from its config.json).
        """
        section = self.recipe.model
        torch.manual_seed(self.recipe.seed)
        if section.init_from:
            from mlmi_zoo.hub import load

            config = model_config(section)  # type-checked values of the keys the recipe sets
            model = load(section.init_from, **{k: getattr(config, k) for k in section.config})
            if model.architecture != section.name:
                raise ValueError(f"model.init_from {section.init_from!r} holds a {model.architecture}, "
                                 f"but model.name is {section.name!r}")
            report = model.load_report
            if report is not None and report.skipped:
                log.warning("re-initialised (shape changed for the new config): %s", ", ".join(report.skipped))
            return model.train()
        from mlmi_zoo.registry import create_model

        model = create_model(section.name, **dict(section.config))
        if section.init != "random":
            model = apply_init(model, section.init, load_weights=resumed is None)
            if resumed is None:
                log.info("backbone initialised from %s (%s)", section.init, model.base_weights)
        return model

    def _start_position(self, resumed: Checkpoint | None) -> Position:
        if resumed is None:
            return Position()
        pos = Position(**resumed.state["position"])
        self.metrics.truncate(pos.metrics_lines)  # the lines after the checkpoint will be written again
        log.info("resuming %s at stage %d epoch %d batch %d (step %d)", self.run_dir, pos.stage, pos.epoch,
                 pos.batch, pos.global_step)
        return pos

    @staticmethod
    def _continue_run(resumed: Checkpoint | None, pos: Position, run: GradientStage | None = None) -> None:
        """After a resume: the optimiser and schedule (mid-stage), then the RNG states, as the checkpoint saved them."""
        if resumed is None:
            return
        if run is not None and (pos.epoch or pos.batch):
            restore_optimisation(resumed, run.optimizer, run.scheduler)
        set_rng_state(resumed.tensors, resumed.state["rng"])

    def _check_stages(self, adapter: FamilyTraining) -> None:
        unknown = [s.name for s in self.recipe.stages if s.name not in adapter.stage_names]
        if unknown:
            raise ValueError(f"stages {unknown} are not stages of the {adapter.family} family; "
                             f"its stages are {list(adapter.stage_names)}")

    def _switches(self, model: InterpretableModel) -> None:
        r = self.recipe
        cuda = self.device.type == "cuda"
        self._amp = r.amp and cuda
        if r.amp and not cuda:
            log.info("amp=true has no effect on CPU; training in float32")
        if r.compile and not cuda:
            log.info("compile=true has no effect on CPU; running eagerly")
        elif r.compile:
            model.compile()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _stage_options(adapter: FamilyTraining, stage: StageSection) -> dict[str, Any]:
    """``epochs`` / ``lr`` of a special stage, for adapters whose ``run_special_stage`` accepts them."""
    accepted = inspect.signature(adapter.run_special_stage).parameters
    options = {"epochs": stage.epochs, "lr": stage.lr}
    return {k: v for k, v in options.items() if k in accepted and v is not None}


def _test_kill_hook(step: int) -> None:
    """Test hook: SIGKILL this process after optimiser step ``$MLMI_ZOO_TEST_KILL_AT_STEP``."""
    target = os.environ.get(KILL_AT_STEP_ENV)
    if target is not None and step == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def train(recipe: Recipe, run_dir: str | Path, resume: bool = False, quiet: bool = False,
          final_extra: dict[str, Any] | None = None) -> Path:
    """Train ``recipe`` into ``run_dir``; return the ``final/`` model folder (``mlmi_zoo.load``-able).

    Args:
        recipe: from :func:`~mlmi_zoo.training.recipe.load_recipe`.
        run_dir: output folder (see the module docstring for its layout).
        resume: continue from ``run_dir/checkpoints/last`` (start fresh when there is none); the
            recipe must equal the saved ``recipe.yaml``.
        quiet: no progress bars; one log line per epoch.
        final_extra: further JSON-safe fields for ``final/config.json``.

    Raises:
        FileExistsError: ``run_dir`` already holds a run and ``resume`` is false.
        ValueError: stages the family does not have, a batch size not divisible by the processes,
            a resume with a different recipe.
    """
    return Trainer(recipe, run_dir, quiet=quiet, final_extra=final_extra).fit(resume=resume)
