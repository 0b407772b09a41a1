"""Cheap readings of this process's memory: current RSS and the kernel's RSS high-water mark."""

from __future__ import annotations

import os
import resource
import sys

from memsafe_dagster.memory._psutil import psutil

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size now; /proc/self/statm (about 5 us) before psutil before getrusage."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            return int(os.read(fd, 256).split()[1]) * _PAGE
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError):
        pass
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    return peak_rss_bytes() or 0


def peak_rss_bytes() -> int | None:
    """The kernel's lifetime high-water mark of RSS (VmHWM), exact even between samples."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024) or None
