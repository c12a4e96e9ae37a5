"""The config tree: every value lives in conf/, every option of every group composes
against the typed schema, a group maps onto one dataclass whose every field is
documented, a bad value is refused naming its full key, a combination that one key
would silently ignore is refused naming both, and a record written before the groups
(issue 24) still reads as the config it was."""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import json
import sys

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ddp import checkpoint, plan_cli, report
from ddp import config as schema
from ddp import data_config as data_schema
from ddp.compose import CONF_DIR, as_record, compose, from_record
from ddp.config import Config
from ddp.config_moves import upgrade_record
from ddp.errors import ConfigError
from ddp.run_dir import default_run_name
from tests import harness
from tests.refusals import again, assert_refused

GROUPS = sorted(
    str(p.relative_to(CONF_DIR))
    for p in CONF_DIR.rglob("*")
    if p.is_dir() and p.relative_to(CONF_DIR).parts[0] not in ("hydra", "experiment")
)
"""Every config group, nested ones too (data/loader, trainer/compile, ...)."""


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in GROUPS for o in options(g)]
    + [f"experiment={o}" for o in options("experiment")],
)
def test_every_option_composes_to_a_typed_config(override: str) -> None:
    instead = {  # what such an option leaves to the user, or how it is chosen
        "data=shards": ["data=shards", "data.root=/data"],
        "model=custom": ["model=custom", "model._target_=torchvision.models.resnet18"],
        "data/augment=crop_flip": ["+data/augment=crop_flip"],  # optional: null by default
    }
    config = compose(instead.get(override, [override]))
    assert isinstance(config, Config)


def schemas() -> list[type]:
    """Config and every dataclass it holds, nested groups included."""
    found, todo = [], [Config]
    while todo:
        cls = todo.pop()
        found.append(cls)
        for f in dataclasses.fields(cls):  # types as written: "LoaderConfig", "X | None"
            nested = getattr(schema, str(f.type).split(" ")[0], None)
            if dataclasses.is_dataclass(nested) and nested not in found + todo:
                todo.append(nested)
    return found


def test_the_groups_are_dataclasses() -> None:
    names = {cls.__name__ for cls in schemas()}
    assert {"LoaderConfig", "RemoteConfig", "StreamConfig", "CheckpointConfig"} <= names
    assert {"CompileConfig", "AugmentConfig", "WandbConfig"} <= names


def test_the_schema_holds_no_values() -> None:
    """A value in the schema could disagree with the YAML; MISSING cannot."""
    for cls in schemas():
        for f in dataclasses.fields(cls):
            assert f.default == schema.MISSING, f"{cls.__name__}.{f.name}"


def test_every_field_of_every_schema_has_a_docstring() -> None:
    classes = {
        node.name: node
        for module in (schema, data_schema)
        for node in ast.parse(inspect.getsource(module)).body
        if isinstance(node, ast.ClassDef)
    }
    for cls in schemas():
        body = classes[cls.__name__].body
        for field, after in zip(body, [*body[1:], None], strict=True):
            if isinstance(field, ast.AnnAssign):
                documented = (
                    isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                )
                assert documented, f"{cls.__name__}.{field.target.id} has no docstring"


def test_a_value_missing_from_the_yaml_is_named() -> None:
    with pytest.raises(ConfigError, match="data.root"):
        compose(["data=shards"])


def test_the_loaders_take_data_loader_as_it_is() -> None:
    import torch

    from ddp.build import loader_options

    config = compose(["experiment=photos_resnet50"])
    assert loader_options(config, torch.device("cpu")).loader is config.data.loader


