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

Determinism and exact resume (:mod:`mlmi_zoo.training.distributed`). Everything random is a
function of ``recipe.seed``: the model is initialised under ``torch.manual_seed(seed)``; the order
of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``
(:class:`EpochSampler`), so a resumed epoch skips the batches already done and sees the rest in the
same order; DataLoaders get their own seeded generators and never touch the global RNG; the
python/numpy/torch RNG states are saved in every checkpoint and restored. ``checkpoints/last`` is
written after every epoch and every ``checkpoint_every_steps`` optimiser steps. On CPU a run
killed mid-epoch and resumed ends with bit-identical weights.

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

import json
import logging
import math
import os
import platform
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from mlmi_zoo._config import to_jsonable
from mlmi_zoo._weights import write_json_atomic, write_text_atomic
from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.training.augment import augmented
from mlmi_zoo.training.checkpoint import (
    STATE_JSON,
    Checkpoint,
    Position,
    find_checkpoint,
    load_checkpoint,
    load_optimizer,
    optimizer_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mlmi_zoo.training.data_spec import build_dataset, collate_for, describe
from mlmi_zoo.architectures.blocks.stages import FamilyTraining, training_for
from mlmi_zoo.training.distributed import (
    EpochSampler,
    GlobalBatchNorm,
    convert_batchnorm,
    derive_seed,
    init_distributed,
    seed_worker,
)
from mlmi_zoo.training.recipe import Recipe, StageSection, model_config, recipe_differences, recipe_to_yaml

__all__ = ["Trainer", "train", "EpochSampler", "GlobalBatchNorm", "load_checkpoint", "KILL_AT_STEP_ENV"]

log = logging.getLogger(__name__)

KILL_AT_STEP_ENV = "MLMI_ZOO_TEST_KILL_AT_STEP"


class _StageLoss(nn.Module):
    """``adapter.loss`` as a module, so that DDP sees (and synchronises) the whole forward."""

    def __init__(self, model: InterpretableModel, adapter: FamilyTraining, stage: str) -> None:
        super().__init__()
        self.model, self.adapter, self.stage = model, adapter, stage

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        out = self.adapter.loss(self.model, batch, self.stage)
        return out.loss, out.logits, out.logs


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy and AUROC (one-vs-rest macro for > 2 classes; NaN if undefined).

    Args:
        logits: (N, C).
        labels: (N,) class indices.
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    if labels.numel() == 0:
        return {"loss": math.nan, "accuracy": math.nan, "balanced_accuracy": math.nan, "auroc": math.nan}
    logits = logits.double()
    probs = logits.softmax(-1).numpy()  # (N, C)
    y = labels.numpy()
    pred = probs.argmax(-1)
    present = np.unique(y)
    if len(present) < 2:
        auroc = math.nan  # AUROC needs both classes; logged, never selected
    elif probs.shape[1] == 2:
        auroc = float(roc_auc_score(y, probs[:, 1]))
    else:  # one-vs-rest macro over the classes present (a small val split may miss a class)
        auroc = float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))
    return {
        "loss": float(nn.functional.cross_entropy(logits, labels)),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "auroc": auroc,
    }


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


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


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------
class Trainer:
    """Trains ``recipe`` into ``run_dir`` (see the module docstring for the layout).

    Args:
        recipe: the resolved recipe.
        run_dir: output folder (created).
        quiet: no progress bars; one log line per epoch (CI logs).
        datasets: optional ``{"train": ds, "val": ds}`` to train on data sets built in code
            instead of ``recipe.data`` (``describe`` then records only their sizes).
    """

    def __init__(self, recipe: Recipe, run_dir: str | Path, quiet: bool = False,
                 datasets: dict[str, Dataset] | None = None) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        self.datasets = datasets
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
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> Path:
        """Run (or, with ``resume``, continue) training; return the ``final/`` model folder.

        With ``resume`` and no checkpoint yet, training starts from the beginning (so a
        pre-emptible job can always be launched with ``--resume``).
        """
        r = self.recipe
        checkpoint = self._prepare_run_dir(resume)
        self._seed_everything(r.seed)
        train_set, val_set = self._dataset("train"), self._dataset("val")
        model = self._build_model()
        adapter = training_for(model)
        self._check_stages(adapter)
        adapter.prepare(model, train_set)  # before restoring: a resumed run restores what it set
        model.to(self.device)
        if checkpoint is None and not r.model.init_from:
            # Data-dependent start (e.g. ProtoPNet's prototype_init="data"), from its own seed; a
            # resumed run restores the weights and init_from weights are trained already.
            adapter.initialise(model, train_set, derive_seed(r.seed, "initialise"), self.device)
        self._switches(model)

        pos, pending = Position(), None
        if checkpoint is not None:
            model.load_state_dict({k: v.to(self.device) for k, v in checkpoint.model_state.items()})
            model.import_metadata(checkpoint.state.get("model_metadata") or {})
            pos = Position(**checkpoint.state["position"])
            pending = checkpoint  # optimiser and RNG are restored where the run stopped
            self._truncate_metrics(pos.metrics_lines)
            log.info("resuming %s at stage %d epoch %d batch %d (step %d)", self.run_dir, pos.stage, pos.epoch,
                     pos.batch, pos.global_step)
        if self.dist.enabled and r.sync_batchnorm:
            convert_batchnorm(model, cuda=self.device.type == "cuda")

        collate = collate_for(r.data) if self.datasets is None else default_collate
        train_sampler = EpochSampler(len(train_set), r.seed, shuffle=True, rank=self.dist.rank,
                                     world_size=self.dist.world_size)
        val_loader = self._loader(val_set, EpochSampler(len(val_set), r.seed, False, self.dist.rank,
                                                        self.dist.world_size, pad=False), self.eval_batch_size, collate, 0)
        steps_per_epoch = math.ceil(len(train_sampler) / self.batch_size)

        while pos.stage < len(r.stages):
            stage = r.stages[pos.stage]
            if stage.name in adapter.special_stages:
                if pending is not None:
                    set_rng_state(pending.tensors, pending.state["rng"])
                    pending = None
                seq = self._loader(train_set, EpochSampler(len(train_set), r.seed, False), self.eval_batch_size, collate, 0)
                records = adapter.run_special_stage(model, stage.name, seq, self.device, **_stage_options(adapter, stage))
                line = {"type": "special_stage", "stage": stage.name, "stage_index": pos.stage,
                        "records": records, **self._validate(model, adapter, val_loader, pos)}
                self._end_of_unit(model, None, None, pos, line, stage_done=True)
                continue

            params = self._freeze_for(model, adapter, stage)
            optimizer, scheduler = self._optimizer(params, stage, steps_per_epoch)
            module = _StageLoss(model, adapter, stage.name)
            if self.dist.enabled:
                from torch.nn.parallel import DistributedDataParallel

                module = DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                                 find_unused_parameters=True)
            if pending is not None:
                if pos.epoch or pos.batch:  # mid-stage: the optimiser and schedule continue
                    load_optimizer(optimizer, pending.tensors, pending.state["optimizer"])
                    scheduler.load_state_dict(pending.state["scheduler"])
                set_rng_state(pending.tensors, pending.state["rng"])
                pending = None

            while pos.epoch < stage.epochs:
                self._train_mode(model)
                train_sampler.set_epoch(pos.global_epoch, skip=pos.batch * self.batch_size)
                epoch_set = augmented(train_set, r.data.augment, r.seed, pos.global_epoch)
                loader = self._loader(epoch_set, train_sampler, self.batch_size, collate, pos.global_epoch, pos.batch)
                started, seen, sums = time.perf_counter(), 0, {"loss": 0.0, "correct": 0.0, "n": 0.0}
                bar = self._bar(loader, stage, pos, steps_per_epoch)
                for batch in bar:
                    batch = _to_device(batch, self.device)
                    loss, logits, logs = self._step(module, batch, optimizer, scheduler, params)
                    n = logits.shape[0]
                    seen += n
                    sums["loss"] += float(loss) * n
                    sums["correct"] += float((logits.argmax(-1) == batch["label"]).sum())
                    sums["n"] += n
                    for key, value in logs.items():
                        sums[f"train_{key}"] = sums.get(f"train_{key}", 0.0) + float(value) * n
                    pos.batch += 1
                    pos.global_step += 1
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.4f}", acc=f"{sums['correct'] / sums['n']:.3f}")
                    if r.checkpoint_every_steps and pos.global_step % r.checkpoint_every_steps == 0 \
                            and pos.batch < steps_per_epoch:
                        self._checkpoint("last", model, optimizer, scheduler, pos)
                    _test_kill_hook(pos.global_step)
                elapsed = time.perf_counter() - started
                train = self._reduce(sums)
                line = {"type": "epoch", "stage": stage.name, "stage_index": pos.stage, "epoch": pos.epoch,
                        "global_step": pos.global_step, "lr": optimizer.param_groups[0]["lr"],
                        "train_loss": train["loss"] / max(train["n"], 1), "train_accuracy": train["correct"] / max(train["n"], 1),
                        **{k: v / max(train["n"], 1) for k, v in train.items() if k.startswith("train_")},
                        "train_images_per_s": seen * self.dist.world_size / max(elapsed, 1e-9), "train_time_s": elapsed,
                        **self._validate(model, adapter, val_loader, pos, stage.name)}
                pos.epoch += 1
                pos.batch = 0
                pos.global_epoch += 1
                stage_done = pos.epoch >= stage.epochs
                self._end_of_unit(model, optimizer, scheduler, pos, line, stage_done)  # advances pos.stage
                if stage_done:
                    break
        return self._finish(model)

    # -- steps --------------------------------------------------------------------------------------
    def _step(self, module: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, params: list[nn.Parameter]
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
            loss, logits, logs = module(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.recipe.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, self.recipe.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        return loss.detach(), logits.detach(), logs

    @torch.no_grad()
    def _validate(self, model: InterpretableModel, adapter: FamilyTraining, loader: DataLoader, pos: Position,
                  stage: str | None = None) -> dict[str, float]:
        """Metrics on the validation split (gathered from every process), prefixed ``val_``."""
        if stage is None:  # after a special stage: evaluate with the last gradient stage's loss
            gradient = [s.name for s in self.recipe.stages[:pos.stage + 1] if s.name not in adapter.special_stages]
            stage = gradient[-1] if gradient else next(s for s in adapter.stage_names if s not in adapter.special_stages)
        was_training = model.training
        model.eval()
        logits, labels, stage_loss, n = [], [], 0.0, 0
        for batch in loader:
            batch = _to_device(batch, self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
                out = adapter.loss(model, batch, stage)
            logits.append(out.logits.float())
            labels.append(batch["label"])
            stage_loss += float(out.loss) * out.logits.shape[0]
            n += out.logits.shape[0]
        model.train(was_training)
        num_classes = model.num_classes
        all_logits = torch.cat(logits) if logits else torch.zeros(0, num_classes, device=self.device)
        all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=self.device)
        all_logits, all_labels = self._gather(all_logits), self._gather(all_labels)
        totals = self._reduce({"stage_loss": stage_loss, "n": float(n)})
        metrics = classification_metrics(all_logits.cpu(), all_labels.cpu())
        metrics["stage_loss"] = totals["stage_loss"] / max(totals["n"], 1)
        return {f"val_{k}": v for k, v in metrics.items()}

    # -- end of an epoch / special stage ---------------------------------------------------------------
    def _end_of_unit(self, model: InterpretableModel, optimizer: torch.optim.Optimizer | None,
                     scheduler: Any, pos: Position, line: dict[str, Any], stage_done: bool) -> None:
        """Log the line, track the best epoch of the last stage, advance, checkpoint."""
        r = self.recipe
        is_last_stage = pos.stage == len(r.stages) - 1
        if is_last_stage:
            value = line.get(r.select_metric, math.nan)
            minimise = r.select_metric in ("val_loss", "val_stage_loss")
            better = (value < pos.best_value if minimise else value > pos.best_value) if pos.best_value is not None else True
            if math.isfinite(value) and better:
                pos.best_value, pos.best = value, dict(line)
                line["best"] = True
        self._log_line(line)
        pos.metrics_lines += 1
        if stage_done:
            pos.stage += 1
            pos.epoch = 0
            pos.batch = 0
        if line.get("best"):
            self._checkpoint("best", model, None, None, pos)
        self._checkpoint("last", model, optimizer, scheduler, pos)

    def _finish(self, model: InterpretableModel) -> Path:
        """Write ``final/`` from the best checkpoint (else the last weights) and a "final" metrics line."""
        final = self.run_dir / "final"
        if self.dist.main:
            selected = "last"
            best = find_checkpoint(self.ckpt_dir / "best")
            state = json.loads((self.ckpt_dir / "last" / STATE_JSON).read_text()) if (self.ckpt_dir / "last").is_dir() else {}
            if best is not None:
                ckpt = load_checkpoint(best)
                model.load_state_dict({k: v.to(self.device) for k, v in ckpt.model_state.items()})
                model.import_metadata(ckpt.state.get("model_metadata") or {})
                state, selected = ckpt.state, "best"
            extra: dict[str, Any] = {
                "recipe": to_jsonable(self.recipe),
                "data": self._describe(),
                "training": {"selected": selected, "select_metric": self.recipe.select_metric,
                             "selected_epoch": state.get("position", {}).get("best", {}),
                             "seed": self.recipe.seed, "world_size": self.dist.world_size},
            }
            if self.recipe.model.init_from:
                extra["base_model"] = self.recipe.model.init_from
            model.cpu().save_pretrained(final, extra=extra)
            write_text_atomic(final / "recipe.yaml", recipe_to_yaml(self.recipe))
            self._log_line({"type": "final", "selected": selected, "path": str(final)})
            log.info("final model (%s weights) written to %s", selected, final)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()
        return final

    # -- setup helpers --------------------------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool) -> Checkpoint | None:
        recipe_file = self.run_dir / "recipe.yaml"
        checkpoint = None
        if resume and find_checkpoint(self.ckpt_dir / "last") is not None:
            from mlmi_zoo.training.recipe import load_recipe

            saved = load_recipe(recipe_file)
            diff = recipe_differences(saved, self.recipe)
            if diff:
                raise ValueError(f"cannot resume {self.run_dir}: the recipe differs from the saved one in {diff}; "
                                 "resume with the saved recipe (omit the recipe argument) or start a new run")
            checkpoint = load_checkpoint(self.ckpt_dir / "last")
        elif resume:
            log.info("no checkpoint in %s yet; starting from the beginning", self.run_dir)
        elif find_checkpoint(self.ckpt_dir / "last") is not None:
            raise FileExistsError(f"{self.run_dir} already holds a run; pass resume=True (--resume) or another run dir")
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(recipe_file, recipe_to_yaml(self.recipe))
            env = {**_versions(), "platform": platform.platform(), "seed": self.recipe.seed,
                   "device": str(self.device), "world_size": self.dist.world_size,
                   "cuda": torch.version.cuda if self.device.type == "cuda" else None,
                   "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                   "num_threads": torch.get_num_threads()}
            write_json_atomic(self.run_dir / "env.json", env)
            if checkpoint is None:
                self.metrics_path.write_text("")
        return checkpoint

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _dataset(self, split: str) -> Dataset:
        if self.datasets is not None:
            return self.datasets[split]
        return build_dataset(self.recipe.data, split)

    def _describe(self) -> dict[str, Any]:
        if self.datasets is not None:
            return {"kind": "custom", "splits": {k: {"size": len(v)} for k, v in self.datasets.items()}}
        return describe(self.recipe.data)

    def _build_model(self) -> InterpretableModel:
        """Random initialisation under ``torch.manual_seed(seed)``, or ``init_from`` weights."""
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

        return create_model(section.name, **dict(section.config))

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

    def _freeze_for(self, model: InterpretableModel, adapter: FamilyTraining, stage: StageSection) -> list[nn.Parameter]:
        """Train only the adapter's parameters of ``stage`` minus ``model.freeze`` prefixes."""
        chosen = {id(p) for p in adapter.trainable_parameters(model, stage.name)}
        prefixes = self.recipe.model.freeze
        names = [n for n, _ in model.named_parameters()]
        for prefix in prefixes:
            if not any(n == prefix or n.startswith(prefix + ".") for n in names):
                tops = sorted({n.split(".")[0] for n in names})
                raise ValueError(f"model.freeze prefix {prefix!r} matches no parameter; top-level modules: {tops}")
        params = []
        for name, p in model.named_parameters():
            frozen = any(name == f or name.startswith(f + ".") for f in prefixes)
            p.requires_grad_(id(p) in chosen and not frozen)
            if p.requires_grad:
                params.append(p)
        if not params:
            raise ValueError(f"stage {stage.name!r} has no trainable parameter left after freezing {list(prefixes)}")
        return params

    @staticmethod
    def _train_mode(model: InterpretableModel) -> None:
        """``model.train()``, then eval mode for every sub-module whose parameters are all frozen."""
        model.train()
        for module in model.modules():
            own = list(module.parameters())
            if own and not any(p.requires_grad for p in own):
                module.eval()

    def _optimizer(self, params: list[nn.Parameter], stage: StageSection, steps_per_epoch: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        o = self.recipe.optim
        lr = stage.lr if stage.lr is not None else o.lr
        if o.name == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        total = max(1, stage.epochs * steps_per_epoch)
        warmup = int(round(o.warmup_epochs * steps_per_epoch))
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(o.schedule, warmup, total))

    def _loader(self, dataset: Dataset, sampler: EpochSampler, batch_size: int, collate: Any, epoch: int,
                start_batch: int = 0) -> DataLoader:
        # The loader's own generator seeds its workers; it never draws from the global RNG.
        g = torch.Generator().manual_seed(derive_seed(self.recipe.seed, "loader", epoch, start_batch))
        workers = self.recipe.num_workers
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                          worker_init_fn=seed_worker, generator=g, pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    def _bar(self, loader: DataLoader, stage: StageSection, pos: Position, steps: int) -> Any:
        if self.quiet or not self.dist.main:
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, total=steps, initial=pos.batch, leave=False, dynamic_ncols=True,
                    desc=f"{stage.name} {pos.epoch + 1}/{stage.epochs}")

    # -- reduction across processes --------------------------------------------------------------
    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        if not self.dist.enabled:
            return values
        import torch.distributed as dist

        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, t.tolist()))

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ``t`` (N_rank, ...) from every process (sizes may differ)."""
        if not self.dist.enabled:
            return t
        import torch.distributed as dist

        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.dist.world_size)]
        dist.all_gather(sizes, torch.tensor([t.shape[0]], device=self.device))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.dist.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])

    # -- files (rank 0 only) -------------------------------------------------------------------------
    def _checkpoint(self, which: str, model: InterpretableModel, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, pos: Position) -> None:
        if not self.dist.main:
            return
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        rng_tensors, rng_meta = rng_state()
        state = {"position": asdict(pos), "optimizer": opt_meta, "rng": rng_meta,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None}
        save_checkpoint(self.ckpt_dir / which, model, state, {**opt_tensors, **rng_tensors})

    def _log_line(self, line: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(to_jsonable(line)) + "\n")
        if line["type"] == "epoch":
            log.info("%s epoch %d: train_loss %.4f  val_loss %.4f  val_auroc %.4f  val_acc %.3f  %.0f img/s%s",
                     line["stage"], line["epoch"] + 1, line["train_loss"], line["val_loss"], line["val_auroc"],
                     line["val_accuracy"], line["train_images_per_s"], "  (best)" if line.get("best") else "")
        elif line["type"] == "special_stage":
            log.info("%s: val_loss %.4f  val_auroc %.4f", line["stage"], line["val_loss"], line["val_auroc"])

    def _truncate_metrics(self, lines: int) -> None:
        """Drop metrics lines written after the checkpoint we resume from (they will be written again)."""
        if not self.dist.main or not self.metrics_path.is_file():
            return
        kept = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
        write_text_atomic(self.metrics_path, "".join(kept))


@dataclass(frozen=True)
class _Schedule:
    """Learning-rate factor at optimiser step ``step``: linear warm-up, then constant or cosine to 0."""

    kind: str
    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _stage_options(adapter: FamilyTraining, stage: StageSection) -> dict[str, Any]:
    """``epochs`` / ``lr`` of a special stage, for adapters whose ``run_special_stage`` accepts them."""
    import inspect

    accepted = inspect.signature(adapter.run_special_stage).parameters
    options = {"epochs": stage.epochs, "lr": stage.lr}
    return {k: v for k, v in options.items() if k in accepted and v is not None}


def _test_kill_hook(step: int) -> None:
    """Test hook: SIGKILL this process after optimiser step ``$MLMI_ZOO_TEST_KILL_AT_STEP``."""
    target = os.environ.get(KILL_AT_STEP_ENV)
    if target is not None and step == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def train(recipe: Recipe, run_dir: str | Path, resume: bool = False, quiet: bool = False) -> Path:
    """Train ``recipe`` into ``run_dir``; return the ``final/`` model folder (``mlmi_zoo.load``-able).

    Args:
        recipe: from :func:`~mlmi_zoo.training.recipe.load_recipe`.
        run_dir: output folder (see the module docstring for its layout).
        resume: continue from ``run_dir/checkpoints/last`` (start fresh when there is none); the
            recipe must equal the saved ``recipe.yaml``.
        quiet: no progress bars; one log line per epoch.

    Raises:
        FileExistsError: ``run_dir`` already holds a run and ``resume`` is false.
        ValueError: stages the family does not have, a batch size not divisible by the processes,
            a resume with a different recipe.
    """
    return Trainer(recipe, run_dir, quiet=quiet).fit(resume=resume)
