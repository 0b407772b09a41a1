"""Suite-wide fixtures: hermetic memory limits, shared skips for real cgroup caps."""

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from fs_helpers import Where

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


@pytest.fixture(params=["local", "memory"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Where]:
    """The same test on local disk and on fsspec's memory://."""
    if request.param == "local":
        yield Where(fsspec.filesystem("file"), str(tmp_path), str(tmp_path))
        return
    fs = fsspec.filesystem("memory")
    root = f"/scratch-{uuid.uuid4().hex[:10]}"
    fs.makedirs(root, exist_ok=True)
    yield Where(fs, root, f"memory://{root}")
    fs.rm(root, recursive=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many merges the sequence tests checked against their oracle."""
    module = sys.modules.get("test_merge_sequences")
    counts = getattr(module, "MERGES_CHECKED", None)
    if counts:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        terminalreporter.write_line(
            f"merge sequences: {sum(counts.values())} merges checked against the oracle ({detail})"
        )
