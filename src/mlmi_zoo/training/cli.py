"""Command line of the training scripts: ``mlmi-zoo train`` and ``mlmi-zoo finetune``.

``main(argv)`` is called by the top-level ``mlmi-zoo`` command and by
``python -m mlmi_zoo.training`` (also under ``torchrun -m``). Options and ``key=value`` overrides may
come in any order (``finetune NAME --data D epochs=3 --out O``). ``finetune`` takes a short list of
its own keys (:data:`FINETUNE_KEYS`: ``epochs=3``, ``lr=0.0003``, ``intensity=refit`` ...) besides
dotted recipe keys (``optim.weight_decay=0.01``). A bad argument, an unknown key or a value of the
wrong type ends with exit code 2 and one line on stderr naming the problem; data that cannot train
the model end the same way, with one line per problem and its fix. Progress bars are drawn only on a
terminal; otherwise each epoch and stage is one log line (:mod:`mlmi_zoo.training.progress`).
"""
from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from mlmi_zoo._config import OverrideError

__all__ = ["main", "build_parser", "FINETUNE_KEYS"]


class _ArgumentError(Exception):
    """argparse wants to exit; we return its status instead (so callers can embed ``main``)."""

    def __init__(self, status: int, message: str | None) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Parser(argparse.ArgumentParser):
    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise _ArgumentError(status, message)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _ArgumentError(2, f"{self.prog}: error: {message}\n")


def _prefixes(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    return () if [p.lower() for p in parts] == ["none"] else parts


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(","))


def _intensity(text: str) -> str:
    from mlmi_zoo.training.finetune import INTENSITY_MODES

    if text not in INTENSITY_MODES:
        raise ValueError(f"expected one of {', '.join(INTENSITY_MODES)}")
    return text


@dataclass(frozen=True)
class _Key:
    """One short ``key=value`` of ``finetune``: the option it stands for, how its value is read, what it means."""

    option: str
    parse: Callable[[str], Any]
    meaning: str


# The finetune keys that matter, as key=value or --option (the option is the key with '-' for '_').
FINETUNE_KEYS: dict[str, _Key] = {
    "epochs": _Key("epochs", int, "epochs of each gradient stage of the base model's stages (default: from a "
                   "budget of 1000 optimiser steps shared by the stages, see steps=)"),
    "steps": _Key("steps", int, "optimiser steps shared by the gradient stages in the base model's proportions, "
                  "epochs = steps / (training images / batch size) (default 1000; fewer for images of more than "
                  "2**17 pixels or voxels, 1000 * 2**17 / voxels and at least 300: 500 for 64³; epochs= overrides it)"),
    "patience": _Key("patience", int, "early stopping: a gradient stage stops after this many epochs without a "
                     "better val AUROC and continues from its best epoch (default 0: every epoch runs)"),
    "lr": _Key("lr", float, "peak learning rate of every gradient stage, cosine decay (default: the base model's, "
               "stage by stage)"),
    "batch_size": _Key("batch_size", int, "images per optimiser step (default 16)"),
    "freeze": _Key("freeze", _prefixes, "parameter prefixes kept frozen, comma separated, e.g. backbone; 'none' "
                   "trains all (default: none)"),
    "labels": _Key("labels", _names, "class names in index order, comma separated (default: the labels the "
                   "data hold, sorted)"),
    "val_fraction": _Key("val_fraction", float, "share of the data held out for validation (early stopping and "
                         "the choice of the final epoch), split by seed (default 0.2)"),
    "seed": _Key("seed", int, "seed of the split, the data order and the new heads (default 0)"),
    "concepts": _Key("concepts", _names, "a concept bottleneck on your own concepts: CSV columns, comma separated, "
                     "each NAME or NAME:KIND (binary, ordinal, categorical, continuous; 0/1 columns are binary, "
                     "NAME_mm continuous; level codes 0..K-1); they replace the base model's concepts. The head "
                     "learns from the predicted concepts with random corrections (training.mode=sequential, "
                     "training.intervention_rate=0.25, model.config.calibrated_concepts=true; "
                     "training.mode=independent: on true concepts only)"),
    "intensity": _Key("intensity", _intensity, "check: refuse images the base model's intensity transform "
                      "cannot read (default); refit: re-fit its window to your training images (recorded); "
                      "keep: no check"),
}
# None: the value is derived by plan_finetune (finetune_defaults.default_stages, DEFAULT_FREEZE, the base model's rates).
_DEFAULTS: dict[str, Any] = {"epochs": None, "steps": None, "patience": None, "lr": None, "batch_size": 16,
                             "freeze": None, "labels": None, "val_fraction": 0.2, "seed": 0, "intensity": "check",
                             "concepts": None}

