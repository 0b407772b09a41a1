"""Memory options shared by the subcommands, in one scheme, and the container-wide reading.

Every size flag takes a SIZE: a number of MB (``512``) or a number with a unit (``512MB``,
``2g``, ``1.5GiB``; binary units, as Docker and Kubernetes mean them). Budgets are
``--max-memory`` (process), ``--max-pyarrow`` and ``--min-available``, for ``status``,
``monitor`` and ``merge`` alike; ``run`` takes the cap it enforces as ``--limit``. The old
spellings (``--max-process-mb``, ``--max-pyarrow-mb``, ``--min-available-mb``, ``run
--memory``) still work and are not listed.

``status`` and ``monitor`` run beside the work (``kubectl exec``, a sidecar), so they judge the
container: its working set, what the kubelet counts, stands in for this process's own RSS.
"""

from __future__ import annotations

import argparse
import dataclasses

from memsafe_dagster.memory import (
    MemoryMonitor,
    MemoryPressureLevel,
    detect_memory_limits,
    parse_memory_size,
)
from memsafe_dagster.memory.monitor import MemoryReading
from memsafe_dagster.memory.sizes import MiB

SIZE_HELP = "a number of MB, or with a unit: 512MB, 2g, 1.5GiB"

# The exit status of `memsafe status` at each level: a probe fails where sensors stop launching.
EXIT_STATUS = {
    MemoryPressureLevel.NORMAL: 0,
    MemoryPressureLevel.WARNING: 0,
    MemoryPressureLevel.CRITICAL: 3,
    MemoryPressureLevel.EMERGENCY: 4,
}


def size_mb(value: str) -> float:
    """A SIZE argument in MB (a bare number is MB)."""
    text = value.strip()
    try:
        mb = float(text.replace("_", ""))
    except ValueError:
        try:
            mb = parse_memory_size(text) / MiB
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc} ({SIZE_HELP})") from None
    if mb != mb or mb < 0 or mb == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid size {value!r}: must be a finite, positive size")
    return mb


def add_size_option(
    parser: argparse.ArgumentParser, flag: str, help: str, *aliases: str, **kwargs: object
) -> None:
    """``flag SIZE`` (in MB) plus hidden ``aliases`` writing the same destination."""
    dest = flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, type=size_mb, metavar="SIZE", dest=dest, help=help, **kwargs)
    for alias in aliases:
        parser.add_argument(alias, type=size_mb, dest=dest, help=argparse.SUPPRESS)


def add_budget_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        choices=("container", "development"),
        default="container",
        help="budgets from the detected limit (60/40/20 split) or the seed's development tiers",
    )
    add_size_option(parser, "--max-memory", "process budget (SIZE)", "--max-process-mb")
    add_size_option(parser, "--max-pyarrow", "PyArrow budget (SIZE)", "--max-pyarrow-mb")
    add_size_option(parser, "--min-available", "memory to keep free (SIZE)", "--min-available-mb")


def monitor_from_args(args: argparse.Namespace) -> MemoryMonitor:
    limits = detect_memory_limits()
    if args.profile == "development":
        base = MemoryMonitor.for_development(limits=limits)
    else:
        base = MemoryMonitor.for_container(limits=limits)

    def pick(given: float | None, default: float | None) -> float | None:
        return given if given is not None else default

    return MemoryMonitor(
        max_pyarrow_mb=pick(args.max_pyarrow, base.max_pyarrow_mb),
        max_process_memory_mb=pick(args.max_memory, base.max_process_memory_mb),
        min_system_available_mb=pick(args.min_available, base.min_system_available_mb),
        limits=limits,
    )


def container_sample(monitor: MemoryMonitor) -> tuple[MemoryReading, MemoryPressureLevel, str]:
    """(reading, level, what "used" is) for the container this command runs in.

    Used memory is the memory cgroup's working set (usage minus inactive file cache, as the
    kubelet counts it); without a memory cgroup it is what the binding limit leaves
    unavailable. The level classifies that against the process budget, as a step would be
    classified were it the container's only process, and the container's available memory
    against the floor.
    """
    reading = monitor.read()
    if reading.working_set_bytes is not None:
        used, label = reading.working_set_bytes, "working set"
    else:
        available = reading.available_bytes
        limit = monitor.limits.limit_bytes
        used = limit - available if available is not None else reading.rss_bytes
        used, label = max(0, used), "used"
    container = dataclasses.replace(reading, rss_bytes=used)
    level = monitor.classify(container)
    monitor.windows.observe(container, level)
    return container, level, label
