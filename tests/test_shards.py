"""Guarantees of the shard layer: manifests, index, verify, the ddp-shards CLI."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st

from ddp.data.dataset import ShardDataset
from ddp.errors import DataError
from ddp.order import rank_micro_batches
from ddp.plan import make_plan
from ddp.shards import Manifest, index_split, read_manifest, write_manifest
from ddp.shards.cli import main
from ddp.shards.columns import NO_LABEL
from ddp.shards.manifest import ShardTable
from ddp.shards.prepare import encode_npy, prepare_imagefolder, prepare_synthetic
from ddp.shards.writer import ShardWriter
from tests import harness
from tests.fixtures import as_v1, break_huffman_table, copy_split, corrupt_member, corrupt_npy


def extract(split: Path, dst: Path) -> list[str]:
    """Unpack every shard's members into dst; return member names in tar order."""
    names = []
    for shard in sorted(split.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                (dst / info.name).write_bytes(tar.extractfile(info).read())
                names.append(info.name)
    return names


def offsets_of(manifest: Manifest) -> list:
    return [(s.keys, s.members) for s in manifest.shards]


def test_prepare_digits_writes_sharded_train_and_val(digits_root: Path) -> None:
    train, val = read_manifest(digits_root / "train"), read_manifest(digits_root / "val")
    assert train.num_samples + val.num_samples == 1797
    assert val.num_samples == round(1797 * 0.2)
    assert len(train.shards) == 6 and all(s.num_samples <= 256 for s in train.shards)
    keys = [k for m in (train, val) for s in m.shards for k in s.keys]
    assert len(set(keys)) == len(keys)
    with tarfile.open(digits_root / "train" / "shard-000000.tar") as tar:
        names = tar.getnames()[:2]
        image = np.load(io.BytesIO(tar.extractfile(names[1]).read()))
        label = int(tar.extractfile(names[0]).read())
    assert names[0].endswith(".cls") and names[1].endswith(".npy")
    assert image.shape == (1, 8, 8) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and 0 <= label <= 9


def test_prepare_is_reproducible(tmp_path: Path) -> None:
    a = prepare_synthetic(tmp_path / "a", 120, (4, 4, 3), 3, seed=1, shard_size=50)
    b = prepare_synthetic(tmp_path / "b", 120, (4, 4, 3), 3, seed=1, shard_size=50)
    assert [s.sha256 for s in a["train"].shards] == [s.sha256 for s in b["train"].shards]


def test_manifest_round_trip(digits_root: Path, tmp_path: Path) -> None:
    manifest = read_manifest(digits_root / "train")
    write_manifest(tmp_path, manifest)
    again = read_manifest(tmp_path)
    assert again.to_json() == manifest.to_json()
    assert list(again.shards) == list(manifest.shards)  # keys, members, labels
    assert json.loads((tmp_path / "manifest.json").read_text())["num_samples"] == 1438


def test_manifest_v2_is_small_json_beside_mapped_index_files(digits_root: Path) -> None:
    """Per shard in the JSON; per sample in .npy files read by memory map, keys one per
    line (line i + 1 names sample i)."""
    split = digits_root / "train"
    content = json.loads((split / "manifest.json").read_text())
    assert content["version"] == 2 and content["num_shards"] == 6
    assert set(content["shards"]) == {
        *("names", "sizes", "num_samples", "sha256", "label_ranges", "member_counts")
    }
    assert content["shards"]["label_ranges"]["cls"] == {"low": [0] * 6, "high": [9] * 6}
    counts = content["shards"]["num_samples"]
    assert content["shards"]["member_counts"] == {"cls": counts, "npy": counts}
    index = content["index"]
    files = sorted(p.name for p in split.glob("manifest.*.*"))
    named = [*index["members"].values(), *index["labels"].values()]
    assert files == sorted([*named, index["keys"], index["key_offsets"]])
    manifest = read_manifest(split)
    members = np.load(split / index["members"]["npy"], mmap_mode="r")
    assert isinstance(members, np.memmap) and members.shape == (1438, 2)
    first = manifest.shards[0]
    assert members[:3, 0].tolist() == first.members["npy"]["offsets"][:3]
    lines = (split / index["keys"]).read_text().splitlines()
    assert lines == list(manifest.keys) and lines[1000] == manifest.keys[1000]
    labels = np.load(split / index["labels"]["cls"])
    assert labels[:256].tolist() == first.labels["cls"] and set(labels.tolist()) == set(range(10))


@pytest.fixture
def v1_split(digits_root: Path, tmp_path: Path) -> tuple[Path, Manifest]:
    """A copy of digits' val split under a version 1 manifest, and its v2 manifest."""
    split = copy_split(digits_root / "val", tmp_path / "val")
    ours = read_manifest(split)
    as_v1(split)
    return split, ours


def test_a_v1_manifest_is_read_as_before_and_index_upgrades_it(
    v1_split: tuple[Path, Manifest], capsys: pytest.CaptureFixture
) -> None:
    split, ours = v1_split
    old = read_manifest(split)
    assert old.version == 1 and offsets_of(old) == offsets_of(ours)
    assert list(old.keys) == list(ours.keys) and old.meta == ours.meta
    assert main(["verify", str(split)]) == 0
    assert main(["index", str(split)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{split}/manifest.json: upgraded from v1 to v2, from the shards"
    new = read_manifest(split)
    assert new.version == 2 and list(new.shards) == list(ours.shards)
    assert main(["index", str(split)]) == 0  # v2 already: no upgrade line
    assert "upgraded" not in capsys.readouterr().out


def test_index_upgrade_rewrites_a_v1_manifest_without_reading_shards(
    v1_split: tuple[Path, Manifest], capsys: pytest.CaptureFixture
) -> None:
    split, ours = v1_split
    for shard in split.glob("*.tar"):
        shard.unlink()
    assert main(["index", "--upgrade", str(split)]) == 0
    assert "upgraded from v1 to v2, from the manifest (shards not read)" in capsys.readouterr().out
    new = read_manifest(split)
    assert new.version == 2 and offsets_of(new) == offsets_of(ours)
    assert new.table.label_ranges["cls"].tolist() == ours.table.label_ranges["cls"].tolist()
    assert new.samples.labels == {}  # per-sample labels are known only from the shards


def test_a_rewrite_replaces_the_index_files_and_readers_keep_theirs(
    digits_root: Path, tmp_path: Path
) -> None:
    split = copy_split(digits_root / "val", tmp_path / "val")
    before = read_manifest(split)
    index_split(split)
    assert sorted({p.name.split(".")[1] for p in split.glob("manifest.*.*")}) == ["1"]
    assert list(read_manifest(split).keys) == list(before.keys)
    assert before.keys[358] == read_manifest(split).keys[358]  # unlinked, still mapped


def test_a_missing_or_wrong_index_file_is_one_line_naming_it(
    digits_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    split = copy_split(digits_root / "val", tmp_path / "val")
    (split / "manifest.0.keys.npy").unlink()
    with pytest.raises(DataError, match=r"manifest.0.keys.npy: index file missing \(listed in"):
        read_manifest(split)
    index_split(split)
    np.save(split / "manifest.1.members.npy.npy", np.zeros((5, 2), dtype=np.int64))
    assert main(["order", str(split), *ORDER_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "manifest.1.members.npy.npy: int64[5, 2] but the manifest needs int64[359, 2]" in err
    assert "\n" not in err


ORDER_ARGS = ["--epoch", "0", "--rank", "0", "--world-size", "1", "--micro-size", "4"]
ORDER_ARGS += ["--accumulate", "1", "--steps", "0:1"]


def test_index_of_a_plain_tar_matches_prepare(digits_root: Path, tmp_path: Path) -> None:
    members = tmp_path / "members"
    members.mkdir()
    names = extract(digits_root / "train", members)
    split = tmp_path / "split"
    split.mkdir()
    tar = ["tar", "--format=ustar", "-cf", str(split / "all-000000.tar"), "-C", str(members)]
    assert harness.run([*tar, *names], timeout=60).returncode == 0
    manifest = index_split(split)
    ours = read_manifest(digits_root / "train")
    assert [k for s in manifest.shards for k in s.keys] == [k for s in ours.shards for k in s.keys]
    first = ours.shards[0]
    assert (
        manifest.shards[0].members["npy"]["offsets"][: first.num_samples]
        == (first.members["npy"]["offsets"])
    )
    assert manifest.shards[0].members["npy"]["sizes"][:5] == first.members["npy"]["sizes"][:5]


def write_with_webdataset(src: Path, dst: Path, **writer_options) -> Path:
    dst.mkdir()
    urls = [str(src / s.name) for s in read_manifest(src).shards]
    with wds.ShardWriter(
        str(dst / "shard-%06d.tar"), maxcount=256, verbose=0, **writer_options
    ) as sink:
        for sample in wds.WebDataset(urls, shardshuffle=False):
            sink.write({"__key__": sample["__key__"], "npy": sample["npy"], "cls": sample["cls"]})
    return dst


def member_bytes(split: Path, manifest: Manifest, ext: str) -> list[bytes]:
    out = []
    for shard in manifest.shards:
        data = (split / shard.name).read_bytes()
        column = shard.members[ext]
        out += [data[o : o + n] for o, n in zip(column["offsets"], column["sizes"], strict=True)]
    return out


def test_index_of_webdataset_shardwriter_output_matches_prepare(
    digits_root: Path, tmp_path: Path
) -> None:
    ours = read_manifest(digits_root / "train")
    same_headers = write_with_webdataset(digits_root / "train", tmp_path / "fixed", mtime=0)
    assert offsets_of(index_split(same_headers)) == offsets_of(ours)
    # By default ShardWriter stamps float mtimes, hence extra pax headers: offsets
    # move, but the index still finds the same members.
    pax = write_with_webdataset(digits_root / "train", tmp_path / "pax")
    theirs = index_split(pax)
    assert [s.keys for s in theirs.shards] == [s.keys for s in ours.shards]
    for ext in ("npy", "cls"):
        assert member_bytes(pax, theirs, ext) == member_bytes(digits_root / "train", ours, ext)


def test_webdataset_reads_our_shards(digits_root: Path) -> None:
    manifest = read_manifest(digits_root / "val")
    urls = [str(digits_root / "val" / s.name) for s in manifest.shards]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("__key__", "npy", "cls")
    samples = list(dataset)
    assert [key for key, _, _ in samples] == [k for s in manifest.shards for k in s.keys]
    assert samples[0][1].shape == (1, 8, 8) and isinstance(samples[0][2], int)


def test_index_names_a_truncated_shard(digits_root: Path, tmp_path: Path) -> None:
    split = copy_split(digits_root / "val", tmp_path / "val")
    shard = split / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:10_000])
    with pytest.raises(DataError, match="shard-000001.tar"):
        index_split(split)


def test_verify_passes_a_clean_split(digits_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(digits_root / "val")]) == 0
    assert "ok" in capsys.readouterr().out


def test_verify_names_the_shard_and_key_of_a_corrupt_member(
    digits_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    split = copy_split(digits_root / "val", tmp_path / "val")
    shard = read_manifest(split).shards[1]
    key = corrupt_npy(split, 1, 3)
    assert main(["verify", str(split)]) == 1
    out = capsys.readouterr().out
    assert "sha256" in out and shard.name in out
    index_split(split)  # fresh checksums: only the undecodable member is left
    assert read_manifest(split).meta["source"] == "sklearn.datasets.load_digits"
    assert main(["verify", str(split)]) == 1
    out = capsys.readouterr().out
    assert f"{shard.name}: key {key}: .npy does not decode" in out


def test_verify_names_a_missing_shard(digits_root: Path, tmp_path: Path, capsys) -> None:
    split = copy_split(digits_root / "val", tmp_path / "val")
    (split / "shard-000000.tar").unlink()
    assert main(["verify", str(split)]) == 1
    assert "shard-000000.tar: shard missing" in capsys.readouterr().out


def test_verify_takes_photos_of_mixed_sizes_as_a_note(photos_root: Path, capsys) -> None:
    split = photos_root / "train"  # 128 JPEGs of about 64x56, each side +-20%
    assert main(["verify", str(split)]) == 0
    note, ok = capsys.readouterr().out.splitlines()
    assert note.startswith(f"{split}: note: the 128 .jpg images come in ")
    assert "data.augment crops them to one size" in note
    assert ok == f"{split}: 128 samples in 3 shards: ok"
    # Read without data.augment, the loader stacks them: one line sums the odd ones up.
    assert main(["verify", "--no-augment", str(split)]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert " .jpg members differ from the most common shape (" in line
    assert "key photo-" in line and "set data.augment" in line


def test_verify_names_the_one_corrupt_jpeg_among_photos(photos_root, tmp_path, capsys) -> None:
    split = copy_split(photos_root / "train", tmp_path / "train")
    shard = read_manifest(split).shards[1]
    key = corrupt_member(split, 1, 5, "jpg", break_huffman_table)
    index_split(split)  # fresh checksums: only the undecodable member is left
    assert main(["verify", str(split)]) == 1
    out = capsys.readouterr()
    problems = [line for line in out.out.splitlines() if ": note: " not in line]
    assert len(problems) == 1 and out.err.strip() == f"{split}: 1 problem(s)"
    assert problems[0].startswith(f"{split / shard.name}: key {key}: .jpg does not decode: ")


def test_verify_sums_up_arrays_of_mixed_shapes_in_one_line(tmp_path: Path, capsys) -> None:
    odd = {3, 17, 40, 51, 58}  # 5 of 60 samples, over 2 shards
    with ShardWriter(tmp_path, 32) as writer:
        for i in range(60):
            image = np.zeros((9, 9) if i in odd else (8, 8), dtype=np.float32)
            writer.write(f"s{i:02d}", {"npy": encode_npy(image), "cls": b"0"})
    assert main(["verify", str(tmp_path)]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line == (
        f"{tmp_path}: 5 of 60 .npy members differ from the most common shape (8, 8) "
        "(55 members): shard-000000.tar key s03 (9, 9), shard-000000.tar key s17 (9, 9), "
        "shard-000001.tar key s40 (9, 9) and 2 more; the loader stacks inputs as stored, "
        "and a batch needs one shape (write them at one shape)"
    )


def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    assert main(["index", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "\n" not in err
    assert main(["verify", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_cli_order_prints_the_rank_s_keys_in_consumption_order(digits_root: Path, capsys) -> None:
    split = digits_root / "train"
    argv = [
        "order",
        str(split),
        "--epoch",
        "3",
        "--rank",
        "1",
        "--world-size",
        "2",
        "--micro-size",
        "8",
        "--accumulate",
        "3",
        "--steps",
        "28:",
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [k for s in read_manifest(split).shards for k in s.keys]
    plan = make_plan(len(keys), 48, 8, 2)
    expected = [
        keys[i] + ("\tpadded" if p else "")
        for m in rank_micro_batches(plan, 0, 3, 1, start_step=28)
        for i, p in zip(m.indices.tolist(), m.padded.tolist(), strict=True)
    ]
    assert lines == expected and lines[-1].endswith("\tpadded")
    assert main([*argv[:-2], "--world-size", "100"]) == 2
    assert "exceeds the 1,438 training samples" in capsys.readouterr().err


def test_prepare_imagefolder_keeps_the_image_bytes(tmp_path: Path) -> None:
    from PIL import Image

    src = tmp_path / "src"
    for label, name in enumerate(["cat", "dog"]):
        (src / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (5, 4), (label * 200, i * 20, 0)).save(src / name / f"{i}.png")
    manifests = prepare_imagefolder(src, tmp_path / "out", shard_size=4, val_fraction=0.25)
    assert manifests["train"].num_samples == 9 and manifests["val"].num_samples == 3
    assert manifests["train"].meta["classes"] == ["cat", "dog"]
    assert main(["verify", str(tmp_path / "out" / "train")]) == 0


def test_cli_prepare_synthetic_png(tmp_path: Path, capsys) -> None:
    argv = [
        "prepare",
        "synthetic",
        "--num-samples",
        "50",
        "--shape",
        "6,6,3",
        "--format",
        "png",
        "--shard-size",
        "16",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    assert read_manifest(tmp_path / "train").extensions == ["cls", "png"]
    assert main(["verify", str(tmp_path / "train")]) == 0


def test_synth_index_writes_any_size_without_shards(tmp_path: Path, capsys) -> None:
    split = tmp_path / "synth"
    argv = ["synth-index", str(split), "--shards", "300", "--samples-per-shard", "1000"]
    assert main(argv) == 0
    assert "300,000 samples in 300 shards (synthetic: no tar files)" in capsys.readouterr().out
    manifest = read_manifest(split)
    assert manifest.num_samples == 300_000 and manifest.extensions == ["cls", "npy"]
    assert manifest.meta["synthetic"] and len(manifest.table.sha256[299]) == 64
    assert manifest.keys[1234] == "shard-000001.tar#234"  # no keys: shard and position
    members = (split / "manifest.0.members.npy.npy").stat()
    assert members.st_size > 300_000 * 16 and members.st_blocks * 512 < 300_000  # a hole
    assert main(["order", str(split), *ORDER_ARGS]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("shard-") and "#" in line for line in lines)
    (split / "x.tar").write_bytes(b"")
    assert main(argv) == 2
    assert "holds tar shards" in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=8), st.booleans())
def test_a_samples_shard_is_found_without_an_array_per_sample(counts: list, even: bool) -> None:
    """By division when the shards hold one count (the last no more), else by search."""
    if even:
        counts = [counts[0]] * (len(counts) - 1) + [min(counts[-1], counts[0])]
    table = ShardTable([f"{i}.tar" for i in range(len(counts))], *[np.array(counts)] * 2, [])
    expected = np.repeat(np.arange(len(counts)), counts)
    assert np.array_equal(table.shard_of(np.arange(len(expected))), expected)


def test_labels_are_recorded_where_they_are_integers(tmp_path: Path) -> None:
    """Per sample where .cls is an integer int64 holds; no range for a shard with others
    (the loader judges those per sample)."""
    split = tmp_path / "labels"
    split.mkdir()
    with tarfile.open(split / "shard-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, label in (("a", b"3"), ("b", b"cat"), ("c", b"9" * 30), ("d", b" 7\n")):
            for ext, data in (("cls", label), ("npy", b"x")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shard = index_split(split).shards[0]
    assert shard.labels["cls"] == [3, NO_LABEL, NO_LABEL, 7] and shard.label_ranges == {}
    assert read_manifest(split).samples.labels["cls"].tolist() == shard.labels["cls"]


def test_a_batch_reads_its_labels_from_the_index_where_it_recorded_them(
    digits_root: Path, tmp_path: Path
) -> None:
    """The index's labels are those in the members (so no member is read for them); a
    batch with a sample the index holds no label for reads the members, which then name
    the culprit."""
    dataset = ShardDataset(digits_root / "train")
    everything = np.arange(len(dataset))
    from_index, ok = dataset.labels(everything)
    members, _ = dataset._members(everything, ["cls"])
    assert ok.all() and from_index.tolist() == [int(bytes(m)) for m in members]

    split = copy_split(digits_root / "train", tmp_path / "train")
    key = corrupt_member(split, 0, 2, "cls", lambda label: b"x" * len(label))
    index_split(split)  # the index records no label for it
    dataset = ShardDataset(split)
    assert dataset._recorded_labels(np.array([0, 1])) is not None
    assert dataset._recorded_labels(np.array([0, 2])) is None
    with pytest.raises(DataError, match=rf"key {key}: undecodable \.cls"):
        dataset.labels(np.array([0, 2]))


@pytest.mark.parametrize(
    ("changed", "words"),
    [
        (["--rank", "1"], "--rank=1 must be in [0, --world-size=1)"),
        (["--epoch", "-1"], "--epoch=-1 and --seed=0 must be >= 0"),
        (["--steps", "999:"], "--steps 999: must start in [0, "),
    ],
)
def test_cli_order_refuses_arguments_outside_the_epoch(digits_root, capsys, changed, words):
    argv = ["order", str(digits_root / "train"), *ORDER_ARGS, *changed]  # the last one wins
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ddp-shards order: error: ") and words in line


def test_cli_order_prints_the_shard_window_order(digits_root: Path, capsys) -> None:
    """`--window-shards 2`: the trainer's order with data.window_shards=2; each stretch
    of two shards' samples comes from two shards; a k below 1 is one line, exit 2."""
    split = digits_root / "train"
    args = ["--epoch", "1", "--rank", "0", "--world-size", "1", "--micro-size", "64"]
    assert main(["order", str(split), *args, "--accumulate", "1", "--window-shards", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    manifest = read_manifest(split)
    shard_of_key = {k: i for i, s in enumerate(manifest.shards) for k in s.keys}
    real = [line for line in lines if not line.endswith("\tpadded")]
    assert sorted(real) == sorted(shard_of_key)  # every key once
    assert len({shard_of_key[k] for k in real[:512]}) == 2  # the first window: 2 shards of 256
    assert main(["order", str(split), *args, "--accumulate", "1", "--window-shards", "0"]) == 2
    assert "data.window_shards=0 must be >= 1" in capsys.readouterr().err
