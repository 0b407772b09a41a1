"""Memory test fixtures shared by every area's tests."""

from memsafe_dagster.memory import MemoryLimits

MiB = 1024 * 1024


def fixed_limits(limit_mb: float = 4096, source: str = "physical") -> MemoryLimits:
    """Limits of a machine with no cgroup: available memory is the host's."""
    return MemoryLimits(
        limit_bytes=int(limit_mb * MiB), source=source, physical_bytes=int(limit_mb * MiB)
    )
