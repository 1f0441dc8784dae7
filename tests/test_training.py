"""The shared trainer: recipes and overrides, determinism, exact resume after SIGKILL, crash-safe
checkpoints, stage freezing, torchrun, fine-tuning on a folder + CSV.

Runs are tiny (baseline_resnet8 on 16x16 nodule phantoms, 40 training cases, batch 8). Every
process here uses ONE intra-op thread: bit-identity between a run in this process and one in a
subprocess needs the same thread count (reduction order), and on a shared 2-core machine one
thread is also ~20x faster than two.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mlmi_zoo._config import OverrideError
from mlmi_zoo._weights import load_weights
from mlmi_zoo.training.data_spec import DataSpec, build_dataset, describe
from mlmi_zoo.training.recipe import load_recipe
from mlmi_zoo.training.trainer import KILL_AT_STEP_ENV, EpochSampler, load_checkpoint, train

RECIPE = {
    "model": {"name": "baseline_resnet8",
              "config": {"img_size": [16, 16], "intensity": {"kind": "window", "low": -1000.0, "high": 400.0, "unit": "HU"}}},
    "data": {"kind": "nodule_phantom",
             "params": {"size": 16, "seed": 0, "spacing_range": [1.5, 2.0], "diameter_range_mm": [4.0, 14.0]},
             "train_size": 40, "val_size": 16, "test_size": 8},
    "optim": {"name": "adamw", "lr": 0.01, "batch_size": 8, "schedule": "cosine", "warmup_epochs": 0.5},
    "stages": [{"name": "joint", "epochs": 2}],
    "seed": 0,
    "checkpoint_every_steps": 2,
    "device": "cpu",
}
STEPS_PER_EPOCH = 5  # 40 cases / batch 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def write_recipe(path: Path, **changes) -> Path:
    doc = json.loads(json.dumps(RECIPE))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            doc[section][field] = value
        else:
            doc[key] = value
    path.write_text(yaml.safe_dump(doc))
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_weights(folder / "model.safetensors", None)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """One uninterrupted run of RECIPE (seed 0), shared by the determinism and resume tests."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reference")
    recipe = load_recipe(write_recipe(root / "recipe.yaml"))
    train(recipe, root / "run", quiet=True)
    return root / "run"


# -- recipes and overrides -----------------------------------------------------------------------
def test_overrides_are_type_checked_and_unknown_keys_named(tmp_path):
    path = write_recipe(tmp_path / "r.yaml")
    r = load_recipe(path, ["optim.lr=0.001", "stages.0.epochs=3", "model.config.dropout=0.25", "data.params.seed=7"])
    assert (r.optim.lr, r.stages[0].epochs, r.data.params["seed"]) == (0.001, 3, 7)
    assert r.model.config["dropout"] == 0.25
    for bad, key in [("optim.lrr=1", "optim.lrr"), ("optim.lr=fast", "optim.lr"),
                     ("model.config.num_protos=3", "model.config.num_protos"), ("stages.4.epochs=1", "stages.4"),
                     ("seed=1.5", "seed"), ("optim.schedule=linear", "optim.schedule")]:
        with pytest.raises(OverrideError, match=key.replace(".", r"\.")):
            load_recipe(path, [bad])


def test_yaml_typo_is_refused(tmp_path):
    doc = json.loads(json.dumps(RECIPE))
    doc["optim"]["learning_rate"] = 0.1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(OverrideError, match="learning_rate"):
        load_recipe(tmp_path / "r.yaml")


