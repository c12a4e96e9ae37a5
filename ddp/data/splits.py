"""Which data a config names, read once: the manifests, or the streamed shard URLs.

No torch here: `ddp-plan` needs the number of training samples and nothing else, and
the trainer reads each manifest once, here, then hands it to the loaders.

A split may live elsewhere (`data.root` or a split at `http(s)://...` or `s3://...`):
its manifest and index files are then fetched into the cache (`ddp.data.cache`) and it
is read from there as a local split, its shards fetched as they are needed.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from ddp.data.cache import GB, RemoteSplit, ShardCache, default_cache_dir, open_remote_split
from ddp.data.remote import Remote, is_remote, join
from ddp.data_config import DataConfig, RemoteConfig
from ddp.errors import DataError
from ddp.shards.columns import NO_LABEL, Keys
from ddp.shards.index import find_shards
from ddp.shards.manifest import MANIFEST_NAME, Manifest, read_manifest


@dataclass(frozen=True)
class StreamIndex:
    """What a manifest beside streamed shards tells: per URL, its sample keys (read when
    the stream reaches it), its sample count and the index of its first sample."""

    manifest_path: Path
    keys: Sequence[list[str]]
    """keys[u]: the keys of URL u's shard, in tar order."""
    starts: list[int]
    counts: list[int]


class _ShardKeys(Sequence[list[str]]):
    """Per URL, its shard's keys, read from the manifest's index when asked for."""

    def __init__(self, keys: Keys, ranges: list[tuple[int, int]]):
        self._keys, self._ranges = keys, ranges

    def __len__(self) -> int:
        return len(self._ranges)

    def __getitem__(self, url: int) -> list[str]:  # type: ignore[override]
        return self._keys.range(*self._ranges[url])


@dataclass(frozen=True)
class StreamShards:
    """Shards read front to back (streaming mode), with their index when one is known."""

    urls: list[str]
    index: StreamIndex | None

    def num_samples(self) -> int:
        """N, from the manifest; DataError when there is none (set data.stream.num_samples)."""
        if self.index is None:
            raise DataError(
                f"{self.urls[0]}: no manifest beside the shards to count their samples; "
                "set data.stream.num_samples"
            )
        return sum(self.index.counts)


@dataclass(frozen=True)
class Splits:
    """The training and validation data of a config."""

    train_dir: Path
    train: Manifest | None
    """None in streaming mode."""
    stream: StreamShards | None
    val_dir: Path
    val: Manifest
    num_train_samples: int
    train_remote: RemoteSplit | None = None
    """Where the training shards come from when they live elsewhere (train_dir: the cache)."""
    val_remote: RemoteSplit | None = None


def open_splits(data: DataConfig, with_val: bool = True, num_classes: int | None = None) -> Splits:
    """Read what `data` points at; DataError naming the file (and key) when something is
    missing, unlisted, or labelled outside [0, num_classes) (unless data.loader.on_error=skip)."""
    train_at, val_at = join(data.root, data.train_split), join(data.root, data.val_split)
    cache = shard_cache(data.remote) if is_remote(train_at) or is_remote(val_at) else None
    train_dir, train_remote = Path(train_at), None
    if data.stream.urls:
        stream = open_stream(data.stream.urls)
        train, num = None, data.stream.num_samples or stream.num_samples()
    else:
        stream = None
        prefetch = data.remote.prefetch_shards
        train_dir, train, train_remote = open_location(train_at, cache, prefetch)
        num = train.num_samples
    val_dir, val, val_remote = Path(val_at), None, None
    if with_val:
        val_dir, val, val_remote = open_location(val_at, cache, data.remote.prefetch_shards)
    if num_classes is not None and data.loader.on_error == "raise":
        checked = ((train_dir, train, train_remote), (val_dir, val, val_remote))
        for split_dir, manifest, remote in checked:
            if manifest is not None:
                check_labels(split_dir, manifest, data.target_key, num_classes, remote)
    return Splits(
        train_dir,
        train,
        stream,
        val_dir,
        val,
        num,
        train_remote,
        val_remote,  # type: ignore[arg-type]
    )


