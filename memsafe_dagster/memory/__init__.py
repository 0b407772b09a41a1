"""Memory limits, pressure and monitoring; no Dagster imports, usable on its own.

``limits`` finds the real limit, ``process`` reads RSS, ``monitor`` classifies readings into
levels, ``window`` keeps the peaks of one stretch of work and ``sampler`` is the one background
thread per monitor that feeds the windows between checks.
"""

from memsafe_dagster.memory._psutil import psutil
from memsafe_dagster.memory.limits import CgroupLimit, MemoryLimits, detect_memory_limits
from memsafe_dagster.memory.monitor import MemoryMonitor, MemoryReading
from memsafe_dagster.memory.pressure import MemoryPressureError, MemoryPressureLevel
from memsafe_dagster.memory.sampler import MemorySampler, SamplingRequest
from memsafe_dagster.memory.sizes import parse_memory_size
from memsafe_dagster.memory.window import PeakWindow

__all__ = [
    "CgroupLimit",
    "MemoryLimits",
    "MemoryMonitor",
    "MemoryPressureError",
    "MemoryPressureLevel",
    "MemoryReading",
    "MemorySampler",
    "PeakWindow",
    "SamplingRequest",
    "detect_memory_limits",
    "parse_memory_size",
    "psutil",
]
