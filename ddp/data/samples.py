"""Member bytes -> arrays: the decoding both loaders share.

Per-sample decoders by extension live in `ddp.shards.decode` (they also serve
`ddp-shards verify`); this module adds what a loader needs on top: the fast paths
over a whole micro-batch, the shape check, and error messages that name the sample.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ddp.shards.decode import decode_member
from ddp.shards.tar import npy_header, npy_payload_matches

Member = memoryview | bytes


def decode_input(ext: str, data: Member) -> np.ndarray:
    """One input member as an array (a plain npy member without a copy of its header parse)."""
    if ext == "npy":
        header = npy_header(data)
        if header is not None and npy_payload_matches(header, len(data)):
            head, dtype, shape = header
            return np.frombuffer(data, dtype, offset=len(head)).reshape(shape)
    return np.asarray(decode_member(ext, bytes(data)))


def alternatives(key: str) -> tuple[str, ...]:
    """webdataset's spelling of "any of these members": `jpg;png;jpeg` (first present wins)."""
    exts = tuple(part.strip() for part in key.split(";") if part.strip())
    if not exts:
        raise ValueError(f"{key!r} names no member extension")
    return exts


@dataclass(frozen=True)
class LabelKey:
    """Where a sample's class label is and how to read it.

    `cls` (an integer member), `cls;txt` (the first present), `json:label` (a field of a
    JSON member; dots reach into nested objects: `json:meta.class`). A label that is a
    class name is mapped to its position in `classes` (data.classes, or the manifest's
    meta.classes that `ddp-shards prepare imagefolder` records).
    """

    exts: tuple[str, ...]
    field: str | None = None
    classes: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, key: str, classes: Sequence[str] | None = None) -> LabelKey:
        member, _, field = key.partition(":")
        return cls(alternatives(member), field or None, tuple(classes) if classes else None)

    @property
    def plain(self) -> bool:
        """An integer member read as it is (the batch fast path and index label ranges)."""
        return self.field is None and self.classes is None and len(self.exts) == 1

    def decode(self, ext: str, data: Member, num_classes: int | None = None) -> int:
        raw = bytes(data)
        value = json.loads(raw) if ext.rsplit(".", 1)[-1] == "json" else raw.decode().strip()
        if self.field is not None:
            for part in self.field.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise LookupError(f"the .{ext} member has no field {self.field!r}")
                value = value[part]
        return check_label(self._as_int(value), num_classes)

    def _as_int(self, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"label {value!r} is neither an integer nor a class name")
        if isinstance(value, int) or value.lstrip("-").isdigit():
            return int(value)
        if self.classes is None:
            raise ValueError(
                f"label {value!r} is a class name, but no class list maps it to an id "
                "(set data.classes)"
            )
        if value not in self.classes:
            raise ValueError(f"label {value!r} is not one of the {len(self.classes)} classes")
        return self.classes.index(value)


def check_label(label: int, num_classes: int | None) -> int:
    """`label`, if it names one of the model's classes (or they are not known)."""
    if num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside [0, {num_classes})")
    return label


def check_shape(array: np.ndarray, like: np.ndarray | None) -> np.ndarray:
    """`array`, if it has the shape of the batch's first sample `like` (or there is none)."""
    if like is not None and like.shape != array.shape:
        raise ValueError(f"shape {array.shape} differs from the batch's {like.shape}")
    return array


def describe(err: Exception) -> str:
    """The reason a member failed, for a one-line message."""
    return str(err) if type(err) is LookupError else f"{type(err).__name__}: {err}"


def gather_npy(members: Sequence[Member]) -> np.ndarray | None:
    """A micro-batch of npy members sharing the first one's header, joined in one C-level
    copy after one header parse; None sends the batch to the per-sample path."""
    if not members or len({len(m) for m in members}) != 1:
        return None
    header = npy_header(members[0])
    if header is None or not npy_payload_matches(header, len(members[0])):
        return None
    head, dtype, shape = header
    size = len(members[0])
    joined = np.frombuffer(b"".join(members), dtype=np.uint8).reshape(len(members), size)
    if not (joined[:, : len(head)] == np.frombuffer(head, dtype=np.uint8)).all():
        return None
    payload = np.empty((len(members), size - len(head)), dtype=np.uint8)
    payload[:] = joined[:, len(head) :]
    return payload.view(dtype).reshape(len(members), *shape)


def parse_labels(members: Sequence[Member], count: int) -> np.ndarray | None:
    """Integer labels of a whole batch from one join and split; None (then the
    per-sample path names the culprit) unless every member is exactly one int."""
    tokens = b" ".join(members).split()
    if len(tokens) != count:
        return None
    try:
        return np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        return None
