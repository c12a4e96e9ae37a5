"""metrics.jsonl: the run's numbers for people without W&B, one JSON object per line.

    {"kind": "plan", ...plan fields..., "config": {...}, "monitor": ..., "run_name": ...,
     "group": ..., "wandb_run_id": ...}
    {"kind": "train", "step": ..., "epoch": ..., "train/loss": ...}
    {"kind": "val", "step": ..., "epoch": ..., "val/accuracy": ...}
    {"kind": "event", "step": ..., "epoch": ..., "event": "stop", ...}
    {"kind": "summary", "step": ..., "best_value": ..., "best_epoch": ..., "stop_reason": ...}

Every record also carries "time" (unix seconds) and "elapsed_s" (training wall time so
far, summed over restarts, excluding the downtime between them). NaN and infinities,
which JSON lacks, are written as null.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"

Record = dict[str, Any]


def read_records(path: Path) -> list[Record]:
    """The records of one metrics.jsonl; a line torn by a kill mid-write is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsFile:
    """The sink that writes metrics.jsonl.

    A resumed run keeps the earlier attempt's records up to the checkpoint's step (the
    steps after it are trained again and would be duplicated) and drops its plan and
    summary lines: the new plan line heads the file, the summary comes at the end.
    """

    def __init__(self, run_dir: Path, resume_from_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.records: list[Record] = self._kept(resume_from_step or 0)
        """Every record of the run so far, earlier attempts' included."""
        self._elapsed_offset = max((r.get("elapsed_s") or 0.0 for r in self.records), default=0.0)
        self._t0 = time.monotonic()
        self._fd = -1
        self._size = 0
        """Bytes of whole lines in the file: a failed write is cut back to this."""

    def __str__(self) -> str:
        return str(self.path)

    def _kept(self, resume_step: int) -> list[Record]:
        if not self.path.exists():
            return []
        return [
            r
            for r in read_records(self.path)
            if r.get("kind") not in ("plan", "summary") and r.get("step", 0) <= resume_step
        ]

    def _stamped(self, record: Record) -> Record:
        elapsed = self._elapsed_offset + time.monotonic() - self._t0
        return {**record, "time": round(time.time(), 3), "elapsed_s": round(elapsed, 3)}

    def log(self, record: Record) -> None:
        record = self._stamped(record)
        if record["kind"] == "plan":
            self._rewrite([record, *self.records])
            return
        self._append((_dumps(record) + "\n").encode())
        self.records.append(record)

    def _append(self, line: bytes) -> None:
        """One whole line, or none: a write cut short (a full disk) is truncated away, so
        the file never holds half a line. Unbuffered: a crash loses no finished line."""
        try:
            done = 0
            while done < len(line):
                done += os.write(self._fd, line[done:])
        except OSError:
            os.ftruncate(self._fd, self._size)
            raise
        self._size += len(line)

    def _rewrite(self, records: list[Record]) -> None:
        # Atomic replace: a kill now leaves either the old file or the new one, never half.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".jsonl.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in records:
                    f.write(_dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self.records = records
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size

    def finish(self, exit_code: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _dumps(record: Record) -> str:
    return json.dumps(_json_safe(record), default=str)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
