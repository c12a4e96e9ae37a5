"""Your own data and model, and what comes after training: a model class of your own,
inputs and labels as webdataset users write them, compressed and odd shards, source
paths, `ddp-eval`, `trainer.init_from` and `ddp-export`."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddp import checkpoint
from ddp.data.batch import LoaderOptions
from ddp.data.loaders import build_eval_loader
from ddp.errors import DataError
from ddp.shards import index_split, read_manifest, verify_split
from ddp.shards.cli import main as shards_main
from ddp.shards.prepare import prepare_imagefolder
from ddp.shards.writer import ShardWriter
from tests import harness
from tests.fixtures import copy_split, smoke_overrides

MODEL = '''
from torch import nn


class ResNet(nn.Module):
    """Not a ResNet: what matters is that it takes only the arguments given."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        layers = [nn.Flatten(), nn.Linear(64, 32), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(32, 32), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(32, num_classes))

    def forward(self, x):
        return self.net(x)
'''


def image_folder(root: Path, count: int, odd_size_at: int | None = None) -> Path:
    """count digits as PNG and JPEG files (alternating), one sub-folder per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        label = int(digits.target[i])
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((digits.images[i] * 255 / 16).astype("uint8"))
        if i == odd_size_at:
            image = image.resize((9, 9))
        image.save(folder / f"{i:04d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """200 digits as a folder of mixed PNG and JPEG files, prepared into shards."""
    root = tmp_path_factory.mktemp("mixed")
    prepare_imagefolder(image_folder(root / "images", 200), root / "data", 64, 0, 0.2)
    return root / "data"


# ---------------------------------------------------------------- a model of your own


@pytest.mark.slow
def test_a_users_model_gets_only_the_arguments_given(digits_root, tmp_path):
    (tmp_path / "my_project").mkdir()
    (tmp_path / "my_project" / "__init__.py").write_text("")
    (tmp_path / "my_project" / "models.py").write_text(MODEL)
    overrides = smoke_overrides(
        digits_root, tmp_path / "runs", "own", "trainer.max_epochs=1", "model=custom",
        "model._target_=my_project.models.ResNet", "+model.depth=3",
    )  # fmt: skip
    out = harness.train(overrides, nproc=0, PYTHONPATH=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    state = checkpoint.load(tmp_path / "runs" / "own" / "checkpoints" / "last.pt")
    assert state["config"]["model"] == {"_target_": "my_project.models.ResNet", "depth": 3}


# ---------------------------------------------------------------- inputs and labels


def test_alternative_input_members_take_the_first_a_sample_has(mixed):
    manifest = read_manifest(mixed / "train")
    assert {"jpg", "png", "cls", "source"} <= set(manifest.extensions)
    options = LoaderOptions(input_key="jpg;png")
    batches = list(build_eval_loader(mixed / "val", 8, 0, 1, options))
    assert sum(int(b.valid.sum()) for b in batches) == 40
    assert all(b.inputs.shape[1:] == (8, 8, 1) for b in batches)


@pytest.mark.parametrize("counts", [True, False], ids=["member counts", "before counts"])
def test_a_sample_without_the_input_member_is_refused_naming_it(mixed, tmp_path, counts):
    """Found at start-up, from the shards the manifest's member counts do not vouch for
    (or, in a manifest written before them, from every sample's columns)."""
    split = copy_split(mixed / "val", tmp_path / "val")
    content = json.loads((split / "manifest.json").read_text())
    if not counts:
        del content["shards"]["member_counts"]
        (split / "manifest.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"key img-\d+ has no \.jpg member"):
        build_eval_loader(split, 8, 0, 1, LoaderOptions(input_key="jpg"))
    build_eval_loader(split, 8, 0, 1, LoaderOptions(input_key="jpg;png"))  # each has one


def test_member_counts_vouch_for_whole_shards(mixed):
    """At start-up only the shards where no one extension named is in every sample are
    read (counts cannot tell whether two partial ones leave a sample out)."""
    options = LoaderOptions(input_key="jpg;png")
    dataset = build_eval_loader(mixed / "train", 8, 0, 1, options).dataset
    table = dataset.index.table
    assert list(dataset._unvouched(["cls"])) == []
    jpg, png = table.member_counts["jpg"], table.member_counts["png"]
    partial = np.flatnonzero((jpg < table.counts) & (png < table.counts))
    assert len(partial) > 0  # shards of mixed files
    read = np.concatenate(list(dataset._unvouched(["jpg", "png"])))
    expected = np.concatenate([np.arange(*table.starts[[s, s + 1]]) for s in partial])
    assert np.array_equal(read, expected)


def json_split(split: Path, labels: list) -> Path:
    """Samples of an 8x8 npy and a JSON member {"label": ..., "meta": {"name": ...}}."""
    with ShardWriter(split, 16) as writer:
        for i, label in enumerate(labels):
            array = io.BytesIO()
            np.save(array, np.full((1, 8, 8), i, dtype=np.float32))
            info = {"label": label, "meta": {"name": label}}
            writer.write(f"s{i:04d}", {"npy": array.getvalue(), "json": json.dumps(info).encode()})
    return split


def test_labels_from_a_json_field_and_class_names(tmp_path):
    split = json_split(tmp_path / "ints", [3, 1, 4, 1, 5])
    (batch,) = build_eval_loader(split, 5, 0, 1, LoaderOptions(target_key="json:label"))
    assert batch.targets.tolist() == [3, 1, 4, 1, 5]
    names = json_split(tmp_path / "names", ["cat", "dog", "cat"])
    options = LoaderOptions(target_key="json:meta.name", classes=["cat", "dog"])
    (batch,) = build_eval_loader(names, 3, 0, 1, options)
    assert batch.targets.tolist() == [0, 1, 0]
    with pytest.raises(DataError, match=r"key s0000: .*label 'cat' is a class name"):
        list(build_eval_loader(names, 3, 0, 1, LoaderOptions(target_key="json:label")))
    with pytest.raises(DataError, match=r"key s0001: .*'dog' is not one of the 1 classes"):
        options = LoaderOptions(target_key="json:label", classes=["cat"])
        list(build_eval_loader(names, 3, 0, 1, options))


@pytest.mark.slow
def test_training_on_json_labels(tmp_path, digits_root):
    data = tmp_path / "data"
    for split in ("train", "val"):  # digits again, with the label as a JSON field
        manifest = read_manifest(digits_root / split)
        with ShardWriter(data / split, 256) as writer:
            for shard in manifest.shards:
                raw = (digits_root / split / shard.name).read_bytes()
                for i, key in enumerate(shard.keys):
                    members = {}
                    for ext in ("npy", "cls"):
                        o, n = shard.members[ext]["offsets"][i], shard.members[ext]["sizes"][i]
                        members[ext] = raw[o : o + n]
                    label = int(members.pop("cls"))
                    members["json"] = json.dumps({"label": label}).encode()
                    writer.write(key, members)
    overrides = smoke_overrides(
        data, tmp_path / "runs", "json", "data.target_key=json:label", "trainer.max_epochs=1"
    )
    out = harness.train(overrides, nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    (val,) = harness.records(tmp_path / "runs" / "json", "val")
    assert val["val/accuracy"] > 0.3


def test_images_of_another_size_are_named_by_verify_and_by_the_loader(tmp_path):
    prepare_imagefolder(image_folder(tmp_path / "images", 60, odd_size_at=7), tmp_path, 64, 0, 0.0)
    assert not verify_split(tmp_path / "train").problems  # data.augment would crop them
    (problem,) = verify_split(tmp_path / "train", augment=False).problems  # stacked as stored
    assert "1 of 30 .png members differ from the most common shape (8, 8, 1)" in problem
    key = problem.split("key ")[1].split(" ")[0]
    options = LoaderOptions(input_key="jpg;png")
    with pytest.raises(DataError, match=f"key {key}: shape \\(9, 9, 1\\) differs"):
        list(build_eval_loader(tmp_path / "train", 60, 0, 1, options))


# ---------------------------------------------------------------- shards made by others


def test_compressed_shards_are_refused_with_the_command_or_decompressed(digits_root, tmp_path):
    split = copy_split(digits_root / "val", tmp_path / "val")
    for shard in sorted(split.glob("*.tar")):
        with open(shard, "rb") as src, gzip.open(f"{shard}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        shard.unlink()
    (split / "manifest.json").unlink()
    with pytest.raises(DataError, match=f"ddp-shards index {split} --decompress"):
        index_split(split)
    assert shards_main(["index", str(split), "--decompress"]) == 0
    assert read_manifest(split).num_samples == 359
    assert list(build_eval_loader(split, 64, 0, 1))  # the loader reads the plain tars


def test_prepare_imagefolder_keeps_each_samples_source_path(mixed, capsys):
    args = ["order", str(mixed / "train"), "--epoch", "0", "--rank", "0", "--world-size", "1"]
    assert shards_main([*args, "--micro-size", "4", "--accumulate", "1", "--steps", "0:1",
                        "--member", "source"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    for line in lines:
        key, source = line.split("\t")
        assert source.startswith("class") and source.endswith((".png", ".jpg")), line


def test_order_piped_into_head_ends_quietly(digits_root):
    order = [sys.executable, "-m", "ddp.shards.cli", "order", str(digits_root / "train"),
             "--epoch", "0", "--rank", "0", "--world-size", "1", "--micro-size", "64",
             "--accumulate", "1"]  # fmt: skip
    out = subprocess.run(
        f"{' '.join(order)} | head -1", shell=True, capture_output=True, text=True, cwd=harness.ROOT
    )
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1
    assert "Broken pipe" not in out.stderr and "Errno" not in out.stderr


# ---------------------------------------------------------------- after training


@pytest.fixture(scope="module")
def trained(digits_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    out = harness.train(smoke_overrides(digits_root, root, "done", "trainer.max_epochs=3"), nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "done"


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [0, 2], ids=["python", "torchrun"])
def test_eval_gives_the_runs_own_validation_numbers(trained, nproc, tmp_path):
    (last,) = harness.records(trained, "val")[-1:]
    ckpt = trained / "checkpoints" / "last.pt"
    command = ["-m", "ddp.eval_cli", str(ckpt), "--out", str(tmp_path / "eval.json")]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", *command]  # fmt: skip
    else:
        cmd = [sys.executable, *command]
    out = harness.run(cmd, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["samples"] == 359
    assert result["accuracy"] == pytest.approx(last["val/accuracy"], abs=1e-9)
    assert result["loss"] == pytest.approx(last["val/loss"], rel=1e-6)
    confusion = np.array(result["confusion"])
    assert confusion.sum() == 359 and np.trace(confusion) == round(result["accuracy"] * 359)
    assert "confusion (rows: true class" in out.stdout


@pytest.mark.slow
def test_a_new_run_can_start_from_trained_weights(trained, digits_root, tmp_path):
    fresh = harness.train(
        smoke_overrides(digits_root, tmp_path, "fresh", "trainer.max_epochs=1"), nproc=0
    )
    tuned = harness.train(
        smoke_overrides(
            digits_root, tmp_path, "tuned", "trainer.max_epochs=1", f"trainer.init_from={trained}"
        ),
        nproc=0,
    )
    assert fresh.returncode == 0 and tuned.returncode == 0, tuned.stderr[-3000:]
    (fresh_val,) = harness.records(tmp_path / "fresh", "val")
    (tuned_val,) = harness.records(tmp_path / "tuned", "val")
    assert tuned_val["val/accuracy"] > fresh_val["val/accuracy"] + 0.1
    state = checkpoint.load(tmp_path / "tuned" / "checkpoints" / "last.pt")
    assert state["position"]["epoch"] == 1  # a new run: its own position and optimizer
    wider = smoke_overrides(
        digits_root, tmp_path, "wider", "model.hidden=[16]", f"trainer.init_from={trained}"
    )
    out = harness.train(wider, nproc=0)
    assert out.returncode == 2 and "trainer.init_from=" in out.stderr
    assert "its weights do not fit the model" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("fmt", ["export", "torchscript"])
def test_an_export_loads_back_and_gives_the_models_outputs(trained, tmp_path, fmt):
    from ddp.export import export

    out = tmp_path / ("model.pt2" if fmt == "export" else "model.pt")
    info = export(trained, [], out, fmt)
    assert info["check"]["max_abs_difference"] <= 1e-5
    assert json.loads(Path(f"{out}.json").read_text())["config"]["model"]["_target_"]
    loaded = torch.export.load(out).module() if fmt == "export" else torch.jit.load(out)
    inputs = torch.rand(5, 1, 8, 8)  # digits are stored as float arrays: taken as they are
    from ddp.inference import load_trained, rebuild

    state, config, ckpt = load_trained(trained, [])
    model, _ = rebuild(state, config, torch.device("cpu"), str(ckpt))
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), model(inputs))


# ---------------------------------------------------------------- small things


def test_ddp_plan_refuses_a_world_size_of_zero(capsys):
    from ddp import plan_cli

    with pytest.raises(SystemExit) as exit_code:
        plan_cli.main(["world_size=0", "num_samples=100"])
    assert exit_code.value.code == 2
    assert "world_size='0' must be a positive integer" in capsys.readouterr().err


def test_w_and_b_names_leave_out_paths_and_how_a_run_runs():
    from ddp.run_dir import run_label

    overrides = ["experiment=digits", "data.root=/tmp/x", "run.root=/tmp/r", "model=mlp",
                 "batch.global_size=128", "trainer.progress=false"]  # fmt: skip
    assert run_label("digits", overrides) == "digits-batch.global_size=128,model=mlp"


@pytest.mark.slow
def test_fp16_on_a_cpu_is_refused(digits_root, tmp_path):
    out = harness.train(
        smoke_overrides(digits_root, tmp_path, "fp16", "trainer.precision=fp16"), nproc=0
    )
    assert out.returncode == 2 and "trainer.precision=fp16 needs a CUDA device" in out.stderr


@pytest.mark.slow
def test_a_missing_streamed_shard_is_named_once_and_no_innocent_one_is_blamed(
    digits_root, tmp_path
):
    """The rank that meets the missing shard stops the job; the launcher then kills the
    other rank's shard pipes mid-read (status -15): that is no bad shard to report. Each
    pipe stays open a few seconds after its tar, so the kill finds one open."""
    for shard in sorted((digits_root / "train").glob("*.tar")):
        if shard.name != "shard-000003.tar":
            shutil.copy(shard, tmp_path / shard.name)
    urls = f"pipe:sh -c 'cat {tmp_path}/shard-{{000000..000005}}.tar; sleep 5'"
    overrides = smoke_overrides(
        digits_root,
        tmp_path,
        "stream",
        f'data.stream.urls="{urls}"',
        "data.stream.num_samples=1438",
    )
    out = harness.train(overrides)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and errors, out.stderr[-3000:]
    assert all("shard-000003.tar" in line for line in errors), errors
