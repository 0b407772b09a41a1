"""Suite-wide fixtures: hermetic memory limits, shared skips for real cgroup caps."""

import sys
from pathlib import Path

import pytest

from memsafe_dagster.memory.cgroup_cap import MemoryCap

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _hermetic_memory_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits a developer exported in their shell must not leak into assertions."""
    monkeypatch.delenv("MEMSAFE_MEMORY_LIMIT", raising=False)
    monkeypatch.delenv("CONTAINER_MEMORY_LIMIT", raising=False)


@pytest.fixture(scope="session")
def cgroup_caps() -> None:
    """Skip, loudly, where no child memory cgroup can be made (CI's machine kind can)."""
    reason = MemoryCap.unavailable_reason()
    if reason is not None:
        pytest.skip(f"REAL CGROUP CAP UNAVAILABLE, memory claim not verified here: {reason}")
