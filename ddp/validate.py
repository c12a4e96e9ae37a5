"""One way to refuse a value: a ConfigError whose message names the key.

Used by the config schemas, the plateau tracker and the loader options alike, so
every refusal reads the same: `error: data.loader.num_workers=-1 must be >= 0`.
"""

from __future__ import annotations

from collections.abc import Iterable

from ddp.errors import ConfigError


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def one_of(key: str, value: object, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    require(value in choices, f"{key}={value!r} must be one of {', '.join(choices)}")


def integer_at_least(key: str, value: object, low: int) -> None:
    # bool is an int subclass; patience=True is a config mistake, not 1.
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    require(ok, f"{key}={value!r} must be an integer >= {low}")


def positive_or_none(key: str, value: float | None) -> None:
    require(value is None or value > 0, f"{key}={value} must be > 0 or null")
