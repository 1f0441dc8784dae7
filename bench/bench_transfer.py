"""Do the fine-tuning defaults transfer? ProtoPNet (or a concept bottleneck, or attention MIL) against a
black box, both fine-tuned by the default command, on data sets the defaults were not chosen on (CPU, resumable).

Each data set is exported the way a user would hold it: PNG or NIfTI files in one folder per class
for training (``DIR/<class>/<image>``), a ``test.csv`` (``image,label,patient``) for testing, under
the user cache directory (:func:`mlmi_zoo.architectures.blocks.pretrained.cache_dir`), never in the
repository. Then, for each family, exactly the command a user types::

    mlmi-zoo finetune protopnet_resnet8.<parent> --data DIR --out OUT      # and baseline_resnet8.<parent>

runs in this process through the CLI entry point (:func:`mlmi_zoo.training.cli.main`): the
validation split is carved from the training folder, the stages, epochs, early stopping and the
selected epoch are the defaults of :mod:`mlmi_zoo.training.finetune` (a data set may add the
options every user of such data needs, :attr:`DataSet.options`). Each model is then evaluated on
the test cases with :func:`mlmi_zoo.evaluation.evaluate.evaluate` (the results document; its
recognizability block holds ProtoPNet's degenerate-prototype counts, ``prototype_sanity``), and the
two models' test AUROCs and their paired difference get 95% percentile-bootstrap intervals that
resample patients (women, photographs, volumes: what the data name) with
:func:`mlmi_zoo.evaluation.bootstrap.bootstrap_ci`. The target: the interpretable model within
0.02 test AUROC of the baseline.

Transfer data sets (``--data-root`` or ``$MLMI_ZOO_DATA``; none was used to choose the defaults):

* ``vessel3d``: VesselMNIST3D (Yang et al., "MedMNIST v2", Scientific Data 2023; IntrA, Yang et al.
  CVPR 2020), 28^3 vessel segments, aneurysm vs vessel; parents ``*.adrenalmnist3d``;
* ``adrenal64``: AdrenalMNIST3D at 64^3 (MedMNIST+), hyperplasia vs normal; parents
  ``*.adrenalmnist3d``, which were trained on the 28^3 version of the same cases: a resolution
  transfer. The training volumes are a subset of the parents' training cases; the test volumes are
  the official test split, which the parents never trained on (:func:`check_adrenal_splits` checks
  that the two files hold the same cases in the same splits);
* ``mias_patch``: 64-px crops at 0.4 mm from mini-MIAS (Suckling et al. 1994): centred (with a small
  jitter) on a radiologist's circle vs normal breast tissue of normal mammograms, women split as
  :mod:`mlmi_zoo.training.datasets.mias` splits them (train women for training, test women for
  testing); parents ``*.pneumoniamnist`` (1-channel X-ray);
* ``idrid_ex``: 64-px RGB tiles of the IDRiD segmentation photographs (Porwal et al., Data 2018) at
  a long side of 1024 px, with vs without hard-exudate pixels, photographs split as
  :mod:`mlmi_zoo.training.datasets.idrid` splits them; parents ``*.retinamnist``;
* ``idrid_rdr256``: whole IDRiD grading photographs at 256 px (padded to a square), referable
  diabetic retinopathy (grade >= 2) vs not, the 413 train and validation photographs of the module
  for training and the 103 official test photographs; parents ``*.retinamnist`` (28-px DeepDRiD
  photographs): the budget at 256 px;
* ``mias_concepts``: the ``mias_patch`` crops (the same images), with the radiologists' annotation
  as concept columns (one binary concept per abnormality class, ``tissue`` as an ordinal concept)
  in ``train.csv`` and ``test.csv``: a concept bottleneck on the user's own concepts
  (``cbm_resnet8.lidc_nodule --concepts ...``) against ``baseline_resnet8.lidc_nodule``, both with
  ``--intensity refit`` (8-bit PNGs into CT models); the baseline drops its diameter head, which
  these data cannot train (``model.config.quantities=[]``);
* ``adrenal64_bags``: the ``adrenal64`` volumes as bags of their axial slices, each slice encoded as
  the base model's instances were (:mod:`_transfer_bags`): ``abmil_features.idrid_rdr`` fine-tuned on
  the bags, compared case by case with the ``adrenal64`` baseline runs (the 3D black box on the
  volumes);
* ``adrenal64_bags_matched``: the same bags and the same attention-MIL runs' command, compared with the
  black box on bags (``bag_baseline_features``: instance MLP, mean and max pooling) fine-tuned by the
  same command from its parent on the same IDRiD bags as ``abmil_features.idrid_rdr``'s (the zoo
  bundles none, so the benchmark trains it once from ``bag_baseline_idrid_rdr.yaml``): the two differ
  in the pooling only.

The data sets, the defaults' signature and the grid are :mod:`_transfer_sets`; exporting is
:mod:`_transfer_data` (and :mod:`_transfer_bags` for bags); the tables are :mod:`_transfer_tables`.

``--choose`` runs the small grid the defaults were chosen with, on the choosing data only:
PneumoniaMNIST (Kermany et al. 2018) as RGB PNGs fine-tuning the ``*.retinamnist`` parents, and
RetinaMNIST (DeepDRiD) binarised as grade 0 vs grade >= 1, as greyscale PNGs fine-tuning the
``*.pneumoniamnist`` parents (so neither parent saw the images it is tuned on); each configuration
is scored by AUROC on the data set's official validation split, never on test. A concept
bottleneck's training (mode, random interventions, a calibrated bottleneck) was chosen on
``lidc_concepts``: LIDC-IDRI nodules with the readers' shape ratings as the user's concepts,
``cbm_resnet8.nodule_phantom`` fine-tuned with ``--concepts``, scored on the validation nodules of the
patient split (with the accuracy when every concept is corrected). Attention MIL's settings were
checked on ``lidc_bags``: the same nodules rendered at 64³ as bags of axial slices, against the black
box on bags.

One JSON line per finished run goes to ``--out`` (default ``bench/transfer.jsonl``); a run whose key
(kind, data set, family, configuration, the defaults it ran with) is already there is skipped, so
the script can be stopped and started again; a run interrupted before its line was written starts
again from scratch. The 1-minute load average is recorded before and after every run; torch runs
on ``--threads`` threads (default 1: on this shared 2-core machine other jobs run beside it).

    python bench/bench_transfer.py --data-root /work/shared/data              # the transfer table
    python bench/bench_transfer.py --choose                                   # the grid of the defaults
    python bench/bench_transfer.py --quick --only vessel3d                    # smoke test (tiny; rows in the cache)
    python bench/bench_transfer.py --readme                                   # tables into bench/README.md, figure bench/transfer.png
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from _common import BENCH_DIR, machine, read_rows
from _transfer_data import EXPORT_VERSION, SEED
from _transfer_scores import _auroc, paired, predictions, rescore, score_run
from _transfer_sets import (CHOOSE_SEEDS, DATASETS, FAMILIES, GRID, N_TRAIN, _key, _parent_sha256, defaults_signature,
                            prepare)
from _transfer_tables import choose_table, figure, table, write_readme

from mlmi_zoo.architectures.blocks.pretrained import cache_dir

log = logging.getLogger("bench_transfer")

DEFAULT_OUT = BENCH_DIR / "transfer.jsonl"


# ------------------------------------------------------------------------------------------------
# running the default command
# ------------------------------------------------------------------------------------------------
def _metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]


def finetune_cli(model: str, data: Path, run_dir: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``mlmi-zoo finetune MODEL --data DATA --out RUN_DIR --quiet [EXTRA]`` in this process.

    Returns:
        wall and CPU seconds, the 1-minute load average before and after, the final model folder
        and what the run did (epochs per stage, early stops, push).

    Raises:
        RuntimeError: the command failed (its exit code).
    """
    from mlmi_zoo.training.cli import main

    if run_dir.exists():  # an interrupted run: start again, so that the wall time is one process's
        shutil.rmtree(run_dir)
    argv = ["finetune", model, "--data", str(data), "--out", str(run_dir), "--quiet", *extra]
    load_before = os.getloadavg()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    status = main(argv)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if status != 0:
        raise RuntimeError(f"mlmi-zoo {' '.join(argv)} exited with {status}")
    lines = _metrics_lines(run_dir)
    epochs = [x for x in lines if x.get("type") == "epoch"]
    ran: dict[str, int] = {}
    for x in epochs:
        ran[x["stage"]] = ran.get(x["stage"], 0) + 1
    config = json.loads((run_dir / "final" / "config.json").read_text(encoding="utf-8"))
    push = next((x["records"] for x in lines if x.get("stage") == "push"), None)
    last = [x for x in lines if x.get("type") in ("epoch", "special_stage")][-1]
    return {"command": "mlmi-zoo " + " ".join(argv), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
            "final": str(run_dir / "final"), "epochs_run": ran,
            "early_stopped": sorted({x["stage"] for x in epochs if x.get("early_stop")}),
            "stage_best_epoch": {x["stage"]: x["stage_best_epoch"] for x in epochs if "stage_best_epoch" in x},
            "internal_val_auroc": last.get("val_auroc"), "push": push,
            "schedule": config.get("finetune", {}).get("schedule"), "weights_sha256": config.get("weights_sha256")}