# ------------------------------------------------------------------ each group's checks


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.loader.num_workers=-1"], "data.loader.num_workers=-1 must be an integer >= 0"),
        (
            ["data.loader.prefetch_factor=0"],
            "data.loader.prefetch_factor=0 must be an integer >= 1",
        ),
        (
            ["data.loader.on_error=ignore"],
            "data.loader.on_error='ignore' must be one of raise, skip",
        ),
        (["data.loader.in_memory_max_mb=-1"], "data.loader.in_memory_max_mb=-1.0 must be >= 0"),
        (["data.remote.cache_max_gb=0"], "data.remote.cache_max_gb=0.0 must be > 0"),
        (["data.remote.timeout_s=-1"], "data.remote.timeout_s=-1.0 must be > 0"),
        (
            ["data.remote.prefetch_shards=-1"],
            "data.remote.prefetch_shards=-1 must be an integer >= 0",
        ),
        (
            ["data.stream.shuffle_buffer=-1"],
            "data.stream.shuffle_buffer=-1 must be an integer >= 0",
        ),
        (
            ["data.stream.urls=[x.tar]", "data.stream.num_samples=0"],
            "data.stream.num_samples=0 must be >= 1 or null",
        ),
        (["data.window_shards=0"], "data.window_shards=0 must be >= 1 or null"),
        (["trainer.checkpoint.every_steps=0"], "trainer.checkpoint.every_steps=0 must be > 0"),
        (
            ["trainer.checkpoint.every_minutes=-1"],
            "trainer.checkpoint.every_minutes=-1.0 must be > 0",
        ),
        (["trainer.log_every_steps=0"], "trainer.log_every_steps=0 must be an integer >= 1"),
        (["trainer.max_skipped_steps=-1"], "trainer.max_skipped_steps=-1 must be an integer >= 0"),
    ],
)
def test_a_bad_value_in_a_group_names_its_full_key(overrides, message) -> None:
    with pytest.raises(ConfigError) as refused:
        compose(overrides)
    assert str(refused.value).startswith(message), str(refused.value)


@pytest.mark.parametrize(
    "override",
    [
        "data.loader.num_workers=many",
        "data.remote.cache_max_gb=lots",
        "trainer.compile.enabled=maybe",
        "trainer.checkpoint.every_steps=often",
        "data.stream.shuffle_buffer=big",
    ],
)
def test_a_wrong_type_in_a_group_names_its_full_key(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises((HydraException, OmegaConfBaseException), match=key.replace(".", r"\.")):
        compose([override])


# ------------------------------------------------------- combinations one key would ignore


def ddp_plan(capsys, *args: str) -> tuple[int, str]:
    """`ddp-plan ARGS` in-process: its exit code and its stderr."""
    try:
        plan_cli.main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


COMBINATIONS = [
    (["data.window_shards=2", "data.stream.urls=[x]"], "data.window_shards", "data.stream.urls"),
    (["+data/augment=crop_flip", "data.stream.urls=[x.tar]"], "data.augment", "data.stream.urls"),
    (["data.stream.num_samples=100"], "data.stream.num_samples", "data.stream.urls"),
    (["trainer.compile.mode=max-autotune"], "trainer.compile.mode", "trainer.compile.enabled"),
    (
        ["experiment=photos", "data.augment.placement=device",
         "+data.transform._target_=ddp.transforms.RandomShift"],
        "data.transform", "data.augment.placement",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "key", "other"), COMBINATIONS)
def test_a_combination_one_key_would_ignore_is_one_line_naming_both(
    capsys, overrides, key, other
) -> None:
    code, err = ddp_plan(capsys, "num_samples=200", *overrides)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert key in lines[0] and other in lines[0], lines[0]


def test_data_remote_with_local_data_and_on_device_on_a_cpu_are_not_refused() -> None:
    """Their defaults are always there: a local split ignores data.remote, a split read
    from its shards (or a CPU run) ignores data.loader.on_device (see their docstrings)."""
    config = compose(["data.remote.cache_dir=/nowhere", "data.loader.in_memory_max_mb=0"])
    assert config.data.loader.on_device and config.data.remote.cache_dir == "/nowhere"


@pytest.mark.slow
def test_the_trainer_refuses_window_shards_with_streamed_urls_in_one_line(digits_root, tmp_path):
    urls = f"{digits_root}/train/shard-{{000000..000005}}.tar"
    overrides = [f"data.root={digits_root}", f"run.root={tmp_path}", "data.window_shards=2",
                 f"data.stream.urls='{urls}'"]  # fmt: skip
    out = harness.train(overrides, nproc=0, timeout=120)
    assert_refused(out, "data.window_shards=2", "data.stream.urls")
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize(
    ("old", "new"),
    [("data.num_workers=2", "data.loader.num_workers"), ("data.urls=[x.tar]", "data.stream.urls"),
     ("trainer.compile=true", "trainer.compile.enabled"),
     ("trainer.checkpoint_every_steps=5", "trainer.checkpoint.every_steps")],
)  # fmt: skip
def test_a_key_that_moved_is_one_line_saying_where_to(capsys, old, new) -> None:
    code, err = ddp_plan(capsys, "num_samples=200", old)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].endswith(f"({old.split('=')[0]} is {new} now)"), lines[0]


def test_how_a_run_reads_its_data_does_not_name_a_new_run() -> None:
    assert default_run_name("digits", ["data.loader.num_workers=4"]) == "digits"
    assert default_run_name("digits", ["data.remote.cache_dir=/x", "data.remote.timeout_s=9"]) == (
        "digits"
    )
    assert default_run_name("digits", ["trainer.checkpoint.every_steps=5"]) == "digits"
    assert default_run_name("digits", ["data.loader.on_error=skip"]) != "digits"
    assert default_run_name("digits", ["trainer.compile.enabled=true"]) != "digits"


