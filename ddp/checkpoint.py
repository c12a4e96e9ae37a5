"""Checkpoints: everything needed to continue as if nothing happened.

Written atomically (temporary file in the same directory, fsync, rename, fsync
of the directory), so a kill at any instant leaves the previous checkpoint
loadable. Read back with `torch.load(weights_only=True)`: plain containers and
tensors only, nothing a foreign file could use to run code.
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import random
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ddp.errors import CheckpointError

FORMAT = "ddp-checkpoint/1"


def atomic_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: _save(obj, f))


def _save(obj: Any, f: BinaryIO) -> None:
    """torch.save into `f`, raising the OSError a write met (a full disk: ENOSPC) where
    torch's zip writer swallows it and says only "unexpected pos N vs M"."""
    sink = _Sink(f)
    try:
        torch.save(obj, sink)
    except RuntimeError:
        if sink.error is not None:
            raise sink.error from None
        raise


class _Sink:
    """A file for torch.save that remembers the OSError its writes met."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_copy(source: Path, path: Path) -> None:
    """`path` becomes a byte copy of `source` (best.pt from last.pt: no second pickling)."""
    with open(source, "rb") as src:
        _atomic_write(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))


class BackgroundWriter:
    """Checkpoint files written on a thread while training goes on.

    `save` takes a snapshot on the caller's thread (the state's tensors copied to CPU
    memory: training goes on changing the originals) and hands it to a long-lived writer
    thread, which pickles, writes, fsyncs and renames it (then any copies) exactly as
    `atomic_save` does. One write is in flight at a time: the next `save` waits for the
    last one. A failed write is reported by the next `save` as a warning (that save is
    still attempted: storage may have recovered) and raised by `wait`, which everything
    that ends the process calls, as a CheckpointError naming the file. A process that
    exits without `wait` (an error elsewhere) still finishes the write in flight, from
    an exit handler. The snapshot (one checkpoint's size) is held in memory until written.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: CheckpointError | None = None
        self._thread: threading.Thread | None = None

    def save(self, obj: Any, path: Path, copies: tuple[Path, ...] = ()) -> None:
        self._idle.wait()
        if self._error is not None:
            error, self._error = self._error, None
            print(f"warning: {error}; trying again", file=sys.stderr, flush=True)
        snapshot = _snapshot(obj)
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="ddp-checkpoint", daemon=True)
            self._thread.start()
            atexit.register(self._idle.wait)  # exit_process runs these before os._exit
        self._idle.clear()
        self._jobs.put((snapshot, path, copies))

    def _serve(self) -> None:
        while True:
            snapshot, path, copies = self._jobs.get()
            try:
                atomic_save(snapshot, path)
                for copy in copies:
                    atomic_copy(path, copy)
            except Exception as exc:  # noqa: BLE001 - reported on the training thread
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                self._error = CheckpointError(f"cannot write checkpoint {path}: {reason}")
            finally:
                self._idle.set()

    @property
    def failure(self) -> str | None:
        """The failure of the last write, not yet reported by `save` or `wait`."""
        error = self._error
        return None if error is None else str(error)

    def wait(self) -> None:
        """Until the last write is on disk; raise its failure, if any."""
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None:
            raise error


def _snapshot(obj: Any) -> Any:
    """`obj` with every tensor copied to CPU memory (strides kept) and every container
    rebuilt (its type and a state dict's `_metadata` kept), so nothing in it changes
    after the call."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copy = type(obj)((k, _snapshot(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # module versions of a state_dict
            copy._metadata = obj._metadata
        return copy
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_snapshot(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def remove_stale_temporaries(directory: Path) -> None:
    """Temporary files of writes cut short by a kill (atomic writes leave nothing else)."""
    for stale in directory.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a crash
    finally:
        os.close(dir_fd)


def load(path: Path) -> dict[str, Any]:
    """Load and check a checkpoint written by `atomic_save` of `make_state`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} {_unreadable(exc)}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} was not written by ddp ({FORMAT} expected)")
    return state


def _unreadable(exc: Exception) -> str:
    """Why torch.load refused a file, in our words (torch's advice to load it with
    weights_only=False, i.e. to run whatever code it holds, is not ours to give)."""
    if "Weights only load failed" in str(exc):
        # A pickle that is not a plain archive of tensors: a torch file, but not ours.
        return "is not a ddp checkpoint: it holds objects other than tensors and containers"
    return f"is corrupt or not a torch file ({type(exc).__name__}: {_first_sentence(exc)})"


def _first_sentence(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text.split(". ", 1)[0] if text else type(exc).__name__


def find(path: Path) -> Path:
    """A checkpoint file as it is; a run directory's best.pt, else its last.pt."""
    path = Path(path)
    if path.is_file():
        return path
    for name in ("best.pt", "last.pt"):
        if (path / "checkpoints" / name).is_file():
            return path / "checkpoints" / name
    raise CheckpointError(f"{path}: neither a checkpoint nor a run directory with checkpoints/")


def run_dir_of(ckpt: Path) -> Path | None:
    """The run directory a checkpoint lives in (RUN/checkpoints/x.pt), if it does."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def load_weights(model: torch.nn.Module, weights: dict[str, Any], source: str) -> None:
    """A checkpoint's weights into `model`, or CheckpointError naming the first mismatch."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())  # torch lists mismatches over many lines
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise CheckpointError(f"{source}: its weights do not fit the model: {reason}") from exc


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rng_state_bytes() -> bytes:
    """`rng_state()` as a few KiB of plain bytes, to gather from every rank cheaply."""
    state = {k: v.numpy().tobytes() if k != "python" else v for k, v in rng_state().items()}
    return pickle.dumps(state)


def rng_state_from_bytes(payload: bytes) -> dict[str, Any]:
    """What `rng_state()` returned on the rank that made `payload` (same job: trusted)."""
    state = pickle.loads(payload)  # noqa: S301 - bytes from a rank of this very job
    for key in ("torch", "cuda"):
        if key in state:
            state[key] = torch.frombuffer(bytearray(state[key]), dtype=torch.uint8)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_random_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_python_random_state(state: Any) -> tuple:
    # weights_only loading turns tuples into lists in some torch versions.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def has_nonfinite(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(
        t.is_floating_point() and not torch.isfinite(t).all()
        for t in state_dict.values()
        if isinstance(t, torch.Tensor)
    )
