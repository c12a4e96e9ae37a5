"""Run a command as a child and record its peak RSS and CPU time: what torchrun launches
per rank.

    torchrun ... bench/overhead_rss.py OUT_DIR -- python -m ddp.train ...

Writes OUT_DIR/rss-rank<RANK>.json with the child's peak RSS (the largest of the
child and the descendants it waited for, from getrusage(RUSAGE_CHILDREN)) and its
CPU seconds (user + system, the same descendants: a measure of work that a busy
shared machine disturbs far less than wall time), and exits with the child's status.
Measured from outside, so it works the same for every program, whatever it does at
exit (os._exit included). Signals torchrun sends the wrapper are passed on to the
child.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path


def main() -> int:
    out, sep, *command = sys.argv[1:]
    if sep != "--" or not command:
        raise SystemExit(__doc__)
    child = subprocess.Popen(command)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    code = child.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    rank = os.environ.get("RANK", "0")
    record = {
        "rank": int(rank),
        "max_rss_kb": usage.ru_maxrss,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "returncode": code,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rss-rank{rank}.json").write_text(json.dumps(record))
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