def open_named_split(
    data: DataConfig, split: str
) -> tuple[str, Path, Manifest, RemoteSplit | None]:
    """One split of `data` by name (ddp-eval, ddp-export): where it is (a path or a
    URL), its directory (local or in the cache), its manifest, its remote shards."""
    location = join(data.root, split)
    cache = shard_cache(data.remote) if is_remote(location) else None
    return (location, *open_location(location, cache, data.remote.prefetch_shards))


def shard_cache(remote: RemoteConfig) -> ShardCache:
    """The node's cache of remote shards, as data.remote says."""
    root = Path(remote.cache_dir) if remote.cache_dir else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        writable = os.access(root, os.W_OK)  # EROFS as well, even for root
        reason = "not writable"
    except OSError as exc:
        writable, reason = False, exc.strerror or str(exc)
    if not writable:
        raise DataError(
            f"data.remote.cache_dir={root}: {reason}; give a writable directory for the cache of "
            "remote shards"
        )
    fetcher = Remote(timeout_s=remote.timeout_s, s3_endpoint=remote.s3_endpoint)
    return ShardCache(root, int(remote.cache_max_gb * GB), fetcher)


def open_location(
    location: str, cache: ShardCache | None, prefetch_shards: int = 4
) -> tuple[Path, Manifest, RemoteSplit | None]:
    """A split by path or URL: (its directory, local or in the cache; its manifest; where
    its shards come from, None when local)."""
    if not is_remote(location):
        scheme = urlparse(location).scheme
        if len(scheme) > 1 and scheme != "file":  # (a Windows drive letter is one letter)
            raise DataError(
                f"{location}: {scheme}:// is not read; data.root and the splits may be "
                "paths, http(s):// or s3:// URLs"
            )
        path = Path(unquote(urlparse(location).path)) if scheme == "file" else Path(location)
        return path, open_split(path), None
    assert cache is not None
    return open_remote_split(location, cache, prefetch_shards)


def open_split(split_dir: Path) -> Manifest:
    """The split's manifest, which must list every shard in the directory: a tar it
    does not list would silently never be trained on."""
    manifest = read_manifest(split_dir)
    listed = set(manifest.table.names)
    for path in find_shards(split_dir):
        if str(path.relative_to(split_dir)) not in listed:
            raise DataError(
                f"{path}: a shard that {split_dir}/{MANIFEST_NAME} does not list (re-run "
                f"`ddp-shards index {split_dir}` to include it, or move it out)"
            )
    return manifest


def check_labels(
    split_dir: Path,
    manifest: Manifest,
    target_key: str,
    num_classes: int,
    remote: RemoteSplit | None = None,
) -> None:
    """Every label the indexer recorded lies in [0, num_classes); else DataError naming
    the first sample outside (read from its shard: only that shard's labels; a remote
    shard is named by URL with its recorded range, not fetched). One comparison per
    shard: the ranges are columns of the shard table."""
    ranges = manifest.table.label_ranges.get(target_key)
    if ranges is None:
        return
    recorded = ranges[:, 0] != NO_LABEL
    outside = recorded & ((ranges[:, 0] < 0) | (ranges[:, 1] >= num_classes))
    for shard in np.flatnonzero(outside).tolist():
        if remote is not None:
            lo, hi = ranges[shard].tolist()
            raise DataError(
                f"{remote.shard_url(shard)}: labels {lo}..{hi} (as indexed) are not all in "
                f"[0, {num_classes}) (model.num_classes={num_classes})"
            )
        _name_bad_label(split_dir, manifest, shard, target_key, num_classes)


def _name_bad_label(
    split_dir: Path, manifest: Manifest, shard: int, target_key: str, num_classes: int
) -> None:
    path = split_dir / manifest.table.names[shard]
    lo, hi = int(manifest.table.starts[shard]), int(manifest.table.starts[shard + 1])
    col = np.asarray(manifest.samples.members[target_key][lo:hi]).tolist()
    with open(path, "rb") as f:
        for key, (offset, size) in zip(manifest.keys.range(lo, hi), col, strict=True):
            label = int(os.pread(f.fileno(), size, offset)) if offset >= 0 else 0
            if not 0 <= label < num_classes:
                raise DataError(
                    f"{path}: key {key}: label {label} is outside [0, {num_classes}) "
                    f"(model.num_classes={num_classes})"
                )


