"""The memory limit that really applies to this process: env overrides, cgroup v1/v2, physical RAM.

The kernel kills a container when its cgroup crosses ``memory.max`` (v2) or
``memory.limit_in_bytes`` (v1), whatever the host has. So the effective limit is the smallest
of the env overrides, every cgroup ancestor's limit and physical RAM, and "available" means what
this container may still use, not what the host has free.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memsafe_dagster.memory._psutil import psutil
from memsafe_dagster.memory.sizes import MiB, parse_memory_size

log = logging.getLogger(__name__)

ENV_VARS = ("MEMSAFE_MEMORY_LIMIT", "CONTAINER_MEMORY_LIMIT")
# v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 with 4 KiB pages); any
# value this large is a sentinel, not a limit.
_UNLIMITED_THRESHOLD = 1 << 60


@dataclass(frozen=True)
class CgroupLimit:
    """One cgroup on this process's path that sets a memory limit.

    ``hierarchical`` marks a v1 limit known only from the leaf's ``hierarchical_memory_limit``
    (its ancestor is outside this mount namespace), whose usage is read at ``path``.
    """

    path: str
    limit_bytes: int
    hierarchical: bool = False


@dataclass(frozen=True)
class MemoryLimits:
    """Detected limits and which one binds; reads live usage of the process's memory cgroup."""

    limit_bytes: int
    source: str
    physical_bytes: int
    cgroup_version: int | None = None
    cgroup_path: str | None = None
    cgroup_mount: str | None = None
    cgroup_limits: tuple[CgroupLimit, ...] = ()
    env_limits: Mapping[str, int] = field(default_factory=dict)
    root: str = "/"

    @property
    def limit_mb(self) -> float:
        return self.limit_bytes / MiB

    @property
    def cgroup_limit_bytes(self) -> int | None:
        """The smallest limit of any cgroup on the process's path, or None when none is set."""
        return min((c.limit_bytes for c in self.cgroup_limits), default=None)

    def working_set_bytes(self) -> int | None:
        """The process's cgroup usage minus inactive file cache, as the kubelet counts it."""
        if self.cgroup_path is None:
            return None
        return _working_set(self.cgroup_path, self.cgroup_version)

    def host_available_bytes(self) -> int | None:
        """What the host kernel reports as available (MemAvailable)."""
        value = _stat_value(_read_bytes(_under(self.root, "/proc/meminfo")), b"MemAvailable:")
        if value is not None:
            return value * 1024
        if psutil is not None and self.root == "/":
            return int(psutil.virtual_memory().available)
        return None

    def available_bytes(self, process_rss_bytes: int | None = None) -> int:
        """What this process's container may still allocate before the binding limit."""
        return self.usage(process_rss_bytes)[1]

    def usage(self, process_rss_bytes: int | None = None) -> tuple[int | None, int]:
        """(working set, available bytes) in one pass over the cgroup files.

        Under a cgroup limit, available is the limit minus the working set, taken at every
        limited ancestor (siblings share an ancestor's budget) and never more than the host has
        free. Under an env limit, usage is the cgroup's working set when the process sits in a
        non-root cgroup, else the process's own RSS.
        """
        working_set = self.working_set_bytes()
        candidates: list[int] = []
        host = self.host_available_bytes()
        if host is not None:
            candidates.append(host)
        for limited in self.cgroup_limits:
            if limited.path == self.cgroup_path:
                used = working_set
            else:
                used = _working_set(limited.path, self.cgroup_version)
            if used is not None:
                candidates.append(limited.limit_bytes - used)
        if self.source.startswith("env:"):
            used = working_set if self._in_child_cgroup() else None
            if used is None:
                used = process_rss_bytes if process_rss_bytes is not None else 0
            candidates.append(self.limit_bytes - used)
        if not candidates:
            candidates.append(self.limit_bytes - (process_rss_bytes or 0))
        return working_set, max(0, min(candidates))

    def _in_child_cgroup(self) -> bool:
        return self.cgroup_path is not None and self.cgroup_path != self.cgroup_mount

    def describe(self) -> str:
        """One line: "2048.0 MB from cgroup-v2 (/sys/fs/cgroup/kubepods/...)"."""
        where = ""
        if self.source.startswith("cgroup"):
            binding = min(self.cgroup_limits, key=lambda c: c.limit_bytes)
            where = f" ({binding.path})"
        return f"{self.limit_mb:.1f} MB from {self.source}{where}"

    def to_dict(self) -> dict[str, Any]:
        """Stable JSON-ready form (``memsafe status --json``)."""
        return {
            "limit_bytes": self.limit_bytes,
            "limit_mb": round(self.limit_mb, 1),
            "source": self.source,
            "physical_bytes": self.physical_bytes,
            "cgroup_version": self.cgroup_version,
            "cgroup_path": self.cgroup_path,
            "cgroup_limit_bytes": self.cgroup_limit_bytes,
            "cgroup_limits": [
                {"path": c.path, "limit_bytes": c.limit_bytes} for c in self.cgroup_limits
            ],
            "env_limits": dict(self.env_limits),
        }


