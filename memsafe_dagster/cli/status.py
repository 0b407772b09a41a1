"""``memsafe status [--json]``: the detected limit, where it comes from, usage and pressure.

The pressure is the container's (its working set against the budgets, see
``_monitor_options.container_sample``); the exit status makes the command a probe: 0 at
NORMAL and WARNING, 3 at CRITICAL (where memory-gated sensors stop launching runs), 4 at
EMERGENCY.
"""

from __future__ import annotations

import argparse
import json

from memsafe_dagster.cli._monitor_options import (
    EXIT_STATUS,
    add_budget_options,
    container_sample,
    monitor_from_args,
)
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel, psutil


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="detected memory limit, usage and pressure",
        description="The memory limit that applies here, where it comes from, usage, pressure.",
        epilog="exit status: 0 NORMAL or WARNING, 3 CRITICAL, 4 EMERGENCY",
    )
    parser.add_argument("--json", action="store_true", help="stable JSON for machines")
    add_budget_options(parser)
    parser.set_defaults(handler=run)


def status_document(monitor: MemoryMonitor) -> dict:
    """The JSON document of ``memsafe status --json`` (keys are stable)."""
    status = monitor.get_memory_status()
    _reading, level, _label = container_sample(monitor)
    status["pressure"] = level.value
    return {
        "limit_mb": status["limit_mb"],
        "limit_source": status["limit_source"],
        "working_set_mb": status["working_set_mb"],
        "process_rss_mb": status["process_rss_mb"],
        "pyarrow_allocated_mb": status["pyarrow_allocated_mb"],
        "system_available_mb": status["system_available_mb"],
        "pressure": status["pressure"],
        "budgets": {
            "max_pyarrow_mb": monitor.max_pyarrow_mb,
            "max_process_memory_mb": monitor.max_process_memory_mb,
            "min_system_available_mb": monitor.min_system_available_mb,
        },
        "limits": monitor.limits.to_dict(),
        "psutil": psutil is not None,
    }


def run(args: argparse.Namespace) -> int:
    doc = status_document(monitor_from_args(args))
    code = EXIT_STATUS[MemoryPressureLevel(doc["pressure"])]
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return code
    limits = doc["limits"]
    cgroup = (
        f"v{limits['cgroup_version']} {limits['cgroup_path']}" if limits["cgroup_path"] else "none"
    )
    budgets = doc["budgets"]
    rows = [
        ("limit", f"{doc['limit_mb']:.1f} MB  (binding: {doc['limit_source']})"),
        ("physical RAM", f"{limits['physical_bytes'] / 2**20:.1f} MB"),
        ("cgroup", cgroup),
        ("working set", _mb(doc["working_set_mb"])),
        ("process RSS", _mb(doc["process_rss_mb"])),
        ("PyArrow", _mb(doc["pyarrow_allocated_mb"])),
        ("available", _mb(doc["system_available_mb"])),
        ("pressure", doc["pressure"].upper()),
        (
            "budgets",
            f"process {_mb(budgets['max_process_memory_mb'])}, "
            f"PyArrow {_mb(budgets['max_pyarrow_mb'])}, "
            f"keep {_mb(budgets['min_system_available_mb'])} free",
        ),
    ]
    for env_name, value in limits["env_limits"].items():
        rows.insert(2, (env_name, f"{value / 2**20:.1f} MB"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return code


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"
