"""Memory test fixtures shared by every area's tests."""

from memsafe_dagster.memory import MemoryLimits, MemoryReading

MiB = 1024 * 1024


def fixed_limits(limit_mb: float = 4096, source: str = "physical") -> MemoryLimits:
    """Limits of a machine with no cgroup: available memory is the host's."""
    return MemoryLimits(
        limit_bytes=int(limit_mb * MiB), source=source, physical_bytes=int(limit_mb * MiB)
    )


def reading(
    pyarrow_mb: float = 0, rss_mb: float = 0, available_mb: float | None = 10_000
) -> MemoryReading:
    """One monitor reading, in MB; ``available_mb=None`` means unknown."""
    return MemoryReading(
        pyarrow_bytes=int(pyarrow_mb * MiB),
        rss_bytes=int(rss_mb * MiB),
        available_bytes=None if available_mb is None else int(available_mb * MiB),
        working_set_bytes=None,
        at=0.0,
    )