def detect_memory_limits(env: Mapping[str, str] | None = None, root: str = "/") -> MemoryLimits:
    """Detect the effective memory limit of this process.

    The smallest of: ``MEMSAFE_MEMORY_LIMIT``, ``CONTAINER_MEMORY_LIMIT``, every cgroup
    ancestor's limit, and physical RAM; an env limit binds only when strictly smaller than the
    cgroup's. ``root`` points at a fake ``/proc`` + ``/sys`` tree in tests. Unreadable or
    malformed cgroup files are skipped (debug log); a malformed env value is a ``ValueError``
    naming the variable, because silently ignoring a limit a user set is worse than failing.
    """
    env = os.environ if env is None else env
    env_limits = _env_limits(env)
    physical = _physical_bytes(root)
    version, cgroup_path, mount = _locate_memory_cgroup(root)
    cgroup_limits = _cgroup_limits(cgroup_path, mount, version) if cgroup_path else ()

    # Order matters for ties: the first candidate with the minimal value binds.
    candidates: list[tuple[int, str]] = []
    if cgroup_limits:
        candidates.append((min(c.limit_bytes for c in cgroup_limits), f"cgroup-v{version}"))
    candidates += [(value, f"env:{name}") for name, value in env_limits.items()]
    candidates.append((physical, "physical"))
    limit, source = min(candidates, key=lambda c: c[0])
    return MemoryLimits(
        limit_bytes=limit,
        source=source,
        physical_bytes=physical,
        cgroup_version=version,
        cgroup_path=cgroup_path,
        cgroup_mount=mount,
        cgroup_limits=cgroup_limits,
        env_limits=env_limits,
        root=root,
    )


def _env_limits(env: Mapping[str, str]) -> dict[str, int]:
    limits: dict[str, int] = {}
    for name in ENV_VARS:
        raw = env.get(name)
        if raw is None or not str(raw).strip():
            continue
        try:
            value = parse_memory_size(raw)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if value <= 0:
            raise ValueError(f"{name}: memory limit must be positive, got {raw!r}")
        limits[name] = value
    return limits


def _physical_bytes(root: str) -> int:
    total_kb = _stat_value(_read_bytes(_under(root, "/proc/meminfo")), b"MemTotal:")
    if total_kb:
        return total_kb * 1024
    if psutil is not None:
        return int(psutil.virtual_memory().total)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        log.debug("physical memory unknown; assuming 4 GiB")
        return 4 * 1024**3


def _locate_memory_cgroup(root: str) -> tuple[int | None, str | None, str | None]:
    """(version, directory, mount point) of this process's memory cgroup, or Nones."""
    text = _read_text(_under(root, "/proc/self/cgroup"))
    if not text:
        return None, None, None
    v1_path = v2_path = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            log.debug("skipping malformed /proc/self/cgroup line %r", line)
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    mounts = _cgroup_mounts(root)
    # A hybrid host mounts the memory controller on v1 and an empty v2 hierarchy: v1 wins.
    if v1_path is not None:
        mount = mounts.get(1) or ("/", _under(root, "/sys/fs/cgroup/memory"))
        return 1, _resolve(mount, v1_path), os.path.normpath(mount[1])
    if v2_path is not None:
        default_mount = _under(root, "/sys/fs/cgroup")
        if not os.path.exists(os.path.join(default_mount, "cgroup.controllers")):
            unified = _under(root, "/sys/fs/cgroup/unified")
            default_mount = unified if os.path.isdir(unified) else default_mount
        mount = mounts.get(2) or ("/", default_mount)
        return 2, _resolve(mount, v2_path), os.path.normpath(mount[1])
    return None, None, None


