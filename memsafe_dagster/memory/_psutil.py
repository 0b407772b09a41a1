"""psutil when it is installed, else None: every reading has a fallback without it."""

from __future__ import annotations

try:
    import psutil
except ImportError:  # pragma: no cover - exercised by a test that hides the module
    psutil = None  # type: ignore[assignment]

__all__ = ["psutil"]
