"""Memory limits, pressure and monitoring; no Dagster imports, usable on its own."""

from memsafe_dagster.memory._psutil import psutil
from memsafe_dagster.memory.limits import CgroupLimit, MemoryLimits, detect_memory_limits
from memsafe_dagster.memory.monitor import MemoryMonitor, MemoryReading
from memsafe_dagster.memory.pressure import MemoryPressureError, MemoryPressureLevel
from memsafe_dagster.memory.sampler import MemorySampler
from memsafe_dagster.memory.sizes import parse_memory_size

__all__ = [
    "CgroupLimit",
    "MemoryLimits",
    "MemoryMonitor",
    "MemoryPressureError",
    "MemoryPressureLevel",
    "MemoryReading",
    "MemorySampler",
    "detect_memory_limits",
    "parse_memory_size",
    "psutil",
]
