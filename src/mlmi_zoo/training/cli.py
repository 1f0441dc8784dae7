"""Command line of the training scripts: ``mlmi-zoo train`` and ``mlmi-zoo finetune``.

``main(argv)`` is called by the top-level ``mlmi-zoo`` command and by
``python -m mlmi_zoo.training`` (also under ``torchrun -m``). A bad argument, an unknown recipe key
or a value of the wrong type ends with exit code 2 and one line on stderr naming the problem.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from mlmi_zoo._config import OverrideError

__all__ = ["main", "build_parser"]


class _ArgumentError(Exception):
    """argparse wants to exit; we return its status instead (so callers can embed ``main``)."""

    def __init__(self, status: int, message: str | None) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Parser(argparse.ArgumentParser):
    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise _ArgumentError(status, message)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _ArgumentError(2, f"mlmi-zoo {self.prog.split()[-1]}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` / ``finetune`` argument parser."""
    parser = _Parser(prog="mlmi-zoo", description="Train or fine-tune mlmi-zoo models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a recipe", description="Train RECIPE.yaml; key=value overrides "
                       "such as optim.lr=0.001 stages.0.epochs=2 model.config.num_prototypes=20.")
    t.add_argument("recipe", nargs="?", help="recipe YAML (omit with --resume to use the run's recipe.yaml)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    t.add_argument("--run-dir", type=Path, help="output folder (default: runs/<recipe>-<time>)")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars; one log line per epoch")

    f = sub.add_parser("finetune", help="fine-tune a zoo model on your data",
                       description="Fine-tune NAME_OR_URI on a CSV of images (or a folder with one CSV).")
    f.add_argument("model", metavar="NAME_OR_URI")
    f.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (e.g. optim.lr=0.0003)")
    f.add_argument("--data", required=True, type=Path, metavar="DIR_OR_CSV")
    f.add_argument("--labels", help="class names in index order, comma separated (default: from the CSV)")
    f.add_argument("--freeze", action="append", metavar="PREFIX",
                   help="parameter prefix to keep frozen (repeatable; default: backbone; 'none' trains all)")
    f.add_argument("--epochs", type=int, default=3)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", type=Path, help="run folder (the model is OUT/final)")
    f.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning in --out")
    f.add_argument("--quiet", action="store_true")
    return parser


def _split_positionals(args: argparse.Namespace) -> None:
    """argparse cannot tell an optional RECIPE from the first override; a ``key=value`` is an override."""
    if args.command == "train" and args.recipe is not None and "=" in args.recipe and not args.recipe.endswith(".yaml"):
        args.overrides = [args.recipe, *args.overrides]
        args.recipe = None


def main(argv: list[str] | None = None) -> int:
    """Run ``train`` or ``finetune``; return the exit code (2: bad arguments or recipe)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except _ArgumentError as err:
        if err.message:
            (sys.stderr if err.status else sys.stdout).write(err.message)
        return err.status
    _split_positionals(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            return _train(args)
        return _finetune(args)
    except (OverrideError, FileNotFoundError, FileExistsError) as err:
        sys.stderr.write(f"mlmi-zoo {args.command}: error: {_one_line(err)}\n")
        return 2


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _train(args: argparse.Namespace) -> int:
    from mlmi_zoo.training.recipe import load_recipe
    from mlmi_zoo.training.trainer import train

    if args.resume is not None:
        if args.run_dir is not None and args.run_dir != args.resume:
            raise OverrideError(f"--run-dir {args.run_dir} and --resume {args.resume} name different runs")
        source = args.recipe or args.resume / "recipe.yaml"
        recipe = load_recipe(source, args.overrides)
        final = train(recipe, args.resume, resume=True, quiet=args.quiet)
    else:
        if args.recipe is None:
            raise OverrideError("a RECIPE.yaml is required (or --resume RUN_DIR)")
        recipe = load_recipe(args.recipe, args.overrides)
        run_dir = args.run_dir or Path("runs") / f"{Path(args.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        final = train(recipe, run_dir, resume=False, quiet=args.quiet)
    logging.getLogger("mlmi_zoo.training").info("model written to %s", final)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from mlmi_zoo.training.finetune import finetune

    freeze = ("backbone",) if args.freeze is None else tuple(p for p in args.freeze if p.lower() != "none")
    labels = tuple(s.strip() for s in args.labels.split(",")) if args.labels else None
    if labels is not None and len(labels) < 2:
        raise OverrideError(f"--labels needs at least two comma-separated class names, got {args.labels!r}")
    final = finetune(args.model, args.data, label_names=labels, freeze=freeze, epochs=args.epochs, out_dir=args.out,
                     lr=args.lr, batch_size=args.batch_size, seed=args.seed, overrides=args.overrides,
                     resume=args.resume, quiet=args.quiet)
    logging.getLogger("mlmi_zoo.training").info("fine-tuned model written to %s", final)
    return 0
