"""The data group's schemas (`data.*` in conf/data/): where the splits are and how they
are read: the loader (`data.loader`), the cache of remote splits (`data.remote`),
streaming (`data.stream`) and image augmentation (`data.augment`). Part of ddp.config's
typed schemas; the same rules hold (values in conf/, checks in `__post_init__`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ddp.validate import integer_at_least, one_of, require

MISSING: Any = "???"  # OmegaConf's marker for a mandatory value (as in ddp.config)


@dataclass
class AugmentConfig:
    """Image decoding and augmentation (ddp.data.images): at training time a random-resized
    crop and a horizontal flip, at evaluation time a center crop, both resized to `size`;
    each sample's crop drawn from (trainer.seed, epoch, sample index)."""

    placement: str = MISSING
    """host: decoded (libjpeg-turbo) and augmented in the DataLoader workers, uint8 crops
    cross to the device; device: the JPEG bytes cross, a GPU decodes them (nvJPEG) and
    crops there (on a CPU-only run: in the training process)."""
    size: int = MISSING
    """Side of the square the crops are resized to (e.g. 224)."""
    scale: list[float] = MISSING
    """[min, max] area of a training crop as a fraction of the image (0.08-1: ImageNet's)."""
    ratio: list[float] = MISSING
    """[min, max] aspect (width / height) of a training crop before resizing."""
    flip: bool = MISSING
    """Mirror a training crop left-right with probability 1/2."""
    eval_crop: float = MISSING
    """Evaluation keeps the centered square of this fraction of the shorter side
    (0.875: resize to size / 0.875, center-crop size)."""

    def __post_init__(self) -> None:
        one_of("data.augment.placement", self.placement, ("host", "device"))
        integer_at_least("data.augment.size", self.size, 1)
        for key in ("scale", "ratio"):
            low_high = list(getattr(self, key))
            require(
                len(low_high) == 2 and 0 < low_high[0] <= low_high[1],
                f"data.augment.{key}={low_high} must be [min, max] with 0 < min <= max",
            )
        require(self.scale[1] <= 1, f"data.augment.scale={list(self.scale)} must be within (0, 1]")
        require(
            0 < self.eval_crop <= 1, f"data.augment.eval_crop={self.eval_crop} must be in (0, 1]"
        )


@dataclass
class LoaderConfig:
    """`data.loader`: how each process reads its micro-batches. The loaders take this
    dataclass as it is (`ddp.data.batch.LoaderOptions.loader`)."""

    num_workers: int = MISSING
    """DataLoader worker processes per rank (0: load in the training process)."""
    pin_memory: bool = MISSING
    """Page-locked host batches, so the copy to a GPU overlaps compute (no effect on a CPU)."""
    prefetch_factor: int = MISSING
    """Micro-batches each worker loads ahead of the training loop (DataLoader's
    prefetch_factor; no effect with num_workers=0)."""
    on_error: str = MISSING
    """raise: a bad sample stops the job, one line naming its shard and key; skip: it is
    counted, logged and masked out of the loss and the metrics."""
    in_memory_max_mb: float = MISSING
    """A split whose decoded inputs fit in this many MiB is decoded once and served from
    memory by each process (0: always read the shards). Never a streamed training split
    (data.stream.urls), nor with data.augment (new crops every epoch), nor a training
    split with data.transform and num_workers > 0 (the transform stays in the workers)."""
    on_device: bool = MISSING
    """On a GPU, keep a split held in memory (see in_memory_max_mb) in GPU memory: a
    micro-batch is a gather there and nothing crosses the bus per step. No effect on a
    CPU or for a split read from its shards (not refused: it is the default)."""

    def __post_init__(self) -> None:
        integer_at_least("data.loader.num_workers", self.num_workers, 0)
        integer_at_least("data.loader.prefetch_factor", self.prefetch_factor, 1)
        one_of("data.loader.on_error", self.on_error, ("raise", "skip"))
        require(
            self.in_memory_max_mb >= 0,
            f"data.loader.in_memory_max_mb={self.in_memory_max_mb} must be >= 0",
        )


@dataclass
class RemoteConfig:
    """`data.remote`: splits that live elsewhere (data.root, or a split, at http(s)://host/path
    or s3://bucket/prefix). Their shards are fetched whole into a cache shared by the
    node's processes, checked against the manifest's sha256, and evicted least recently
    used. Local splits ignore this group (its defaults are always there: not refused)."""

    cache_dir: str | None = MISSING
    """Where the shards of remote splits are kept, shared by the processes of a node
    (local disk, not NFS); null: $XDG_CACHE_HOME/ddp/shards (~/.cache/ddp/shards)."""
    cache_max_gb: float = MISSING
    """The cache's bound: least recently used shards no process has open are evicted."""
    timeout_s: float = MISSING
    """How long a remote fetch retries (exponential backoff) before the job stops, exit 2."""
    s3_endpoint: str | None = MISSING
    """An S3-compatible store's endpoint URL; null: AWS_ENDPOINT_URL, else AWS's."""
    prefetch_shards: int = MISSING
    """Remote shards the training loader fetches ahead of the epoch order's needs."""

    def __post_init__(self) -> None:
        require(self.cache_max_gb > 0, f"data.remote.cache_max_gb={self.cache_max_gb} must be > 0")
        require(self.timeout_s > 0, f"data.remote.timeout_s={self.timeout_s} must be > 0")
        integer_at_least("data.remote.prefetch_shards", self.prefetch_shards, 0)