def run_one(name: str, family: str, folder: Path, work: Path, n_boot: int, extra: Sequence[str] = (),
            seed: int = 0) -> dict[str, Any]:
    """Fine-tune ``family`` on data set ``name`` by the default command and evaluate it on the test cases.

    ``seed`` other than 0 adds ``--seed SEED`` to the command (another validation split carved from
    the training folder, data order and initialisation of the new heads); the row's ``seed`` is
    then SEED (None for the default command).

    Returns:
        the run row (JSON-safe).
    """
    spec = DATASETS[name]
    model = spec.base_model(family, work)
    options = [*spec.options.get(family, ()), *extra, *(["--seed", str(seed)] if seed else [])]
    run = finetune_cli(model, folder / spec.train, work / "runs" / name / (f"{family}_seed{seed}" if seed else family),
                       options)
    final = Path(run["final"])
    steps = json.loads((final / "config.json").read_text())["finetune"]["schedule"]["steps"]
    if not extra and steps != defaults_signature(family, name)["steps"]:  # the row's signature holds the steps
        raise RuntimeError(f"{final}: fine-tuned with {steps} steps, not the {defaults_signature(family, name)['steps']} "
                           f"the default rule gives {name}'s images of {spec.size}; correct DATASETS[{name!r}].size")
    return {"kind": "run", "dataset": name, "family": family, "seed": seed or None, "model": model,
            "parent_sha256": _parent_sha256(model), "defaults": defaults_signature(family, name), **run,
            **score_run(name, final, folder, n_boot), "threads": torch.get_num_threads(), "machine": machine(),
            "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


# ------------------------------------------------------------------------------------------------
# choosing the defaults (choosing data only)
# ------------------------------------------------------------------------------------------------
def choose_one(name: str, family: str, config: str, seed: int, folder: Path, work: Path) -> dict[str, Any]:
    """Fine-tune with grid configuration ``config`` and ``--seed seed``; score AUROC on the official validation split.

    Returns:
        the choose row (JSON-safe); no test case is read.
    """
    spec = DATASETS[name]
    model = spec.base_model(family, work)
    options = [*spec.options.get(family, ()), *GRID[config](family), "--seed", str(seed)]
    run = finetune_cli(model, folder / spec.train, work / "choose" / name / config / f"seed{seed}" / family, options)
    if spec.bags:
        from _transfer_bags import bag_predictions

        scores, labels, _ = bag_predictions(Path(run["final"]), folder / "val")
    else:
        scores, labels, _ = predictions(Path(run["final"]), folder / "val.csv")
    return {"kind": "choose", "dataset": name, "family": family, "config": config, "seed": seed, "options": options,
            "defaults": {"export_version": EXPORT_VERSION}, "model": model, **run,
            "val_auroc": _auroc(scores, labels), "val_cases": len(labels), **_val_interventions(family, run, folder),
            "threads": torch.get_num_threads(), "machine": machine(),
            "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def _val_interventions(family: str, run: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A bottleneck's validation accuracy with no concept and with every concept corrected to the annotation
    (``evaluate``'s actionability block on ``val.csv``): whether a mode keeps interventions useful."""
    from mlmi_zoo.families import families

    if not families()[family].concepts:
        return {}
    from mlmi_zoo.evaluation.evaluate import EvaluationLimits, evaluate
    from mlmi_zoo.training.finetune import evaluation_data_spec

    uri = f"local-dir:{run['final']}"
    limits = EvaluationLimits(deletion_cases=8, spacing_cases=8, control_train_cases=64, examples=1,
                              purity_train_cases=64, val_cases=64, oracle_train_cases=64)
    doc = evaluate(uri, evaluation_data_spec(uri, folder / "val.csv"), split="test", n_boot=50, seed=SEED,
                   out=Path(run["final"]).parent / "val_results.json", limits=limits)
    action = doc["elements"]["actionability"].get("metrics") or {}
    return {"val_accuracy_no_intervention": action.get("accuracy_no_intervention"),
            "val_accuracy_all_concepts_corrected": action.get("accuracy_all_concepts_corrected")}


# ------------------------------------------------------------------------------------------------
def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command line: run what is due (the transfer table, or ``--choose`` the grid), or print / write the tables.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--data-root", help="folder holding the data sets (default: $MLMI_ZOO_DATA)")
    parser.add_argument("--only", nargs="+", choices=sorted(DATASETS), help="these data sets only")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--choose", action="store_true", help="run the grid of the defaults on the choosing data")
    parser.add_argument("--configs", nargs="+", choices=list(GRID), help="with --choose: these configurations only")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 48 training and 24 test images, a 30-step budget, rows in the work folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON lines (default {DEFAULT_OUT})")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="exported data and run folders (default: <mlmi_zoo cache>/bench_transfer)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="fine-tuning seeds of the transfer runs (default 0: the command as a user types it; "
                             "N adds --seed N)")
    parser.add_argument("--again", action="store_true",
                        help="run even where --out has the row (after a change of the code, not of the defaults); "
                             "the newest row of a data set and family is the one the table shows")
    parser.add_argument("--rescore", action="store_true",
                        help="evaluate the interpretable models of the current run rows again, without fine-tuning "
                             "again (after a change of evaluate: the sanity column), and stop")
    parser.add_argument("--table", action="store_true", help="print the Markdown tables of --out and stop")
    parser.add_argument("--readme", action="store_true", help="write the tables into bench/README.md and their figure to bench/transfer.png, and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("monai").setLevel(logging.WARNING)  # one line per NIfTI file read otherwise
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.table or args.readme:
        rows = read_rows(args.out)
        text = table(rows) + "\n\nThe grid the defaults were chosen with (validation AUROC on the official " \
                             "validation split of the choosing data):\n\n" + choose_table(rows) \
            + "\n\nThe concept bottleneck's training mode, chosen on the LIDC nodules' validation split:\n\n" \
            + choose_table(rows, "cbm") \
            + "\n\nAttention MIL's settings, on the LIDC nodules as bags of slices (validation split):\n\n" \
            + choose_table(rows, "abmil") \
            + "\n\nAdditive MIL on the same bags (validation split):\n\n" + choose_table(rows, "additive_mil") \
            + "\n\nThe step budget of 64³ volumes, on the LIDC nodules at 64³ (validation split):\n\n" \
            + choose_table(rows, "protopnet", sets=("lidc64",))
        if args.readme:
            write_readme(text)
            log.info("figure written to %s", figure(rows))
        else:
            print(text)
        return 0
    if args.data_root:
        os.environ["MLMI_ZOO_DATA"] = str(Path(args.data_root).resolve())
    from mlmi_zoo.training.datasets._location import data_root

    root = data_root(args.data_root, file="the MedMNIST files, mias/ and idrid/", argument="--data-root")
    work = args.work_dir or cache_dir() / ("bench_transfer_quick" if args.quick else "bench_transfer")
    out = work / "transfer_quick.jsonl" if args.quick else args.out
    n_train, n_test = (48, 24) if args.quick else (N_TRAIN, None)
    extra = ["--steps", "30"] if args.quick else []
    names = [n for n in (args.only or list(DATASETS)) if DATASETS[n].choosing == args.choose]
    for name in names:
        folder = prepare(name, root, work, n_train, n_test)
        if args.rescore:
            families = [f for f in (DATASETS[name].interpretable,) if f in args.families]
            for row in rescore(name, read_rows(out), folder, args.n_boot, families):
                _append(out, row)
            continue
        jobs = [(c, s) for s in CHOOSE_SEEDS for c in (args.configs or list(GRID))] if args.choose else \
            [(None, s or None) for s in args.seeds]
        for config, seed in jobs:
            what = f"{config}, seed {seed}" if config else f"seed {seed or 0}"  # a grid cell, or the command's seed
            for family in [f for f in DATASETS[name].families if f in args.families]:
                probe = {"kind": "choose" if args.choose else "run", "dataset": name, "family": family,
                         "config": config, "seed": seed,
                         "defaults": {"export_version": EXPORT_VERSION} if args.choose else defaults_signature(family, name)}
                if not args.again and _key(probe) in {_key(r) for r in read_rows(out)}:  # another process may have run it
                    log.info("%s / %s / %s: already in %s, skipped", name, family, what, out)
                    continue
                log.info("%s / %s / %s: fine-tuning", name, family, what)
                if config is not None and seed is not None:
                    row = choose_one(name, family, config, seed, folder, work)
                else:
                    row = run_one(name, family, folder, work, args.n_boot, extra, seed=seed or 0)
                _append(out, row)
                log.info("%s / %s / %s: %s, %.0f s", name, family, what,
                         f"val AUROC {row['val_auroc']:.3f}" if config else
                         f"test AUROC {row['test_auroc']['estimate']:.3f}", row["wall_s"])
        for seed in [] if args.choose else args.seeds:
            probe = {"kind": "paired", "dataset": name, "seed": seed or None,
                     "defaults": defaults_signature(DATASETS[name].interpretable, name)}
            if set(DATASETS[name].families) <= set(args.families) and \
                    (args.again or _key(probe) not in {_key(r) for r in read_rows(out)}):
                row = paired(name, read_rows(out), folder, args.n_boot, seed=seed)
                _append(out, row)
                log.info("%s (seed %d): %s - baseline test AUROC %+.3f [%+.3f, %+.3f]", name, seed,
                         DATASETS[name].interpretable, row["estimate"], *row["ci"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
