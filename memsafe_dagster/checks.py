"""Argument checks shared by every layer, so each kind of bad value is refused in one wording.

Each check returns the value it accepts unchanged and raises ``ValueError`` naming the
parameter and quoting the value. ``bool`` is refused wherever a number is expected (it is an
``int`` to Python, never a size to a caller). No imports: ``memory/`` and ``datasets/`` use it
as freely as the Dagster layer.
"""

from __future__ import annotations


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _of(unit: str | None) -> str:
    return f" of {unit}" if unit else ""


def positive_int(name: str, value: object) -> int:
    """``value`` when it is an integer > 0."""
    if not _is_int(value) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value  # type: ignore[return-value]


def optional_positive_int(name: str, value: object) -> int | None:
    """``value`` when it is None or an integer > 0."""
    if value is None:
        return None
    if not _is_int(value) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return value  # type: ignore[return-value]


def positive_number(name: str, value: object, *, unit: str | None = None) -> float:
    """``value`` when it is an int or float > 0 (``unit``, e.g. "MB", is named in the error)."""
    if not _is_number(value) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive number{_of(unit)}, got {value!r}")
    return value  # type: ignore[return-value]


def optional_positive_number(name: str, value: object, *, unit: str | None = None) -> float | None:
    """``value`` when it is None or an int or float > 0."""
    if value is None:
        return None
    if not _is_number(value) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive number{_of(unit)} or None, got {value!r}")
    return value  # type: ignore[return-value]


def non_negative_number(name: str, value: object, *, unit: str | None = None) -> float:
    """``value`` when it is an int or float >= 0."""
    if not _is_number(value) or value < 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a non-negative number{_of(unit)}, got {value!r}")
    return value  # type: ignore[return-value]


def optional_non_negative_number(
    name: str, value: object, *, unit: str | None = None
) -> float | None:
    """``value`` when it is None or an int or float >= 0."""
    if value is None:
        return None
    return non_negative_number(name, value, unit=unit)


def non_negative_seconds(name: str, value: object) -> float:
    """``value`` when it is a duration in seconds >= 0."""
    if not _is_number(value) or value < 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return value  # type: ignore[return-value]