def train_samples(data: DataConfig) -> int:
    """N of the training split: what the plan needs before any data is read."""
    return open_splits(data, with_val=False).num_train_samples


# --------------------------------------------------------------------------- streams


def expand_urls(urls: Sequence[str] | str) -> list[str]:
    """A list as it is; a string through webdataset's expansion (brace patterns,
    `::`-separated lists): "pipe:cat /d/shard-{000000..000003}.tar" gives four."""
    if isinstance(urls, str):
        from webdataset.shardlists import expand_urls as wds_expand

        expanded = list(wds_expand(urls))
    else:
        expanded = [str(u) for u in urls]
    if not expanded:
        raise DataError(f"no shard URLs in {urls!r}")
    return expanded


def local_path(url: str) -> Path | None:
    """The file behind a plain path, a file:// URL or `pipe:cat PATH`; None otherwise."""
    if url.startswith("pipe:"):
        try:
            words = shlex.split(url[5:])
        except ValueError:
            return None
        return Path(words[1]) if len(words) == 2 and words[0] == "cat" else None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(url) if parsed.scheme == "" else None


def opened_directly(url: str) -> bool:
    """gopen opens plain paths and file:// URLs itself: those can be checked up front."""
    return urlparse(url).scheme in ("", "file") and not url.startswith("pipe:")


def open_stream(
    urls: Sequence[str] | str, manifest_dir: str | os.PathLike | None = None
) -> StreamShards:
    """The URLs, checked where they are local files, and the manifest that describes them
    (given, or found beside local shards)."""
    url_list = expand_urls(urls)
    for url in url_list:
        path = local_path(url)
        if opened_directly(url) and path is not None and not path.is_file():
            raise DataError(f"{url}: shard missing")
    return StreamShards(url_list, find_stream_index(url_list, manifest_dir))


def stream_num_samples(
    urls: Sequence[str] | str, manifest_dir: str | os.PathLike | None = None
) -> int:
    """N of the streamed shards, from the manifest beside them (or in `manifest_dir`)."""
    url_list = expand_urls(urls)
    return StreamShards(url_list, find_stream_index(url_list, manifest_dir)).num_samples()


def find_stream_index(
    urls: list[str], manifest_dir: str | os.PathLike | None
) -> StreamIndex | None:
    """The manifest describing `urls` (given, or beside local shards), matched by name."""
    paths = [local_path(u) for u in urls]
    auto = manifest_dir is None
    if auto:
        if any(p is None for p in paths):
            return None
        manifest_dir = paths[0].parent  # type: ignore[union-attr]
        if not (Path(manifest_dir) / MANIFEST_NAME).is_file():
            return None
    manifest_dir = Path(manifest_dir)
    manifest = read_manifest(manifest_dir)
    table = manifest.table
    position = {name: s for s, name in enumerate(table.names)}
    ranges, counts = [], []
    for url, path in zip(urls, paths, strict=True):
        name = _name_in(path, manifest_dir) if path is not None else None
        if name is None and auto:
            return None  # the shards are not all beside the manifest: it is not theirs
        if name is None:
            name = url.rstrip("/").rsplit("/", 1)[-1]
        if name not in position:
            raise DataError(
                f"{url}: not listed in {manifest_dir / MANIFEST_NAME} (re-run "
                f"`ddp-shards index {manifest_dir}`, or leave the manifest out)"
            )
        s = position[name]
        size = int(table.sizes[s])
        if path is not None and path.is_file() and path.stat().st_size != size:
            raise DataError(
                f"{path}: {path.stat().st_size:,} bytes but the manifest says {size:,} "
                f"(re-run `ddp-shards index {manifest_dir}`)"
            )
        ranges.append((int(table.starts[s]), int(table.starts[s + 1])))
        counts.append(int(table.counts[s]))
    return StreamIndex(
        manifest_dir / MANIFEST_NAME,
        _ShardKeys(manifest.keys, ranges),
        [lo for lo, _ in ranges],
        counts,
    )


def _name_in(path: Path, directory: Path) -> str | None:
    try:
        return str(path.resolve().relative_to(directory.resolve()))
    except ValueError:
        return None
