"""What a run reports while it trains: a progress bar on a terminal, ``metrics.jsonl``, one log line per epoch.

The progress bar is ``tqdm`` with ``disable=None``: it draws only when stderr is a terminal (or in a
notebook). Piped or redirected output (CI logs, ``nohup``, a batch job) gets no carriage-return
frames, only the one ``INFO`` log line per epoch and per special stage that :class:`MetricsLog`
writes with every metrics line (``mlmi-zoo train`` configures logging; a script calling
:func:`~mlmi_zoo.training.trainer.train` sees the lines once it configures ``logging``).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlmi_zoo._config import to_jsonable
from mlmi_zoo._weights import write_text_atomic

__all__ = ["MetricsLog", "progress_bar"]

# The trainer's logger: the epoch lines keep the logger name they have always had.
log = logging.getLogger("mlmi_zoo.training.trainer")


def progress_bar(iterable: Iterable[Any], *, desc: str, total: int, initial: int, show: bool) -> Any:
    """A bar over one epoch's batches; silent unless ``show`` and stderr is a terminal.

    Args:
        total: batches in the whole epoch.
        initial: batches already done (a resumed epoch).
        show: false for ``quiet`` runs and for every process but rank 0.
    """
    from tqdm.auto import tqdm  # ~0.15 s to import (asyncio): only when a run starts

    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True,
                disable=None if show else True)


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
        if line["type"] == "epoch":
            log.info("%s epoch %d: train_loss %.4f  val_loss %.4f  val_auroc %.4f  val_acc %.3f  %.0f img/s%s",
                     line["stage"], line["epoch"] + 1, line["train_loss"], line["val_loss"], line["val_auroc"],
                     line["val_accuracy"], line["train_images_per_s"], "  (best)" if line.get("best") else "")
        elif line["type"] == "special_stage":
            log.info("%s: val_loss %.4f  val_auroc %.4f", line["stage"], line["val_loss"], line["val_auroc"])
