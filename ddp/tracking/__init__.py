"""Rank 0's record of a run: one `Tracker.log(record)` fanned out to sinks.

- `tracker`: `Tracker`, the records the trainer writes and the run's end (summary, curves).
- `metrics_file`: metrics.jsonl in the run directory, written and read back.
- `wandb_sink`: the same records in a W&B run (offline by default).

Records are dicts with a "kind": plan, train, val, event, summary (see metrics_file).
"""