# ---------------------------------------------------------- records written before issue 24


def as_written_before_issue_24(record: dict) -> dict:
    """`record` (a checkpoint's config) as the code before issue 24 wrote it: the data
    and trainer groups flat, the loader, remote, stream, checkpoint and compile keys
    under their old names (the layout of its ddp/config.py, spelled out here)."""
    old = copy.deepcopy(record)
    data, trainer = old["data"], old["trainer"]
    loader, remote, stream = data.pop("loader"), data.pop("remote"), data.pop("stream")
    data.update(
        num_workers=loader["num_workers"],
        pin_memory=loader["pin_memory"],
        prefetch_factor=loader["prefetch_factor"],
        on_error=loader["on_error"],
        in_memory_max_mb=loader["in_memory_max_mb"],
        on_device=loader["on_device"],
        cache_dir=remote["cache_dir"],
        cache_max_gb=remote["cache_max_gb"],
        remote_timeout_s=remote["timeout_s"],
        s3_endpoint=remote["s3_endpoint"],
        prefetch_shards=remote["prefetch_shards"],
        urls=stream["urls"],
        num_samples=stream["num_samples"],
        shuffle_buffer=stream["shuffle_buffer"],
    )
    every, compiled = trainer.pop("checkpoint"), trainer.pop("compile")
    trainer.update(
        compile=compiled["enabled"],
        compile_mode=compiled["mode"],
        compile_backend=compiled["backend"],
        checkpoint_every_steps=every["every_steps"],
        checkpoint_every_minutes=every["every_minutes"],
    )
    return old


RECORDED = [
    ["experiment=smoke"],
    [
        "experiment=photos_resnet50",
        "trainer.compile.enabled=true",
        "trainer.compile.mode=max-autotune",
        "trainer.checkpoint.every_steps=5",
        "data.remote.cache_dir=/c",
        "data.loader.on_error=skip",
    ],
    [
        "data.stream.urls=[a.tar,b.tar]",
        "data.stream.num_samples=10",
        "data.stream.shuffle_buffer=3",
    ],
]


@pytest.mark.parametrize("overrides", RECORDED)
def test_an_old_record_upgrades_to_the_new_one(overrides) -> None:
    record = as_record(compose(overrides))
    old = as_written_before_issue_24(record)
    kept = copy.deepcopy(old)
    assert upgrade_record(old) == record
    assert old == kept  # the argument is left as it was
    assert upgrade_record(record) == record  # a new record as it is
    assert as_record(from_record(old)) == record  # ddp-eval and ddp-export read it so


def test_a_record_without_the_keys_stays_as_it_is() -> None:
    assert upgrade_record({}) == {}
    assert upgrade_record({"trainer": {"seed": 1}}) == {"trainer": {"seed": 1}}


@pytest.mark.slow
def test_a_run_written_before_the_groups_reports_evaluates_and_resumes(
    digits_root, run_copy, tmp_path
):
    """A finished smoke run whose checkpoint and metrics.jsonl hold the old layout, as a
    run trained before issue 24 left them: ddp-report reads it, ddp-eval gives its own
    validation numbers, and more epochs continue it (the new checkpoint in the new layout)."""
    last = run_copy / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    state["config"] = as_written_before_issue_24(state["config"])
    checkpoint.atomic_save(state, last)
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    plan = json.loads(lines[0])
    plan["config"] = as_written_before_issue_24(plan["config"])
    metrics.write_text("\n".join([json.dumps(plan), *lines[1:]]) + "\n")
    assert checkpoint.load(last)["config"]["data"]["num_workers"] == 0  # the old layout

    assert report.main([str(run_copy), "--out", str(tmp_path / "sweep.png")]) == 0
    (val,) = harness.records(run_copy, "val")[-1:]
    command = ["-m", "ddp.eval_cli", str(last), "--out", str(tmp_path / "eval.json")]
    out = harness.run([sys.executable, *command], timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["samples"] == 359
    assert result["accuracy"] == pytest.approx(val["val/accuracy"], abs=1e-9)

    out = again(digits_root, run_copy, "trainer.max_epochs=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "continuing at epoch 2 step 0" in out.stdout
    assert [r["epoch"] for r in harness.records(run_copy, "val")] == [0, 1, 2]
    assert checkpoint.load(last)["config"]["data"]["loader"]["num_workers"] == 0
