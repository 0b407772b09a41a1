"""Human memory sizes ("2g", "512Mi", "1.5GiB") to bytes and back."""

from __future__ import annotations

import re

MiB = 1024 * 1024

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "ki": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_memory_size(value: str | int | float) -> int:
    """Bytes in ``value``: an int, or a string such as "2g", "512m", "512Mi", "1.5GiB", "1024k".

    Units are binary (k = 1024), as Docker and Kubernetes mean them for memory. Anything else
    raises ``ValueError`` quoting the value.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid memory size {value!r}: expected bytes or a size like '512m'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid memory size {value!r}: must not be negative")
        return value
    if isinstance(value, float):
        if value < 0 or value != value or value == float("inf"):
            raise ValueError(f"invalid memory size {value!r}: must be a finite, positive number")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid memory size {value!r}: expected bytes or a size like '512m'")
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"invalid memory size {value!r}: expected a number with an optional unit "
            "(k, m, g, t; also kb/mb/gb and Ki/Mi/Gi/KiB/MiB/GiB), e.g. '512m' or '1.5GiB'"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_mb(num_bytes: float | None) -> str:
    """``num_bytes`` as a short readable MB figure ("1234.5MB"), or "n/a"."""
    if num_bytes is None:
        return "n/a"
    return f"{num_bytes / MiB:.1f}MB"
