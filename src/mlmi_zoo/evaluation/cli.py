"""``mlmi-zoo evaluate MODEL_URI --data SPEC --out results.json``: the command line of :func:`evaluate`.

``SPEC`` is a YAML/JSON data spec (or a recipe, whose ``data`` section is used) or an inline
``kind:key=value,...`` string (see :func:`~mlmi_zoo.evaluation.evaluate.load_data_spec`); without
``--data`` the data section of the recipe stored in the model's config.json is used. Users' own test
data: ``--test-csv test.csv`` (columns as for fine-tuning: ``image,label``, optional ``mask``,
spacing, measurement and concept columns) or ``--test-dir DIR`` (``DIR/<class>/<image>``, listed into
``<OUT stem>_cases/image_folder.csv`` beside ``OUT``; for a MIL model, a folder of bags and one
``slide_id,label`` CSV) builds the spec with
:func:`~mlmi_zoo.training.finetune.evaluation_data_spec` and evaluates its test split. Bad arguments
end with exit status 2 and one line on stderr; user errors (overlapping splits, missing files) are
reported the same way by the top-level ``mlmi-zoo`` command.
"""
from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Sequence

from mlmi_zoo.cli import _Parser

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)


def build_parser() -> _Parser:
    """The ``evaluate`` argument parser."""
    p = _Parser(prog="mlmi-zoo evaluate",
                description="Measure the task (bootstrap CIs) and the five elements of interpretability of a model; "
                            "write results.json (model cards are generated from it) and PNG figures.")
    p.add_argument("model", metavar="MODEL_URI", help="bundled name, hf-hub:ORG/REPO[@REV], local-dir:PATH or a folder")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", metavar="SPEC", help="data spec: YAML/JSON file or 'kind:key=value,...' "
                      "(e.g. 'nodule_phantom:seed=0,size=64,train_size=2000,val_size=400,test_size=400'); "
                      "default: the data of the model's training recipe")
    data.add_argument("--test-csv", type=Path, metavar="CSV", help="your own test cases: a CSV with the columns "
                      "used for fine-tuning (image,label[,mask][,spacing_mm][,<quantity>_<unit>...])")
    data.add_argument("--test-dir", type=Path, metavar="DIR",
                      help="your own test cases as DIR/<class>/<image> (a MIL model: a folder of bags and one "
                           "labels CSV, as for fine-tuning)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to evaluate (default: test)")
    p.add_argument("--out", type=Path, default=Path("results.json"), help="results JSON to write (default: results.json)")
    p.add_argument("--figures", type=Path, help="folder for the PNG figures (default: OUT's folder/figures)")
    p.add_argument("--baseline", metavar="URI", help="black-box baseline evaluated on the same cases for comparison")
    p.add_argument("--localization-data", metavar="SPEC",
                   help="a data set with lesion masks (its test split) on which localization is scored when the "
                        "evaluated data have none, e.g. 'idrid:dataset=segmentation,size=640,union=MA+HE+EX+SE'")
    p.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples of the task CIs (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of bootstrap and random orders (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, help="cases per forward pass (default: 32)")
    p.add_argument("--max-cases", type=int, help="evaluate only the first N cases of the split")
    p.add_argument("--deletion-cases", type=int, help="cases of the deletion curves (default: 64; each costs "
                   "2 x (steps + 1) forward passes per ordering, fewer for large images)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``evaluate``; ``argv[0]`` may be the word ``evaluate`` (as the top-level CLI passes it)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "evaluate":
        args_list = args_list[1:]
    parser = build_parser()
    args = parser.parse_args(args_list)
    for name in ("n_boot", "batch_size", "max_cases", "deletion_cases"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    from mlmi_zoo.evaluation.evaluate import evaluate

    data = args.data
    own: Path | None = args.test_csv if args.test_csv is not None else args.test_dir
    if own is not None:
        from mlmi_zoo.training.finetune import evaluation_data_spec

        if args.split != "test":
            parser.error(f"--test-csv / --test-dir are the test split; --split {args.split} does not apply")
        # Named as fine-tuning names its listing, so that a test folder equal to the training folder is
        # recognised by the split-overlap check (same name, same checksum) and refused.
        listing = args.out.with_name(f"{args.out.stem}_cases") / "image_folder.csv" if args.test_dir is not None else None
        data = evaluation_data_spec(args.model, own, listing=listing)
    command = " ".join(shlex.quote(a) for a in ["mlmi-zoo", "evaluate", *args_list])
    from mlmi_zoo.evaluation._common import EvaluationLimits

    limits = EvaluationLimits() if args.deletion_cases is None else EvaluationLimits(deletion_cases=args.deletion_cases)
    doc = evaluate(args.model, data, split=args.split, out=args.out, figures_dir=args.figures,
                   baseline_uri=args.baseline, n_boot=args.n_boot, seed=args.seed, batch_size=args.batch_size,
                   max_cases=args.max_cases, command=command, localization_data=args.localization_data, limits=limits)
    auroc = doc["task"]["auroc"]
    log.info("AUROC %s on %d %s cases; results in %s", auroc.get("estimate"), doc["n_cases"], doc["split"], args.out)
    print(f"wrote {args.out} ({doc['n_cases']} cases, {doc['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
