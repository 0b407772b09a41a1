"""Cheap readings of this process's memory (current RSS, the kernel's RSS high-water mark),
and a heap that hands large blocks back to the kernel.

glibc's malloc serves a large allocation with its own ``mmap`` (returned to the kernel on free)
only above a threshold that it raises, up to 32 MiB, each time such a block is freed: after
the first few multi-MB buffers (s3fs blocks, Python bytes of a file part, PyArrow system
allocations) it serves them from its arenas, where a freed block in the middle of a heap stays
resident. The kernel kills on RSS. ``bound_heap`` pins the threshold at ``MMAP_THRESHOLD``
(``mallopt(M_MMAP_THRESHOLD)``), so large buffers come and go with the kernel; elsewhere
(musl, macOS) it does nothing. ``MEMSAFE_MALLOC_TUNING=0`` leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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


#: Allocations from this size on are mapped (and unmapped on free) by the kernel.
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_bounded: bool | None = None


def bound_heap() -> bool:
    """Pin glibc's mmap threshold at ``MMAP_THRESHOLD`` (once per process; see the module
    docstring); False where it is not glibc or ``MEMSAFE_MALLOC_TUNING=0``."""
    global _bounded
    if _bounded is None:
        _bounded = False
        name = ctypes.util.find_library("c")
        tuning = os.environ.get("MEMSAFE_MALLOC_TUNING", "1") != "0"
        if tuning and sys.platform.startswith("linux") and name:
            try:
                libc = ctypes.CDLL(name)
                libc.gnu_get_libc_version  # noqa: B018  (present in glibc only)
                libc.mallopt.argtypes, libc.mallopt.restype = (
                    [ctypes.c_int, ctypes.c_int],
                    ctypes.c_int,
                )
                _bounded = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            except (OSError, AttributeError):
                _bounded = False
    return _bounded