@dataclass
class StreamConfig:
    """`data.stream`: the streaming mode, shard URLs read front to back instead of the
    indexed splits (exact batch counts per rank, but not exact coverage: see README)."""

    urls: Any = MISSING
    """Shard URLs (a list, or a brace pattern; pipe:, http(s), paths), read in order as the
    training split; null: the indexed splits under data.root (then this group is unused)."""
    num_samples: int | None = MISSING
    """Training samples behind `urls` when no manifest.json sits beside them; null: the
    manifest's count."""
    shuffle_buffer: int = MISSING
    """Samples in each stream's shuffle buffer (0 or 1: the shards' own order)."""

    def __post_init__(self) -> None:
        require(
            self.num_samples is None or self.num_samples >= 1,
            f"data.stream.num_samples={self.num_samples} must be >= 1 or null",
        )
        require(
            self.num_samples is None or bool(self.urls),
            f"data.stream.num_samples={self.num_samples} counts streamed shards: set "
            "data.stream.urls, or leave data.stream.num_samples null (the indexed splits "
            "are counted by their manifests)",
        )
        integer_at_least("data.stream.shuffle_buffer", self.shuffle_buffer, 0)


@dataclass
class DataConfig:
    root: str = MISSING
    """Directory (or http(s)://, s3:// URL) holding one sub-directory of shards +
    manifest.json per split."""
    train_split: str = MISSING
    """The training split's sub-directory of `root`."""
    val_split: str = MISSING
    """The validation split's sub-directory of `root` (validated every epoch)."""
    input_key: str = MISSING
    """Member extension holding the input (npy, png, jpg, ...); `jpg;png;jpeg;webp`: the
    first of these a sample has (webdataset's spelling)."""
    target_key: str = MISSING
    """Member holding the label: an extension (`cls`), alternatives (`cls;txt`), or a
    field of a JSON member (`json:label`, `json:meta.class`)."""
    classes: list[str] | None = MISSING
    """Class names in id order, for labels given as names; null: the manifest's
    meta.classes (recorded by `ddp-shards prepare imagefolder`), if any."""
    window_shards: int | None = MISSING
    """The training order: null shuffles all samples; k puts the shards in a random order
    and shuffles the samples within each window of k shards (every sample still once per
    epoch; a stretch of the epoch reads k shards: for remote splits bigger than the cache).
    Indexed splits only: refused with data.stream.urls."""
    transform: Any = MISSING
    """`_target_` of a callable applied to each training input tensor (e.g. torchvision's)."""
    normalize: Any = MISSING
    """{mean: [...], std: [...]} per channel, applied on the device after uint8 images
    are scaled to [0, 1]; null: none."""
    augment: AugmentConfig | None = MISSING
    """Decode image members and augment them (conf/data/augment/); null: inputs as stored."""
    loader: LoaderConfig = MISSING
    """How each process reads its micro-batches (conf/data/loader/)."""
    remote: RemoteConfig = MISSING
    """The cache of remote splits (conf/data/remote/)."""
    stream: StreamConfig = MISSING
    """Streaming mode (conf/data/stream/); stream.urls null: the indexed splits."""

    def __post_init__(self) -> None:
        require(
            self.window_shards is None or self.window_shards >= 1,
            f"data.window_shards={self.window_shards} must be >= 1 or null",
        )
        streaming = bool(self.stream.urls)
        require(
            not (streaming and self.window_shards is not None),
            f"data.window_shards={self.window_shards} orders indexed splits: not with "
            "data.stream.urls (streams are read in order); unset one of them",
        )
        if self.augment is not None:
            require(
                not streaming,
                "data.augment needs indexed shards: not with data.stream.urls; unset one of them",
            )
            require(
                self.augment.placement == "host" or self.transform is None,
                "data.transform runs on the host: not with data.augment.placement=device",
            )
        if self.normalize is not None:
            n = self.normalize
            ok = isinstance(n, dict) and {"mean", "std"} <= set(n)
            require(ok, "data.normalize must be null or {mean: [...], std: [...]}")
            require(
                len(n["mean"]) == len(n["std"]) and all(v > 0 for v in n["std"]),
                "data.normalize: mean and std need one value per channel, std > 0",
            )
