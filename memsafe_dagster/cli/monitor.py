"""``memsafe monitor``: the seed's monitoring loop, one timestamped line per tick, for the
container it runs in (its working set, what the kubelet counts, not this command's own RSS)."""

from __future__ import annotations

import argparse
import time
from datetime import datetime

from memsafe_dagster.cli._monitor_options import (
    add_budget_options,
    container_sample,
    monitor_from_args,
)
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel
from memsafe_dagster.memory.sizes import MiB

ICONS = {
    MemoryPressureLevel.NORMAL: "✅",
    MemoryPressureLevel.WARNING: "⚠️ ",
    MemoryPressureLevel.CRITICAL: "🔥",
    MemoryPressureLevel.EMERGENCY: "🚨",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "monitor",
        help="print the container's memory and pressure every interval",
        description=(
            "One line per tick: the container's working set (what the kubelet counts) against "
            "the limit, what it may still use, and the pressure level."
        ),
    )
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between lines")
    parser.add_argument("--count", type=int, default=None, help="stop after N lines")
    add_budget_options(parser)
    parser.set_defaults(handler=run)


def tick_line(monitor: MemoryMonitor) -> tuple[str, MemoryPressureLevel]:
    """One monitoring line: the container's used memory, limit, available memory, level."""
    reading, level, label = container_sample(monitor)
    limits = monitor.limits
    used_mb = reading.rss_bytes / MiB
    share = 100.0 * reading.rss_bytes / limits.limit_bytes if limits.limit_bytes else 0.0
    msg = f"[{datetime.now():%H:%M:%S}] {label.capitalize()}: {used_mb:.1f}MB "
    msg += f"of {limits.limit_mb:.1f}MB ({share:.0f}%, {limits.source}) "
    if reading.available_bytes is not None:
        msg += f"Available: {reading.available_bytes / MiB:.1f}MB "
    msg += f"Pressure: {level.value.upper()}"
    return f"{ICONS[level]} {msg}", level


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise ValueError(f"--interval must be positive, got {args.interval}")
    if args.count is not None and args.count <= 0:
        raise ValueError(f"--count must be positive, got {args.count}")
    monitor = monitor_from_args(args)
    ticks = 0
    while args.count is None or ticks < args.count:
        if ticks:
            time.sleep(args.interval)
        line, _level = tick_line(monitor)
        print(line, flush=True)
        ticks += 1
    return 0
