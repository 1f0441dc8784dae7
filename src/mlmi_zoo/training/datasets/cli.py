"""``mlmi-zoo phantom show KIND --n 16 --out grid.png``: a contact sheet of digital phantoms."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mlmi_zoo.cli import _Parser

__all__ = ["main"]

KINDS = ("nodule", "nodule3d", "lidc", "tilebag")


def main(argv: Sequence[str]) -> int:
    """Dispatch ``phantom show``."""
    argv = list(argv[1:]) if argv and argv[0] == "phantom" else list(argv)
    p = _Parser(prog="mlmi-zoo phantom", description="Digital phantoms with exact ground truth.")
    sub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    show = sub.add_parser("show", help="write a contact sheet with masks outlined and measurements printed")
    show.add_argument("kind", choices=KINDS)
    show.add_argument("--n", type=int, default=16, help="number of cases (default 16)")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--out", type=Path, default=Path("phantoms.png"))
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    from mlmi_zoo.training.datasets.show import show_phantoms

    print(show_phantoms(args.kind, args.n, args.out, seed=args.seed))
    return 0
