"""The user's input is wrong: one base, `BadInput`, and its four kinds.

Every command-line tool catches `BadInput` alone, prints its message as one line and
exits 2 (ExitCode.BAD_INPUT); anything else is a bug and keeps its traceback. Raise the
kind that names the culprit's place; the message names the culprit itself (the key, the
shard, the checkpoint file).

The kinds keep the builtin bases they were first defined with (ConfigError and PlanError
are ValueErrors, CheckpointError a RuntimeError), so code that catches those still does.
"""

from __future__ import annotations


class BadInput(Exception):
    """The user's input is wrong: exit 2, one line (the message)."""


class ConfigError(BadInput, ValueError):
    """A value out of range or of the wrong kind; the message names the key."""


class PlanError(BadInput, ValueError):
    """A batch configuration that cannot be planned; the message names the key."""


class DataError(BadInput):
    """Bad data: missing or corrupt shard, stale manifest, undecodable sample.

    The message names the culprit (shard path, and key where there is one).
    """


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""
