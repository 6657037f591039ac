"""Durations and sizes as task options accept them: numbers of seconds (as Celery writes
`time_limit=30`) or bytes, or text with a unit (`"500ms"`, `"2s"`, `"1m"`, `"64MiB"`)."""

from __future__ import annotations

import re
from typing import Any, Optional

_DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def seconds_to_ms(value: Any, what: str) -> Optional[int]:
    """Milliseconds of a duration: a number of seconds or text with a unit; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected seconds or a duration like '2s', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{what}: a duration cannot be negative, got {value!r}")
        return int(round(value * 1000))
    match = _NUMBER_UNIT.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _DURATION_UNITS:
        raise ValueError(f"{what}: expected seconds or a duration like '500ms', '2s', '1m', got {value!r}")
    return int(round(float(match.group(1)) * _DURATION_UNITS[unit]))


def size_to_bytes(value: Any, what: str) -> Optional[int]:
    """Bytes of a size: an integer or text with a unit (`64MiB`); None stays None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{what}: a size must be positive, got {value!r}")
        return value
    match = _NUMBER_UNIT.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{what}: expected bytes or a size like '64MiB', got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


_RATE = re.compile(r"^\s*[0-9]+(?:\.[0-9]+)?\s*(/\s*[smh])?\s*$")


def check_rate(value: Any) -> Optional[str]:
    """A Celery rate limit (`"10/s"`, `"100/m"`, `"1/h"`, or a number per second) as text."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = f"{value}/s"
    if not isinstance(value, str) or not _RATE.match(value) or float(value.split("/")[0]) <= 0:
        raise ValueError(f"rate_limit: expected a rate like '10/s', '100/m' or '1/h', got {value!r}")
    return value.replace(" ", "")