def test_cli_bad_override_exits_2_with_one_line(tmp_path, capsys):
    from mlmi_zoo.training.cli import main

    path = write_recipe(tmp_path / "r.yaml")
    assert main(["train", str(path), "optim.lrr=1", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lrr" in err
    assert main(["train", str(path), "model.config.num_prototypes=20", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.config.num_prototypes" in err
    assert main(["finetune", "baseline_resnet8.none"]) == 2  # --data missing
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# -- data specs ----------------------------------------------------------------------------------
def test_phantom_splits_are_disjoint_index_ranges():
    spec = DataSpec(**{**RECIPE["data"]})
    d = describe(spec)
    ranges = {s: range(*d["splits"][s]["index_range"]) for s in ("train", "val", "test")}
    assert [len(r) for r in ranges.values()] == [40, 16, 8]
    assert not set(ranges["train"]) & set(ranges["test"]) and not set(ranges["val"]) & set(ranges["test"])
    test = build_dataset(spec, "test")
    assert [test[i]["index"] for i in range(len(test))] == list(ranges["test"])
    json.dumps(d)  # JSON-safe


def test_epoch_sampler_shards_union_to_the_single_process_batch():
    single = list(EpochSampler(40, seed=3, shuffle=True).__iter__())
    shards = [list(EpochSampler(40, 3, True, rank=r, world_size=2)) for r in (0, 1)]
    for j in range(5):  # global batch 8 = two per-process batches of 4
        assert sorted(single[8 * j:8 * j + 8]) == sorted(shards[0][4 * j:4 * j + 4] + shards[1][4 * j:4 * j + 4])
    s = EpochSampler(40, 3, True)
    s.set_epoch(0, skip=16)
    assert list(s) == single[16:]
    s.set_epoch(1)
    assert list(s) != single and sorted(s) == list(range(40))


# -- determinism and resume ----------------------------------------------------------------------
def test_same_seed_same_weights_other_seed_differs(tmp_path, reference_run):
    again = train(load_recipe(write_recipe(tmp_path / "a.yaml")), tmp_path / "a", quiet=True)
    assert_bit_identical(weights(again), weights(reference_run / "final"))
    other = train(load_recipe(write_recipe(tmp_path / "b.yaml", seed=1)), tmp_path / "b", quiet=True)
    w0, w1 = weights(reference_run / "final"), weights(other)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if w0[k].is_floating_point())


def test_run_directory_layout(reference_run):
    lines = [json.loads(s) for s in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [rec["type"] for rec in lines] == ["epoch", "epoch", "final"]
    assert lines[1]["global_step"] == 2 * STEPS_PER_EPOCH
    env = json.loads((reference_run / "env.json").read_text())
    assert env["seed"] == 0 and env["torch"] and env["python"]
    config = json.loads((reference_run / "final" / "config.json").read_text())
    assert config["data"]["splits"]["test"]["index_range"] == [56, 64]
    assert config["recipe"]["optim"]["lr"] == 0.01
    state = load_checkpoint(reference_run / "checkpoints" / "last")
    assert any(k.startswith("optimizer/") for k in state.tensors)  # optimiser moments in safetensors
    assert not list(reference_run.rglob("*.pt")) and not list(reference_run.rglob("*.bin"))
    import mlmi_zoo

    model = mlmi_zoo.load(f"local-dir:{reference_run / 'final'}")
    assert model.architecture == "baseline_resnet8"


class _Interrupted(Exception):
    pass


def _train_interrupted_at_step_7(recipe_path: Path, run: Path, monkeypatch) -> None:
    """Run the recipe until step 7, where it stops by an exception (an in-process stand-in for SIGKILL)."""
    import mlmi_zoo.training.trainer as trainer_module

    def stop_at_7(step):
        if step == 7:
            raise _Interrupted

    monkeypatch.setattr(trainer_module, "_test_kill_hook", stop_at_7)
    with pytest.raises(_Interrupted):
        train(load_recipe(recipe_path), run, quiet=True)
    monkeypatch.undo()


def test_interrupted_mid_epoch_then_resume_is_bit_identical(tmp_path, reference_run, monkeypatch):
    """Fast in-process version: the run stops by an exception after step 7 instead of SIGKILL."""
    run = tmp_path / "run"
    _train_interrupted_at_step_7(write_recipe(tmp_path / "r.yaml"), run, monkeypatch)
    assert load_checkpoint(run / "checkpoints" / "last").state["position"]["batch"] == 1  # mid-epoch
    final = train(load_recipe(run / "recipe.yaml"), run, resume=True, quiet=True)
    assert_bit_identical(weights(final), weights(reference_run / "final"))


def test_augmented_run_resumes_bit_identically_and_differs_from_plain(tmp_path, reference_run, monkeypatch):
    """Dihedral augmentation is a function of (seed, epoch, index): a resumed epoch sees the same transforms."""
    data = {**RECIPE["data"], "augment": "dihedral"}
    whole = train(load_recipe(write_recipe(tmp_path / "a.yaml", data=data)), tmp_path / "whole", quiet=True)
    assert not all(torch.equal(a, b) for a, b in zip(weights(whole).values(), weights(reference_run / "final").values()))
    run = tmp_path / "run"
    _train_interrupted_at_step_7(write_recipe(tmp_path / "b.yaml", data=data), run, monkeypatch)
    final = train(load_recipe(run / "recipe.yaml"), run, resume=True, quiet=True)
    assert_bit_identical(weights(final), weights(whole))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, reference_run):
    recipe_path = write_recipe(tmp_path / "r.yaml")
    run = tmp_path / "run"
    kill_step = STEPS_PER_EPOCH + 2  # step 7: in the 2nd epoch, one step after the step-6 checkpoint
    proc = subprocess.run([sys.executable, "-m", "mlmi_zoo.training", "train", str(recipe_path), "--run-dir", str(run),
                           "--quiet"], env={**_env(), KILL_AT_STEP_ENV: str(kill_step)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    position = load_checkpoint(run / "checkpoints" / "last").state["position"]
    assert (position["global_step"], position["epoch"], position["batch"]) == (6, 1, 1)  # mid-epoch
    assert not (run / "final").exists()

    final = train(load_recipe(run / "recipe.yaml"), run, resume=True, quiet=True)
    assert_bit_identical(weights(final), weights(reference_run / "final"))
    assert_bit_identical(weights(run / "checkpoints" / "last"), weights(reference_run / "checkpoints" / "last"))
    ref_lines = (reference_run / "metrics.jsonl").read_text().splitlines()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(ref_lines)


def test_crash_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, reference_run, monkeypatch):
    import mlmi_zoo.training.checkpoint as checkpoint_module

    real = checkpoint_module.save_weights
    calls = {"n": 0}

    def failing(state, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 4:  # the 2nd checkpoint (step 4), between its two safetensors files
            (Path(path).parent / "trainer_state.safetensors").write_bytes(b"half a file")
            raise OSError("disk full (simulated)")
        return real(state, path, metadata)

    monkeypatch.setattr(checkpoint_module, "save_weights", failing)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="simulated"):
        train(load_recipe(write_recipe(tmp_path / "r.yaml")), run, quiet=True)
    ckpt = load_checkpoint(run / "checkpoints" / "last")  # verified against its manifest
    assert ckpt.state["position"]["global_step"] == 2
    monkeypatch.setattr(checkpoint_module, "save_weights", real)
    final = train(load_recipe(run / "recipe.yaml"), run, resume=True, quiet=True)
    assert_bit_identical(weights(final), weights(reference_run / "final"))


def test_existing_run_is_not_overwritten_and_resume_refuses_another_recipe(tmp_path, reference_run):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    with pytest.raises(FileExistsError):
        train(load_recipe(write_recipe(tmp_path / "r.yaml")), run, quiet=True)
    with pytest.raises(ValueError, match="optim.lr"):
        train(load_recipe(write_recipe(tmp_path / "r.yaml"), ["optim.lr=0.5"]), run, resume=True, quiet=True)


def test_frozen_backbone_keeps_weights_and_batchnorm_statistics(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml"), ["model.freeze=[backbone]", "stages.0.epochs=1"])
    final = train(recipe, tmp_path / "run", quiet=True)
    import mlmi_zoo

    torch.manual_seed(0)
    init = mlmi_zoo.create_model("baseline_resnet8", **recipe.model.config).state_dict()
    trained = weights(final)
    backbone = [k for k in trained if k.startswith("backbone.")]
    assert backbone and all(torch.equal(trained[k], init[k]) for k in backbone)  # incl. BN running stats
    assert not torch.equal(trained["classifier.weight"], init["classifier.weight"])


# -- torchrun ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    """2 CPU processes (gloo, DDP, global batch-norm statistics) vs 1 process, same global batch.

    SGD keeps the update proportional to the gradient (Adam would amplify float noise in
    near-zero gradients). The processes compute the same sums in another order, so weights agree
    to float32 rounding, not bit for bit: tolerance 1e-5 after 10 steps.
    """
    overrides = ["optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=0.0", "checkpoint_every_steps=0"]
    single = train(load_recipe(write_recipe(tmp_path / "r.yaml"), overrides), tmp_path / "one", quiet=True)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mlmi_zoo.training",
         "train", str(tmp_path / "r.yaml"), *overrides, "--run-dir", str(tmp_path / "two"), "--quiet"],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = weights(tmp_path / "one" / "checkpoints" / "last"), weights(tmp_path / "two" / "checkpoints" / "last")
    assert one.keys() == two.keys()
    for k in one:
        if one[k].is_floating_point():
            torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4, msg=k)
        else:
            assert torch.equal(two[k], one[k]), k
    env = json.loads((tmp_path / "two" / "env.json").read_text())
    assert env["world_size"] == 2
    assert single.is_dir()


# -- fine-tuning ---------------------------------------------------------------------------------
def test_finetune_on_folder_csv_with_new_labels(tmp_path, reference_run):
    from PIL import Image

    import mlmi_zoo
    from mlmi_zoo.training.datasets import folder_csv  # noqa: F401  the loader under test; missing = failure
    from mlmi_zoo.training.finetune import finetune

    data = tmp_path / "data"
    data.mkdir()
    gen = torch.Generator().manual_seed(0)
    rows = ["image,label"]
    for i in range(24):
        label = "solid" if i % 2 else "cyst"
        img = torch.rand(16, 16, generator=gen) * 60 + (160 if label == "solid" else 40)  # (H, W) 8-bit
        Image.fromarray(img.to(torch.uint8).numpy()).save(data / f"case{i}.png")
        rows.append(f"case{i}.png,{label}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")

    uri = f"local-dir:{reference_run / 'final'}"
    out = finetune(uri, data, epochs=1, out_dir=tmp_path / "ft", batch_size=8, quiet=True, freeze=("backbone",),
                   overrides=["model.config.intensity.kind=identity"])
    model = mlmi_zoo.load(f"local-dir:{out}")
    assert model.label_names == ("cyst", "solid")
    config = json.loads((out / "config.json").read_text())
    assert config["base_model"] == uri
    assert config["data"]["kind"] == "folder_csv" and "sha256" in next(iter(config["data"]["source"].values()))
    assert "case0.png" not in json.dumps(config)  # the description, never the data
    base = weights(reference_run / "final")
    tuned = weights(out)
    assert all(torch.equal(tuned[k], base[k]) for k in tuned if k.startswith("backbone."))  # frozen as asked


def test_validation_metrics_hand_computed():
    from mlmi_zoo.training.trainer import classification_metrics

    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])  # positive-class logit; negatives score 0
    logits = torch.stack([torch.zeros(4), scores], -1)  # (4, 2)
    m = classification_metrics(logits, torch.tensor([0, 0, 1, 1]))
    assert m["auroc"] == pytest.approx(0.75)  # 3 of the 4 (neg, pos) pairs are ranked correctly
    assert m["accuracy"] == pytest.approx(0.5)  # every prediction is "positive"
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 1, 1]))))
    assert classification_metrics(logits, torch.tensor([1, 1, 1, 1]))["auroc"] != classification_metrics(
        logits, torch.tensor([1, 1, 1, 1]))["auroc"]  # NaN: undefined with one class, never selected
