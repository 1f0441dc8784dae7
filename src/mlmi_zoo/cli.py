"""``mlmi-zoo`` command line: list, info, demo, phantom, train, finetune, evaluate, explain, card, publish.

Each sub-command imports what it needs when it runs, so ``mlmi-zoo list`` stays fast. Bad
arguments and user errors (unknown model, missing file, refused weights) exit with status 2 and one
line on stderr; ``--help`` works on every command.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, NoReturn, Sequence

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _cmd_list(args: argparse.Namespace) -> int:
    from mlmi_zoo.registry import list_models

    for name in list_models(args.pattern, pretrained=args.pretrained):
        print(name)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from mlmi_zoo._config import to_jsonable
    from mlmi_zoo.registry import create_model, get_entry, list_models

    if "." in args.name or ":" in args.name:
        from mlmi_zoo.hub import load, resolve
        from mlmi_zoo.registry import read_config

        folder = resolve(args.name)
        doc = read_config(folder)
        model = load(args.name)
        doc["num_parameters"] = sum(p.numel() for p in model.parameters())
        doc["folder"] = str(folder)
        print(json.dumps(doc, indent=2))
        return 0
    entry = get_entry(args.name)
    model = create_model(args.name)
    info = {
        "architecture": args.name,
        "family": model.family,
        "summary": entry.doc,
        "model_class": f"{entry.model_class.__module__}.{entry.model_class.__name__}",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "input_spec": to_jsonable(model.input_spec),
        "default_config": to_jsonable(model.config),
        "pretrained": list_models(f"{args.name}.*", pretrained=True),
    }
    print(json.dumps(info, indent=2))
    return 0


def _delegate(module: str, command: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module).main([command, *args.rest])

    return run


def _build_parser() -> argparse.ArgumentParser:
    from mlmi_zoo._version import __version__

    parser = _Parser(prog="mlmi-zoo", description="Inherently interpretable models for medical imaging.")
    parser.add_argument("--version", action="version", version=f"mlmi-zoo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("list", help="list registered architectures (or bundled weights with --pretrained)")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'protopnet_*'")
    p.add_argument("--pretrained", action="store_true", help="list bundled pretrained weights instead")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="show an architecture's config and input spec, or a model folder's config")
    p.add_argument("name", help="architecture (family_backbone) or weights (family_backbone.tag, hf-hub:…, local-dir:…)")
    p.set_defaults(func=_cmd_info)

    for command, (module, help_text) in DELEGATED.items():
        p = sub.add_parser(command, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the command (see `mlmi-zoo COMMAND --help`)")
        p.set_defaults(func=_delegate(module, command))
    return parser


DELEGATED = {
        "demo": ("mlmi_zoo.model_cards.demo", "explain bundled sample cases with bundled models; write an HTML report"),
        "phantom": ("mlmi_zoo.training.datasets.cli", "digital phantoms: `phantom show nodule --n 16 --out grid.png`"),
        "train": ("mlmi_zoo.training.cli", "train a model from a YAML recipe: `train RECIPE.yaml [key=value …]`"),
        "finetune": ("mlmi_zoo.training.cli", "fine-tune a zoo model on private data: `finetune NAME --data DIR_OR_CSV`"),
        "evaluate": ("mlmi_zoo.evaluation.cli", "measure the task and the five elements: `evaluate MODEL --data SPEC --out results.json` (or `--test-csv FILE`)"),
        "card": ("mlmi_zoo.model_cards.cli", "generate or check a model card: `card MODEL_DIR --results results.json` / `card --check MODEL_DIR`"),
        "publish": ("mlmi_zoo.model_cards.cli", "check the card, upload a model folder to the Hub and tag it"),
        "explain": ("mlmi_zoo.evaluation.explain_files", "explain image files (PNG, DICOM, NIfTI, or a folder): `explain MODEL FILE… --out report.html`"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlmi-zoo`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if argv and argv[0] in DELEGATED:
        # Sub-commands with their own parsers get every argument, options included.
        args = argparse.Namespace(command=argv[0], rest=argv[1:], verbose=False,
                                  func=_delegate(DELEGATED[argv[0]][0], argv[0]))
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mlmi_zoo._config import OverrideError
    from mlmi_zoo._weights import WeightsError

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, OverrideError, WeightsError) as err:
        print(f"mlmi-zoo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
