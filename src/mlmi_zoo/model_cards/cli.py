"""``mlmi-zoo card`` and ``mlmi-zoo publish``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from mlmi_zoo.cli import _Parser

__all__ = ["main"]


def _card(argv: Sequence[str]) -> int:
    from mlmi_zoo.model_cards.card import check_card, write_card

    p = _Parser(prog="mlmi-zoo card", description="Generate a model card from results.json, or check one.")
    p.add_argument("model_dirs", nargs="+", type=Path, help="model folder(s) (config.json + model.safetensors)")
    p.add_argument("--results", type=Path, help="results.json written by `mlmi-zoo evaluate` (generation)")
    p.add_argument("--figures", type=Path, help="folder holding the figures results.json cites (default: next to it)")
    p.add_argument("--check", action="store_true", help="verify the card(s) instead of writing; exit 1 on any problem")
    args = p.parse_args(argv)
    if args.check:
        failed = 0
        for folder in args.model_dirs:
            problems = check_card(folder)
            for problem in problems:
                print(f"{folder}: {problem}", file=sys.stderr)
            if not problems:
                print(f"{folder}: card OK")
            failed += bool(problems)
        return 1 if failed else 0
    if args.results is None or len(args.model_dirs) != 1:
        p.error("generation needs one MODEL_DIR and --results results.json")
    print(write_card(args.model_dirs[0], args.results, args.figures))
    return 0


def _publish(argv: Sequence[str]) -> int:
    from mlmi_zoo.hub import publish

    p = _Parser(prog="mlmi-zoo publish", description="Check the card, create the Hub repo, upload the folder, tag it.")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hugging Face Hub")
    p.add_argument("--tag", help="version tag, e.g. v1.0.0")
    p.add_argument("--private", action="store_true")
    args = p.parse_args(argv)
    commit = publish(args.model_dir, args.repo_id, tag=args.tag, private=args.private)
    print(f"published {args.model_dir} to {args.repo_id}@{args.tag or commit}")
    return 0


def main(argv: Sequence[str]) -> int:
    """Dispatch ``card`` / ``publish`` (called by the top-level CLI)."""
    command, rest = argv[0], list(argv[1:])
    return {"card": _card, "publish": _publish}[command](rest)