def _cgroup_mounts(root: str) -> dict[int, tuple[str, str]]:
    """{version: (mount root inside the hierarchy, mount point)} from /proc/self/mountinfo."""
    mounts: dict[int, tuple[str, str]] = {}
    text = _read_text(_under(root, "/proc/self/mountinfo"))
    for line in (text or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 1:
            continue
        fstype, superopts = tail[0], (tail[2] if len(tail) > 2 else "")
        if fstype == "cgroup2" and 2 not in mounts:
            mounts[2] = (fields[3], _under(root, fields[4]))
        elif fstype == "cgroup" and "memory" in superopts.split(",") and 1 not in mounts:
            mounts[1] = (fields[3], _under(root, fields[4]))
    return mounts


def _resolve(mount: tuple[str, str], cgroup_path: str) -> str:
    mount_root, mount_point = mount
    mount_root = mount_root.rstrip("/") or ""
    if cgroup_path == mount_root or cgroup_path.startswith(mount_root + "/"):
        relative = cgroup_path[len(mount_root) :]
    else:
        relative = cgroup_path
    candidate = os.path.normpath(os.path.join(mount_point, relative.lstrip("/")))
    if os.path.isdir(candidate) and candidate.startswith(os.path.normpath(mount_point)):
        return candidate
    # A container without its own cgroup namespace sees the host path in /proc/self/cgroup
    # but has its own cgroup mounted at the mount point.
    return os.path.normpath(mount_point)


def _cgroup_limits(
    cgroup_path: str, mount: str | None, version: int | None
) -> tuple[CgroupLimit, ...]:
    """Every limit set on the cgroup path, from the leaf up to the mount point."""
    limits: list[CgroupLimit] = []
    name = "memory.max" if version == 2 else "memory.limit_in_bytes"
    current = Path(cgroup_path)
    top = Path(mount or cgroup_path)
    while True:
        value = _read_limit(current / name)
        if value is not None:
            limits.append(CgroupLimit(str(current), value))
        if current == top or current.parent == current:
            break
        current = current.parent
    if version == 1:
        # The kernel's own view of the smallest ancestor limit, including ancestors that are
        # outside this mount namespace.
        stat = _read_stat(Path(cgroup_path) / "memory.stat")
        hierarchical = stat.get("hierarchical_memory_limit")
        if (
            hierarchical is not None
            and hierarchical < _UNLIMITED_THRESHOLD
            and all(hierarchical < c.limit_bytes for c in limits)
        ):
            limits.append(CgroupLimit(cgroup_path, hierarchical, hierarchical=True))
    return tuple(limits)


def _read_limit(path: Path) -> int | None:
    text = _read_text(str(path))
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        log.debug("skipping malformed cgroup limit %s: %r", path, text[:40])
        return None
    if value <= 0 or value >= _UNLIMITED_THRESHOLD:
        return None
    return value


def _working_set(cgroup_path: str, version: int | None) -> int | None:
    # Called on every pressure check: raw bytes and a targeted lookup, no full parse.
    usage_name = "memory.current" if version == 2 else "memory.usage_in_bytes"
    raw = _read_bytes(f"{cgroup_path}/{usage_name}")
    try:
        usage = int(raw) if raw else None
    except ValueError:
        log.debug("skipping malformed usage in %s", cgroup_path)
        return None
    if usage is None:
        return None
    key = b"inactive_file" if version == 2 else b"total_inactive_file"
    inactive = _stat_value(_read_bytes(f"{cgroup_path}/memory.stat"), key) or 0
    return max(0, usage - inactive)


def _read_bytes(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 1 << 16)
    except OSError:
        return None
    finally:
        os.close(fd)


def _stat_value(data: bytes | None, key: bytes) -> int | None:
    """The integer after ``key`` at the start of a line of ``data`` (memory.stat, meminfo)."""
    if not data:
        return None
    at = 0 if data.startswith(key) else data.find(b"\n" + key) + 1
    if at == 0 and not data.startswith(key):
        return None
    end = data.find(b"\n", at)
    fields = data[at + len(key) : end if end >= 0 else None].split()
    try:
        return int(fields[0])
    except (IndexError, ValueError):
        return None


def _read_stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read_text(str(path)) or "").splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None


def _under(root: str, absolute: str) -> str:
    if root in ("", "/"):
        return absolute
    return os.path.join(root, absolute.lstrip("/"))