_FINETUNE_EPILOG = "key=value overrides (anywhere on the line, like the options):\n" + "\n".join(
    textwrap.fill(k.meaning, width=100, initial_indent=f"  {key + '=...':<18}", subsequent_indent=" " * 20)
    for key, k in FINETUNE_KEYS.items()) + """
  dotted recipe keys, e.g. optim.weight_decay=0.01  stages.1.epochs=10  training.fa_coef=0
                    data.params.channels=1 (read PNG/JPEG as greyscale)  model.config.intensity.kind=identity

DATA is a CSV (image,label[,mask][,spacing_mm][,<quantity>_<unit>...][,patient]; image paths relative to the CSV),
a folder holding one CSV, or a folder with one sub-folder per class (DIR/<class>/<image>.png).
The model is OUT/final; evaluate it on your test data with
  mlmi-zoo evaluate OUT/final --test-csv test.csv   (or --test-dir DIR)"""


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` / ``finetune`` argument parser.

    Returns:
        the parser; ``key=value`` words after the options are collected by :func:`main`.
    """
    parser = _Parser(prog="mlmi-zoo", description="Train or fine-tune mlmi-zoo models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a recipe", description="Train RECIPE.yaml; key=value overrides "
                       "such as optim.lr=0.001 stages.0.epochs=2 model.config.num_prototypes=20, in any order "
                       "with the options.")
    t.add_argument("recipe", nargs="?", help="recipe YAML (omit with --resume to use the run's recipe.yaml)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    t.add_argument("--run-dir", type=Path, help="output folder (default: runs/<recipe>-<time>)")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars; one log line per epoch")

    f = sub.add_parser("finetune", help="fine-tune a zoo model on your data",
                       description="Fine-tune NAME_OR_URI on your images: a CSV, a folder with one CSV, or a "
                       "folder with one sub-folder per class (a MIL model: a folder of bags and one labels CSV). "
                       "Every check of the data runs before the first epoch.",
                       epilog=_FINETUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("model", metavar="NAME_OR_URI", help="bundled name (mlmi-zoo list --pretrained), hf-hub:ORG/REPO, "
                   "local-dir:PATH or a model folder")
    f.add_argument("overrides", nargs="*", metavar="key=value", help="overrides (see below)")
    f.add_argument("--data", required=True, type=Path, metavar="DATA",
                   help="CSV, folder with one CSV, or class folders; for a MIL model, a folder of bag files and one "
                        "labels CSV")
    f.add_argument("--out", type=Path, help="run folder (default finetune-<architecture>); the model is OUT/final")
    f.add_argument("--labels", help=FINETUNE_KEYS["labels"].meaning)
    f.add_argument("--freeze", action="append", metavar="PREFIX",
                   help="parameter prefix to keep frozen (repeatable; default: none, every layer trains)")
    f.add_argument("--epochs", type=int, help=FINETUNE_KEYS["epochs"].meaning)
    f.add_argument("--steps", type=int, help=FINETUNE_KEYS["steps"].meaning)
    f.add_argument("--patience", type=int, help=FINETUNE_KEYS["patience"].meaning)
    f.add_argument("--lr", type=float, help=FINETUNE_KEYS["lr"].meaning)
    f.add_argument("--batch-size", type=int, help=FINETUNE_KEYS["batch_size"].meaning)
    f.add_argument("--val-fraction", type=float, help=FINETUNE_KEYS["val_fraction"].meaning)
    f.add_argument("--seed", type=int, help=FINETUNE_KEYS["seed"].meaning)
    f.add_argument("--concepts", help=FINETUNE_KEYS["concepts"].meaning)
    f.add_argument("--intensity", choices=("check", "refit", "keep"), help=FINETUNE_KEYS["intensity"].meaning)
    f.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning in --out")
    f.add_argument("--quiet", action="store_true", help="no progress bars; one log line per epoch")
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with ``key=value`` words anywhere: argparse takes positionals in one run only."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = f"mlmi-zoo {args.command}"
    for word in extra:
        if word.startswith("-"):
            raise _ArgumentError(2, f"{command}: error: unrecognized option {word!r} (see --help)\n")
        if "=" not in word:
            raise _ArgumentError(2, f"{command}: error: unexpected argument {word!r}; overrides are key=value "
                                    "(see --help)\n")
    args.overrides = [*args.overrides, *extra]
    if args.command == "train" and args.recipe is not None and "=" in args.recipe \
            and not args.recipe.endswith(".yaml"):
        # argparse cannot tell an optional RECIPE from the first override; a key=value is an override.
        args.overrides = [args.recipe, *args.overrides]
        args.recipe = None
    if args.command == "finetune":
        _finetune_keys(args)
    return args


def _finetune_keys(args: argparse.Namespace) -> None:
    """Move short ``key=value`` words onto their options; leave dotted (recipe) keys as overrides."""
    from mlmi_zoo.training.recipe import Recipe

    options: dict[str, Any] = {
        "epochs": args.epochs, "steps": args.steps, "patience": args.patience, "lr": args.lr,
        "batch_size": args.batch_size, "val_fraction": args.val_fraction,
        "seed": args.seed, "intensity": args.intensity,
        "labels": _names(args.labels) if args.labels else None,
        "concepts": _names(args.concepts) if args.concepts else None,
        "freeze": None if args.freeze is None else tuple(p for p in args.freeze if p.lower() != "none"),
    }
    recipe_keys = {f.name for f in fields(Recipe)}
    rest = []
    for word in args.overrides:
        key, _, text = word.partition("=")
        key = key.strip()
        if "." in key:
            rest.append(word)
            continue
        if key not in FINETUNE_KEYS:
            if key in recipe_keys:
                rest.append(word)
                continue
            sections = {"model", "data", "optim", "stages", "training"}
            raise OverrideError(f"unknown key {key!r} in {word!r}; finetune keys: {', '.join(FINETUNE_KEYS)}; recipe "
                                f"keys are dotted (optim.lr=...) or one of {sorted(recipe_keys - sections)}")
        spec = FINETUNE_KEYS[key]
        try:
            value = spec.parse(text.strip())
        except ValueError as err:
            raise OverrideError(f"{word!r}: cannot read {text!r} for {key} ({err})") from err
        given = options[spec.option]
        if given is not None and given != value:
            raise OverrideError(f"{word!r} and --{key.replace('_', '-')} {given!r} disagree; give one")
        options[spec.option] = value
    args.overrides = rest
    for name, value in options.items():
        setattr(args, name, _DEFAULTS[name] if value is None else value)
    if args.labels is not None and (len(args.labels) < 2 or not all(args.labels)):
        raise OverrideError(f"labels needs at least two comma-separated class names, got {','.join(args.labels)!r}")


def main(argv: list[str] | None = None) -> int:
    """Run ``train`` or ``finetune``; return the exit code (2: bad arguments, recipe or data)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in ("train", "finetune") else "train|finetune"
    try:
        args = _parse(argv)
    except _ArgumentError as err:
        if err.message:
            (sys.stderr if err.status else sys.stdout).write(err.message)
        return err.status
    except OverrideError as err:
        sys.stderr.write(f"mlmi-zoo {command}: error: {_one_line(err)}\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            return _train(args)
        return _finetune(args)
    except (OverrideError, FileNotFoundError, FileExistsError) as err:
        sys.stderr.write(f"mlmi-zoo {args.command}: error: {_one_line(err)}\n")
        return 2
    except ValueError as err:  # data that cannot train the model: one line per problem, each with its fix
        sys.stderr.write(f"mlmi-zoo {args.command}: error: {str(err).strip()}\n")
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

    final = finetune(args.model, args.data, label_names=args.labels, freeze=args.freeze, epochs=args.epochs,
                     out_dir=args.out, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                     overrides=args.overrides, resume=args.resume, quiet=args.quiet, val_fraction=args.val_fraction,
                     intensity=args.intensity, patience=args.patience, steps=args.steps, concepts=args.concepts)
    logging.getLogger("mlmi_zoo.training").info("fine-tuned model written to %s", final)
    return 0
