"""``memsafe monitor``: the seed's monitoring loop, one timestamped line per tick."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime

from memsafe_dagster.cli._monitor_options import add_budget_options, monitor_from_args
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel

ICONS = {
    MemoryPressureLevel.NORMAL: "✅",
    MemoryPressureLevel.WARNING: "⚠️ ",
    MemoryPressureLevel.CRITICAL: "🔥",
    MemoryPressureLevel.EMERGENCY: "🚨",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("monitor", help="print memory and pressure every interval")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between lines")
    parser.add_argument("--count", type=int, default=None, help="stop after N lines")
    add_budget_options(parser)
    parser.set_defaults(handler=run)


def tick_line(monitor: MemoryMonitor) -> tuple[str, MemoryPressureLevel]:
    """One monitoring line, as the seed's dashboard prints it."""
    reading, level = monitor.sample()
    status = monitor.status_of(reading, level)
    msg = f"[{datetime.now():%H:%M:%S}] PyArrow: {status['pyarrow_allocated_mb']:.1f}MB "
    msg += f"Process: {status['process_rss_mb']:.1f}MB "
    if status["system_available_mb"] is not None:
        msg += f"System: {status['system_available_mb']:.1f}MB "
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
    sys.stdout.flush()
    return 0
