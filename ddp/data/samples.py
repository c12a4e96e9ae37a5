"""Member bytes -> arrays: the decoding both loaders share.

Per-sample decoders by extension live in `ddp.shards.decode` (they also serve
`ddp-shards verify`); this module adds what a loader needs on top: the fast paths
over a whole micro-batch, the shape check, and error messages that name the sample.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def decode_target(ext: str, data: Member, num_classes: int | None = None) -> int:
    return check_label(int(decode_member(ext, bytes(data))), num_classes)


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
