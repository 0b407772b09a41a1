"""Budget options shared by commands that build a MemoryMonitor."""

from __future__ import annotations

import argparse

from memsafe_dagster.memory import MemoryMonitor, detect_memory_limits


def add_budget_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        choices=("container", "development"),
        default="container",
        help="budgets from the detected limit (60/40/20 split) or the seed's development tiers",
    )
    parser.add_argument("--max-pyarrow-mb", type=float, help="override the PyArrow budget")
    parser.add_argument("--max-process-mb", type=float, help="override the process budget")
    parser.add_argument("--min-available-mb", type=float, help="override the free-memory floor")


def monitor_from_args(args: argparse.Namespace) -> MemoryMonitor:
    limits = detect_memory_limits()
    if args.profile == "development":
        base = MemoryMonitor.for_development(limits=limits)
    else:
        base = MemoryMonitor.for_container(limits=limits)
    return MemoryMonitor(
        max_pyarrow_mb=args.max_pyarrow_mb
        if args.max_pyarrow_mb is not None
        else base.max_pyarrow_mb,
        max_process_memory_mb=(
            args.max_process_mb if args.max_process_mb is not None else base.max_process_memory_mb
        ),
        min_system_available_mb=(
            args.min_available_mb
            if args.min_available_mb is not None
            else base.min_system_available_mb
        ),
        limits=limits,
    )
