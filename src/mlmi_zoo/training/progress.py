"""What a run reports while it trains: a progress bar on a terminal, ``metrics.jsonl``, one log line per epoch.

The progress bar is ``tqdm``, drawn only when its stream (stderr) is a terminal or the run is in a
Jupyter kernel (:func:`interactive`). Piped or redirected output (CI logs, ``nohup``, a batch job,
``> train.log 2>&1``) gets no carriage-return frames, only the one ``INFO`` log line per epoch and
per special stage that :class:`MetricsLog` writes with every metrics line (``mlmi-zoo train`` and
``mlmi-zoo finetune`` configure logging; a script calling
:func:`~mlmi_zoo.training.trainer.train` sees the lines once it configures ``logging``).
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from mlmi_zoo._config import to_jsonable
from mlmi_zoo._weights import write_text_atomic

__all__ = ["MetricsLog", "progress_bar", "interactive"]

# The trainer's logger: the epoch lines keep the logger name they have always had.
log = logging.getLogger("mlmi_zoo.training.trainer")


def interactive(stream: IO[str] | Any) -> bool:
    """Whether progress bars should draw on ``stream``: a terminal, or a Jupyter kernel (where tqdm draws a widget).

    Args:
        stream: the stream the bar would write to (``sys.stderr``).

    Returns:
        False for files, pipes and anything else that would keep every carriage-return frame.
    """
    isatty = getattr(stream, "isatty", None)
    try:
        terminal = bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        terminal = False
    return terminal or "ipykernel" in sys.modules


def progress_bar(iterable: Iterable[Any], *, desc: str, total: int, initial: int, show: bool,
                 stream: IO[str] | None = None) -> Any:
    """A bar over one epoch's batches; silent unless ``show`` and ``stream`` is :func:`interactive`.

    Args:
        iterable: the epoch's batches.
        desc: the bar's label (stage and epoch).
        total: batches in the whole epoch.
        initial: batches already done (a resumed epoch).
        show: false for ``quiet`` runs and for every process but rank 0.
        stream: where the bar draws (default: ``sys.stderr`` at call time).

    Returns:
        a ``tqdm`` iterator over ``iterable`` (with ``disable`` set when it must not draw).
    """
    from tqdm.auto import tqdm  # ~0.15 s to import (asyncio): only when a run starts

    stream = sys.stderr if stream is None else stream
    # Decided here rather than by tqdm's disable=None, so that the rule (a terminal or a notebook,
    # never a file or a pipe) is explicit and does not depend on tqdm's defaults or environment.
    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True, file=stream,
                disable=not (show and interactive(stream)))


class MetricsLog:
    """``RUN_DIR/metrics.jsonl``: one JSON line per epoch, special stage and the final model; rank 0 writes.

    Args:
        path: the ``metrics.jsonl`` file.
        writer: whether this process writes (rank 0); the others do nothing.
    """

    def __init__(self, path: Path, writer: bool) -> None:
        self.path, self.writer = path, writer

    def start(self) -> None:
        """Begin an empty file (a new run)."""
        if self.writer:
            self.path.write_text("")

    def truncate(self, lines: int) -> None:
        """Keep the first ``lines`` lines: those written before the checkpoint a run resumes from."""
        if not self.writer or not self.path.is_file():
            return
        kept = self.path.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
        write_text_atomic(self.path, "".join(kept))

    def append(self, line: dict[str, Any]) -> None:
        """Write ``line``, and log a one-line summary of an epoch or a special stage."""
        if not self.writer:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(to_jsonable(line)) + "\n")
        if line["type"] == "epoch" and "val_loss" in line:
            log.info("%s epoch %d: train_loss %.4f  val_loss %.4f  val_auroc %.4f  val_acc %.3f  %.0f img/s%s",
                     line["stage"], line["epoch"] + 1, line["train_loss"], line["val_loss"], line["val_auroc"],
                     line["val_accuracy"], line["train_images_per_s"], "  (best)" if line.get("best") else "")
        elif line["type"] == "epoch":  # not validated (recipe.validate="where_used")
            log.info("%s epoch %d: train_loss %.4f  train_acc %.3f  %.0f img/s", line["stage"], line["epoch"] + 1,
                     line["train_loss"], line["train_accuracy"], line["train_images_per_s"])
        elif line["type"] == "special_stage":
            log.info("%s: val_loss %.4f  val_auroc %.4f", line["stage"], line["val_loss"], line["val_auroc"])
