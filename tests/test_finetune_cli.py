"""Fine-tuning on a user's own data: it fails fast and says why, and the CLI behaves.

Data sets are tiny synthetic PNGs written to ``tmp_path``: "nodules" (a bright disk on noise, 32x32,
with ``diameter_mm`` and ``spacing_mm``) for the HU-windowed LIDC ProtoPNet, and "x-rays" (28x28
noise of two brightness levels) for the [0, 1] PneumoniaMNIST models. Checks run through
``plan_finetune`` (nothing trained); the runs that train use 1-2 epochs. The README's example is run
verbatim, with ``--epochs 5`` replaced by ``--epochs 1``.
"""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlmi_zoo._config import OverrideError
from mlmi_zoo.training.data_spec import build_dataset, describe
from mlmi_zoo.training.datasets.folder_csv import FolderCSVDataset
from mlmi_zoo.training.finetune import FinetuneDataError, evaluation_data_spec, finetune, plan_finetune

from _mil import write_bags

REPO = Path(__file__).resolve().parents[1]
LIDC = "protopnet_resnet8.lidc_nodule"  # HU window, diameter_mm count head, push_on_lesion in its training
XRAY = "protopnet_resnet8.pneumoniamnist"  # [0, 1] images, 28x28, 1 channel
BASELINE_XRAY = "baseline_resnet8.pneumoniamnist"
BASELINE_LIDC = "baseline_resnet8.lidc_nodule"  # HU window, diameter_mm physical head

pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def write_nodules(folder: Path, n: int = 12, name: str = "cases.csv", seed: int = 0, spacing: bool = True,
                  masks: bool = False, rgb: bool = False, labels: list[str] | None = None) -> Path:
    """``n`` 32x32 8-bit PNG nodules (benign: small, malignant: large) described by ``folder/name``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    header = ["image", "label", "diameter_mm"] + (["spacing_mm"] if spacing else []) + (["mask"] if masks else [])
    rows = [",".join(header)]
    for i in range(n):
        label = labels[i % len(labels)] if labels else ("malignant" if i % 2 else "benign")
        radius = 3 + 4 * (i % 2) + i % 3
        disk = (yy - 16) ** 2 + (xx - 16) ** 2 < radius ** 2
        img = rng.integers(0, 80, (32, 32)).astype(np.uint8)
        img[disk] = 200
        stem = f"{Path(name).stem}{i}"
        Image.fromarray(np.stack([img] * 3, -1) if rgb else img).save(folder / f"{stem}.png")
        cells = [f"{stem}.png", label, f"{2 * radius * 0.7:.2f}"] + (["0.7x0.7"] if spacing else [])
        if masks:
            Image.fromarray(disk.astype(np.uint8) * 255).save(folder / f"{stem}_mask.png")
            cells.append(f"{stem}_mask.png")
        rows.append(",".join(cells))
    (folder / name).write_text("\n".join(rows) + "\n")
    return folder / name


def write_xrays(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """``root/normal/*.png`` (dark) and ``root/pneumonia/*.png`` (bright), 28x28 8-bit: the ImageFolder layout."""
    rng = np.random.default_rng(seed)
    for name, (lo, hi) in {"normal": (0, 120), "pneumonia": (100, 256)}.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(lo, hi, (28, 28)).astype(np.uint8)).save(root / name / f"{name}{i}.png")
    return root


def _cli(*argv: str, cwd: Path | None = None, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``mlmi-zoo ARGV`` in a fresh process; stdout and stderr go to ``log`` (a file: not a terminal) when given."""
    command = [sys.executable, "-m", "mlmi_zoo.cli", *argv]
    if log is None:
        return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    with open(log, "w") as fh:
        return subprocess.run(command, cwd=cwd, env=_env(), stdout=fh, stderr=subprocess.STDOUT, text=True, timeout=600)


# -- columns, masks, intensity: checked before the first epoch ----------------------------------------
def test_spacing_and_measurement_columns_reach_the_data_set(tmp_path):
    csv = write_nodules(tmp_path / "data")
    plan = plan_finetune(LIDC, csv, out_dir=tmp_path / "run", intensity="refit")
    params = plan.recipe.data.params
    assert params["spacing_columns"] == ["spacing_mm"] and params["measurement_columns"] == ["diameter_mm"]
    sample = build_dataset(plan.recipe.data, "train")[0]
    assert sample["spacing"].tolist() == pytest.approx([0.7, 0.7])
    assert float(sample["measurements"]["diameter_mm"]) > 0
    assert not (tmp_path / "run").exists()  # planning trains nothing and writes nothing

    without = write_nodules(tmp_path / "nospacing", spacing=False)
    with pytest.raises(FinetuneDataError, match="spacing_mm") as err:
        plan_finetune(LIDC, without, out_dir=tmp_path / "run2", intensity="refit")
    assert "diameter_mm" in str(err.value) and not (tmp_path / "run2").exists()


def test_a_physical_head_needs_its_measurement_column(tmp_path):
    csv = write_nodules(tmp_path / "data")
    text = csv.read_text().replace("diameter_mm", "diameter_cm")
    csv.write_text(text)
    with pytest.raises(FinetuneDataError) as err:
        plan_finetune(LIDC, csv, out_dir=tmp_path / "run", intensity="refit")
    assert "'diameter_mm'" in str(err.value) and "diameter_cm" in str(err.value)  # names the column and the near miss
    assert "model.config.quantities=[]" in str(err.value)  # and the way out for data without the measurement


def test_data_without_measurements_drop_the_physical_head_when_asked(tmp_path):
    csv = write_nodules(tmp_path / "data", spacing=False)
    csv.write_text("\n".join(",".join(row.split(",")[:2]) for row in csv.read_text().splitlines()) + "\n")
    plan = plan_finetune(BASELINE_LIDC, csv, out_dir=tmp_path / "run", intensity="refit",
                         overrides=["model.config.quantities=[]"])
    assert plan.recipe.model.config["quantities"] == []
    assert "measurement_columns" not in plan.recipe.data.params and "spacing_columns" not in plan.recipe.data.params
    change = next(c for c in plan.record["changes"] if c["key"] == "model.config.quantities")
    assert change["from"] == ["diameter_mm"] and change["to"] == []


def test_without_masks_the_mask_guided_stage_switches_and_is_recorded(tmp_path):
    csv = write_nodules(tmp_path / "data", n=12)
    final = finetune(LIDC, csv, epochs=1, batch_size=8, out_dir=tmp_path / "run", quiet=True, intensity="refit")
    config = json.loads((final / "config.json").read_text())
    changes = {c["key"]: c for c in config["finetune"]["changes"]}
    assert changes["training.push_on_lesion"]["from"] is True and changes["training.push_on_lesion"]["to"] is False
    assert "no lesion masks" in changes["training.push_on_lesion"]["reason"]
    assert config["recipe"]["training"]["push_on_lesion"] is False and config["recipe"]["training"]["fa_coef"] == 0.0
    assert changes["model.config.intensity"]["to"].startswith("window")  # the refit is recorded too
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in lines if line["type"] == "special_stage"] == ["push", "last_layer"]
    assert not (tmp_path / "run" / ".final.tmp").exists()

    # with masks the base model's mask-guided settings are kept
    masked = write_nodules(tmp_path / "masked", masks=True)
    plan = plan_finetune(LIDC, masked, out_dir=tmp_path / "run2", intensity="refit")
    assert plan.recipe.training["push_on_lesion"] is True and plan.record["changes"][0]["key"] == "model.config.intensity"
    sample = build_dataset(plan.recipe.data, "train")[0]
    assert sample["mask"].dtype == torch.bool and sample["mask"].shape == (1, 32, 32) and sample["mask"].any()

    # asked for explicitly without masks: refused, not switched
    with pytest.raises(FinetuneDataError, match="push_on_lesion.*mask"):
        plan_finetune(LIDC, csv, out_dir=tmp_path / "run3", intensity="refit", overrides=["training.push_on_lesion=true"])


def test_8bit_png_into_a_hu_model_is_refused_with_the_fix(tmp_path):
    csv = write_nodules(tmp_path / "data")
    with pytest.raises(FinetuneDataError) as err:
        finetune(LIDC, csv, epochs=1, out_dir=tmp_path / "run", quiet=True)
    message = str(err.value)
    assert "HU" in message and "intensity=refit" in message and "near-constant" in message
    assert not (tmp_path / "run").exists()  # refused before anything was written

    plan = plan_finetune(LIDC, csv, out_dir=tmp_path / "run", intensity="refit")
    window = plan.recipe.model.config["intensity"]
    assert window["kind"] == "window" and 0.0 <= window["low"] < window["high"] <= 1.0
    # the re-fitted window spreads the images over [0, 1] instead of a constant
    from mlmi_zoo.training.finetune import _model_for

    image = build_dataset(plan.recipe.data, "train")[0]["image"]
    assert float(_model_for(plan.recipe).input_spec.intensity(image).std()) > 0.1


def test_rgb_images_into_a_greyscale_model_name_the_channel_fix(tmp_path):
    csv = write_nodules(tmp_path / "data", rgb=True)
    with pytest.raises(FinetuneDataError, match=r"data\.params\.channels=1"):
        plan_finetune(LIDC, csv, out_dir=tmp_path / "run", intensity="refit")
    plan = plan_finetune(LIDC, csv, out_dir=tmp_path / "run", intensity="refit", overrides=["data.params.channels=1"])
    assert build_dataset(plan.recipe.data, "train")[0]["image"].shape == (1, 32, 32)


# -- labels -------------------------------------------------------------------------------------
def test_integer_labels_0_and_2_are_two_classes(tmp_path):
    csv = write_nodules(tmp_path / "data", labels=["0", "2"])
    ds = FolderCSVDataset(csv)
    assert ds.label_names == ("0", "2")
    assert [int(ds[i]["label"]) for i in range(4)] == [0, 1, 0, 1]
    plan = plan_finetune(LIDC, csv, out_dir=tmp_path / "run", intensity="refit")
    assert plan.recipe.model.config["label_names"] == ["0", "2"]
    # with integer class names, "1" is not read as the second class
    (tmp_path / "data" / "one.csv").write_text("image,label\ncases0.png,1\ncases1.png,2\n")
    with pytest.raises(ValueError, match=r"row 2: column 'label': unknown label '1'"):
        FolderCSVDataset(tmp_path / "data" / "one.csv", label_names=["0", "2"])
    # a named class without training cases is refused with the fix
    with pytest.raises(FinetuneDataError, match=r"\['1'\] have no case.*--labels"):
        plan_finetune(LIDC, csv, label_names=["0", "1", "2"], out_dir=tmp_path / "run", intensity="refit",
                      overrides=[])


def test_a_stray_label_is_named_by_row_and_column(tmp_path):
    csv = write_nodules(tmp_path / "data", n=8, labels=["0", "1"])
    lines = csv.read_text().splitlines()
    cells = lines[4].split(",")
    cells[1] = "benign"  # row 5 (the header is row 1)
    lines[4] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        FolderCSVDataset(csv)
    message = str(err.value)
    assert "1 problem(s)" in message and "row 5: column 'label': label 'benign'" in message
    assert not re.search(r"row (2|3|4|6|7|8|9)\b", message.replace("in row 2", ""))  # blames no other row
    # the CLI says it the same way, before any training
    result = _cli("finetune", LIDC, "--data", str(csv), "--out", str(tmp_path / "run"), "--intensity", "refit")
    assert result.returncode == 2 and "row 5: column 'label'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# -- the CLI -------------------------------------------------------------------------------------------
def test_options_and_overrides_in_any_order():
    from mlmi_zoo.training.cli import _parse

    orders = [
        ["finetune", "NAME", "--data", "D", "epochs=3", "--out", "O", "optim.weight_decay=0.01"],
        ["finetune", "NAME", "epochs=3", "--data", "D", "--out", "O", "optim.weight_decay=0.01"],
        ["finetune", "--data", "D", "NAME", "--out", "O", "optim.weight_decay=0.01", "epochs=3"],
    ]
    parsed = [_parse(argv) for argv in orders]
    for args in parsed:
        assert (args.model, str(args.data), str(args.out), args.epochs) == ("NAME", "D", "O", 3)
        assert args.overrides == ["optim.weight_decay=0.01"]
        assert args.lr is None and args.freeze is None  # nothing said: left to plan_finetune's defaults
    args = _parse(["finetune", "N", "--data", "D", "lr=3e-4", "freeze=none", "labels=a,b", "intensity=refit", "seed=2"])
    assert (args.lr, args.freeze, args.labels, args.intensity, args.seed) == (3e-4, (), ("a", "b"), "refit", 2)
    train = _parse(["train", "r.yaml", "--run-dir", "R", "optim.lr=0.1", "--quiet", "stages.0.epochs=2"])
    assert train.overrides == ["optim.lr=0.1", "stages.0.epochs=2"] and train.quiet
    with pytest.raises(OverrideError, match="disagree"):
        _parse(["finetune", "N", "--data", "D", "--epochs", "2", "epochs=3"])
    with pytest.raises(OverrideError, match="epoch.*finetune keys: epochs"):
        _parse(["finetune", "N", "--data", "D", "epoch=3"])


def test_cli_errors_are_one_line_and_name_the_command(capsys):
    from mlmi_zoo.training.cli import main

    assert main(["finetune", "N", "--data", "D", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlmi-zoo finetune: error:") and err.count("\n") == 1 and "mlmi-zoo mlmi-zoo" not in err
    assert main(["finetune", "N", "--data", "D", "epochs=many"]) == 2
    err = capsys.readouterr().err
    assert "epochs=many" in err and err.count("\n") == 1


def test_finetune_help_lists_the_overrides_that_matter():
    result = _cli("finetune", "--help")
    assert result.returncode == 0
    for key in ("epochs=", "lr=", "batch_size=", "freeze=", "labels=", "val_fraction=", "intensity=", "--test-csv"):
        assert key in result.stdout, key
    assert re.search(r"epochs=\.\.\.\s+epochs of each gradient stage", result.stdout)


def test_progress_bars_draw_on_a_terminal_only():
    from mlmi_zoo.training.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, log_file = Terminal(), io.StringIO()
    for stream in (terminal, log_file):
        for _ in progress_bar(range(5), desc="joint 1/1", total=5, initial=0, show=True, stream=stream):
            pass
    assert "\r" in terminal.getvalue() and "joint 1/1" in terminal.getvalue()
    assert log_file.getvalue() == ""


@pytest.fixture(scope="module")
def xray_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """One CLI fine-tuning of the ImageFolder layout, options and overrides mixed, output to a log file."""
    root = tmp_path_factory.mktemp("xray")
    data = write_xrays(root / "xrays")
    log = root / "finetune.log"
    result = _cli("finetune", BASELINE_XRAY, "epochs=2", "--data", str(data), "batch_size=4", "--out", str(root / "run"),
                  "--val-fraction", "0.25", "lr=0.003", log=log)
    return root, log, result


def test_image_folder_layout_trains_with_a_deterministic_split(xray_run, tmp_path):
    root, log, result = xray_run
    assert result.returncode == 0, log.read_text()[-3000:]
    config = json.loads((root / "run" / "final" / "config.json").read_text())
    assert config["config"]["label_names"] == ["normal", "pneumonia"]
    assert config["data"]["splits"]["train"]["size"] == 12 and config["data"]["splits"]["val"]["size"] == 4
    assert config["recipe"]["optim"]["batch_size"] == 4 and config["recipe"]["optim"]["lr"] == 0.003
    listing = (root / "run" / "image_folder.csv").read_text().splitlines()
    assert listing[0] == "image,label" and "normal/normal0.png,normal" in listing
    # the same folder and seed give the same split; another seed another one
    again = plan_finetune(BASELINE_XRAY, root / "xrays", out_dir=tmp_path / "a", val_fraction=0.25)
    other = plan_finetune(BASELINE_XRAY, root / "xrays", out_dir=tmp_path / "b", val_fraction=0.25, seed=1)
    assert describe(again.recipe.data)["splits"]["val"] == config["data"]["splits"]["val"]
    assert describe(other.recipe.data)["splits"]["val"] != config["data"]["splits"]["val"]


def test_non_tty_output_is_one_line_per_epoch(xray_run):
    _, log, result = xray_run
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text  # no progress-bar frames in a log file
    epochs = [line for line in text.splitlines() if re.search(r"\bjoint epoch \d+:", line)]
    assert len(epochs) == 2 and "epoch 1:" in epochs[0] and "epoch 2:" in epochs[1]  # epochs=2 after NAME took effect


def test_test_csv_evaluation_writes_results_json(xray_run, tmp_path):
    from mlmi_zoo.evaluation.cli import main

    root, _, result = xray_run
    assert result.returncode == 0
    test = write_xrays(tmp_path / "test", per_class=4, seed=7)
    rows = ["image,label"] + [f"{p.relative_to(test).as_posix()},{p.parent.name}" for p in sorted(test.rglob("*.png"))]
    (test / "test.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "results.json"
    assert main([str(root / "run" / "final"), "--test-csv", str(test / "test.csv"), "--out", str(out),
                 "--n-boot", "50"]) == 0
    doc = json.loads(out.read_text())
    assert doc["split"] == "test" and doc["n_cases"] == 8
    assert doc["data"]["splits"]["test"]["source"] == "test.csv" and doc["data"]["splits"]["train"]["size"] == 0
    assert 0.0 <= doc["task"]["auroc"]["estimate"] <= 1.0
    # the class-folder form builds the same cases
    spec = evaluation_data_spec(str(root / "run" / "final"), test, listing=tmp_path / "listing.csv")
    assert len(build_dataset(spec, "test")) == 8


# -- the README's example, verbatim ----------------------------------------------------------------------
def readme_example() -> list[list[str]]:
    """The commands between the README's finetune-example markers, continuation lines joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- finetune-example:start -->", 1)[1].split("<!-- finetune-example:end -->", 1)[0]
    body = block.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_readme_finetune_example_runs_verbatim(tmp_path):
    commands = readme_example()
    assert [c[0] for c in commands] == ["mlmi-zoo", "python", "mlmi-zoo", "mlmi-zoo"]
    write_nodules(tmp_path, n=12, name="cases.csv")
    write_nodules(tmp_path, n=6, name="test.csv", seed=1)
    write_xrays(tmp_path / "xrays", per_class=4)
    for command in commands:
        # the one substitution: a tiny budget through the documented --epochs / --steps options
        command = ["1" if a == "5" and command[i - 1] == "--epochs" else a for i, a in enumerate(command)]
        if command[:2] == ["mlmi-zoo", "finetune"] and "--epochs" not in command:
            command = [*command, "--steps", "2"]
        argv = [sys.executable, "-m", "mlmi_zoo.cli", *command[1:]] if command[0] == "mlmi-zoo" \
            else [sys.executable, *command[1:]]
        result = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stderr[-3000:]}"
    assert (tmp_path / "my_model" / "final" / "config.json").is_file()
    # a fine-tuned prototype model records how much its push cost (finetune.push_check)
    check = json.loads((tmp_path / "my_model" / "final" / "config.json").read_text())["finetune"]["push_check"]
    assert set(check) == {"val_auroc_before_push", "val_auroc_after_push", "drop", "dropped"}
    results = json.loads((tmp_path / "my_model" / "results.json").read_text())
    assert results["n_cases"] == 6 and results["split"] == "test"
    assert (tmp_path / "my_xray_model" / "final" / "model.safetensors").is_file()


# -- bags: a MIL model fine-tuned on a folder of the user's bags ---------------------------------------------
def test_a_mil_model_fine_tunes_on_a_folder_of_bags(tmp_path):
    import mlmi_zoo

    bags = write_bags(tmp_path / "bags")
    final = finetune("abmil_features.idrid_rdr", bags, out_dir=tmp_path / "run", steps=20, quiet=True)
    config = json.loads((final / "config.json").read_text())
    assert config["base_model"] == "abmil_features.idrid_rdr" and config["data"]["kind"] == "cached_bags"
    assert config["recipe"]["model"]["config"]["label_names"] == ["lesion", "none"]  # the classes the data hold
    model = mlmi_zoo.load(f"local-dir:{final}")
    exp = model.explain(torch.rand(1, 20, 320))
    assert exp.attention.shape == (1, 20) and torch.isfinite(exp.logits).all()
    # the first check reads the instance width: features of another encoder are refused before training
    with pytest.raises(FinetuneDataError, match="encode the tiles with the same encoder"):
        plan_finetune("abmil_features.idrid_rdr", write_bags(tmp_path / "narrow", width=64), out_dir=tmp_path / "r2")
    # a physical head needs its measurement per bag, and says how to go without it
    wide = write_bags(tmp_path / "wide", width=512)
    with pytest.raises(FinetuneDataError, match=r"model.config.quantities=\[\]"):
        plan_finetune("abmil_features.tilebag", wide, out_dir=tmp_path / "r3")
    # ... and the fix it names trains: the area head's tensors are dropped and reported
    without = finetune("abmil_features.tilebag", wide, out_dir=tmp_path / "r3", steps=4, quiet=True,
                       overrides=["model.config.quantities=[]"])
    assert json.loads((without / "config.json").read_text())["config"]["quantities"] == []
    (bags / "other.csv").write_text("slide_id,label\n")
    with pytest.raises(FinetuneDataError, match="exactly one"):
        plan_finetune("abmil_features.idrid_rdr", bags, out_dir=tmp_path / "r4")
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r4").exists()  # nothing left behind


def test_a_fine_tuned_mil_model_is_evaluated_on_the_users_own_test_bags(tmp_path):
    from mlmi_zoo.evaluation.cli import main as evaluate_main

    final = finetune("abmil_features.idrid_rdr", write_bags(tmp_path / "bags"), out_dir=tmp_path / "run", steps=4,
                     quiet=True)
    test_bags = write_bags(tmp_path / "test_bags", n=10, seed=1)
    spec = evaluation_data_spec(f"local-dir:{final}", test_bags)
    assert spec.kind == "cached_bags" and len(build_dataset(spec, "test")) == 10
    out = tmp_path / "results.json"
    assert evaluate_main(["evaluate", f"local-dir:{final}", "--test-dir", str(test_bags), "--out", str(out),
                          "--n-boot", "20"]) == 0
    results = json.loads(out.read_text())
    assert results["n_cases"] == 10 and results["split"] == "test" and results["task"]["auroc"]["estimate"] is not None
    with pytest.raises(FinetuneDataError, match="encode the tiles with the same encoder"):
        evaluation_data_spec(f"local-dir:{final}", write_bags(tmp_path / "narrow", width=64))


def test_small_data_are_decoded_once_unless_the_user_says_otherwise(tmp_path):
    import mlmi_zoo.training.finetune as ft

    csv = write_nodules(tmp_path / "data")
    plan = plan_finetune(LIDC, csv, out_dir=tmp_path / "run", intensity="refit")
    assert plan.recipe.data.cache is True
    # 12 cases of one 32x32 float32 image (plus scalars): about 12 x 4 KiB
    assert 0 < plan.record["schedule"]["in_memory_mib"] < 1
    kept = plan_finetune(LIDC, csv, out_dir=tmp_path / "run", intensity="refit", overrides=["data.cache=false"])
    assert kept.recipe.data.cache is False and "in_memory_mib" not in kept.record["schedule"]
    ft_limit = ft.IN_MEMORY_BYTES
    try:
        ft.IN_MEMORY_BYTES = 1024  # smaller than the data: read from disk every epoch
        big = plan_finetune(LIDC, csv, out_dir=tmp_path / "run", intensity="refit")
    finally:
        ft.IN_MEMORY_BYTES = ft_limit
    assert big.recipe.data.cache is False


def test_a_patient_column_keeps_a_patients_images_together_and_groups_the_intervals(tmp_path):
    from mlmi_zoo.evaluation.evaluate import EvaluationLimits, evaluate

    csv = write_nodules(tmp_path / "data", n=24)
    rows = csv.read_text().splitlines()
    csv.write_text("\n".join([rows[0] + ",patient"] + [f"{r},p{i // 3}" for i, r in enumerate(rows[1:])]) + "\n")
    plan = plan_finetune(LIDC, csv, out_dir=tmp_path / "run", intensity="refit", val_fraction=0.25)
    assert plan.recipe.data.params["patient_column"] == "patient"
    train, val = (build_dataset(plan.recipe.data, s) for s in ("train", "val"))
    train_patients = {train[i]["patient_id"] for i in range(len(train))}
    val_patients = {val[i]["patient_id"] for i in range(len(val))}
    assert train_patients and val_patients and not train_patients & val_patients  # no patient on both sides
    assert len(train) + len(val) == 24 and len(val) >= 6
    # the evaluation of a user's test CSV resamples patients
    test = write_nodules(tmp_path / "test", n=12, name="test.csv", seed=1)
    rows = test.read_text().splitlines()
    test.write_text("\n".join([rows[0] + ",patient"] + [f"{r},q{i // 2}" for i, r in enumerate(rows[1:])]) + "\n")
    doc = evaluate(LIDC, evaluation_data_spec(LIDC, test, check=False), split="test", n_boot=20,
                   out=tmp_path / "results.json",
                   limits=EvaluationLimits(deletion_cases=2, spacing_cases=2, control_train_cases=8, examples=1,
                                           purity_train_cases=8, val_cases=4))
    assert "resamples of patients" in doc["bootstrap"]["description"]


def test_a_blank_patient_is_named_by_row(tmp_path):
    csv = write_nodules(tmp_path / "data", n=6)
    rows = csv.read_text().splitlines()
    csv.write_text("\n".join([rows[0] + ",patient"] + [f"{r},{'' if i == 2 else 'p'}" for i, r in enumerate(rows[1:])])
                   + "\n")
    with pytest.raises(ValueError, match=r"row 4: column 'patient': empty patient"):
        FolderCSVDataset(csv, patient_column="patient")


def test_a_push_that_costs_accuracy_is_flagged(tmp_path):
    from mlmi_zoo.training.finetune import PUSH_DROP_WARNING, push_check

    def metrics(*units: tuple[str, str, float]) -> Path:
        path = tmp_path / "metrics.jsonl"
        path.write_text("\n".join(json.dumps({"type": t, "stage": s, "val_auroc": v}) for t, s, v in units) + "\n")
        return path

    bad = push_check(metrics(("epoch", "joint", 0.70), ("epoch", "joint", 0.81), ("special_stage", "push", 0.51),
                             ("special_stage", "last_layer", 0.49)))
    assert bad == {"val_auroc_before_push": 0.81, "val_auroc_after_push": 0.51, "drop": pytest.approx(0.30),
                   "dropped": True}
    fine = push_check(metrics(("epoch", "joint", 0.90), ("special_stage", "push", 0.86),
                              ("special_stage", "last_layer", 0.90 - PUSH_DROP_WARNING + 0.01)))
    assert fine is not None and not fine["dropped"]
    assert push_check(metrics(("epoch", "joint", 0.9))) is None  # no push: nothing to check
