"""Pressure levels and the error raised when memory runs out of room."""

from __future__ import annotations

import enum
from typing import Any


class MemoryPressureLevel(enum.Enum):
    """How close the process is to its memory budget; ordered NORMAL < ... < EMERGENCY."""

    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"
    EMERGENCY = "emergency"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, MemoryPressureLevel):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, MemoryPressureLevel):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, MemoryPressureLevel):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, MemoryPressureLevel):
            return NotImplemented
        return self.rank >= other.rank

    @classmethod
    def parse(cls, value: str | MemoryPressureLevel) -> MemoryPressureLevel:
        """A level from its value or name, case-insensitive ("critical", "CRITICAL")."""
        if isinstance(value, MemoryPressureLevel):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            names = ", ".join(level.value for level in cls)
            raise ValueError(
                f"unknown memory pressure level {value!r}: expected one of {names}"
            ) from None


_RANK = {level: i for i, level in enumerate(MemoryPressureLevel)}


class MemoryPressureError(MemoryError):
    """Raised instead of letting the kernel kill the process: carries the level and the status."""

    def __init__(
        self,
        message: str,
        level: MemoryPressureLevel = MemoryPressureLevel.EMERGENCY,
        status: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.level = level
        self.status = dict(status or {})
