"""A multiprocess executor sized to the container: its CPU quota, and optionally its memory.

Dagster's ``multiprocess_executor`` runs ``max_concurrent`` step processes at once and defaults
that to the host's CPU count, which in a pod is the node's, not the pod's. ``container_cpus``
reads the CPU quota of this process's cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``, the smallest quota from the leaf up to the mount), rounded up, never
more than the CPUs the process may run on. ``container_executor`` builds the executor through
Dagster's public ``ExecutorDefinition.configured``; with ``per_step_mb`` it also caps
concurrency by how many such steps the memory limit holds (admission then orders the rest).
"""

import math
import os
from pathlib import Path
from typing import Any

import dagster as dg

from memsafe_dagster.memory.limits import detect_memory_limits
from memsafe_dagster.memory.sizes import MiB


def _under(root: str, path: str) -> Path:
    return Path(root) / path.lstrip("/")


def _cpu_cgroup(root: str) -> tuple[int, Path, Path] | None:
    """(version, leaf directory, mount point) of this process's CPU cgroup."""
    try:
        text = _under(root, "/proc/self/cgroup").read_text()
    except OSError:
        return None
    v1 = v2 = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "cpu" in parts[1].split(","):
            v1 = parts[2]
    if v1 is not None:
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            mount = _under(root, f"/sys/fs/cgroup/{name}")
            if mount.is_dir():
                leaf = mount / v1.lstrip("/")
                return 1, (leaf if leaf.is_dir() else mount), mount
    if v2 is not None:
        mount = _under(root, "/sys/fs/cgroup")
        leaf = mount / v2.lstrip("/")
        return 2, (leaf if leaf.is_dir() else mount), mount
    return None


def _quota(version: int, directory: Path) -> float | None:
    try:
        if version == 2:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def container_cpus(root: str = "/") -> int:
    """The CPUs this container may use: its cgroup CPU quota rounded up, at most the usable
    CPUs (``os.sched_getaffinity``); the usable CPUs when no quota is set."""
    usable = _usable_cpus()
    found = _cpu_cgroup(root)
    if found is None:
        return usable
    version, leaf, mount = found
    quotas = []
    current = leaf
    while True:
        quota = _quota(version, current)
        if quota is not None:
            quotas.append(quota)
        if current == mount or current.parent == current:
            break
        current = current.parent
    if not quotas:
        return usable
    return max(1, min(usable, math.ceil(min(quotas) - 1e-9)))


def container_max_concurrent(*, per_step_mb: float | None = None, root: str = "/") -> int:
    """How many step processes to run at once here: the CPU quota, and with ``per_step_mb``
    no more than the memory limit holds (at least 1)."""
    count = container_cpus(root)
    if per_step_mb:
        limit_mb = detect_memory_limits(root=root).limit_bytes / MiB
        count = min(count, max(1, int(limit_mb // per_step_mb)))
    return count


def container_executor(
    *,
    per_step_mb: float | None = None,
    max_concurrent: int | None = None,
    root: str = "/",
    **config: Any,
) -> dg.ExecutorDefinition:
    """Dagster's ``multiprocess_executor`` with ``max_concurrent`` from the container.

    Use it as a ``Definitions``' or a job's executor::

        defs = dg.Definitions(assets=[...], executor=container_executor(per_step_mb=1500))

    ``max_concurrent`` overrides the detected figure; further keyword arguments (``retries``,
    ``tag_concurrency_limits``, ``start_method``) go to the executor's config as they are.
    """
    count = (
        max_concurrent
        if max_concurrent is not None
        else container_max_concurrent(per_step_mb=per_step_mb, root=root)
    )
    return dg.multiprocess_executor.configured(
        {"max_concurrent": int(count), **config}, name="memsafe_container_executor"
    )
