"""PyArrow files backed by Python objects (fsspec files of object stores), let go of before exit.

A PyArrow scan over a ``PyFileSystem`` (an fsspec filesystem such as s3fs) can drop its last
reference to a file after the scan has returned, on one of PyArrow's worker threads: the
scanner's read-ahead state is disposed there once its last callback ran. Dropping a Python
object needs the GIL; when that happens while the interpreter is finalizing, Python ends the
worker thread with ``pthread_exit``, whose forced unwind through PyArrow's C++ frames calls
``std::terminate``: a script that read from S3 and printed its result dies with SIGABRT
("terminate called without an active exception", exit code 134), in a few percent of runs
(apache/arrow#39162, #34314).

So every Python object memsafe hands to PyArrow as a file goes through ``python_file``, which
keeps a weak reference to it, and an ``atexit`` hook (it runs before finalization, while
threads may still take the GIL) waits until PyArrow has let go of all of them: the hook sleeps
in short steps, which releases the GIL to the worker that disposes of the scan. It stops as
soon as none is left, or when the count has not moved for ``SETTLE_S`` (a file the program
itself still holds open is released later, on the main thread, which is safe).
"""

from __future__ import annotations

import atexit
import gc
import threading
import time
import weakref
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs

#: How long no file may be opened or dropped before the exit hook ends, once none is held.
QUIET_S = 0.05
#: How long the exit hook waits for the count of open files to move before it gives up.
SETTLE_S = 0.5
#: The longest the exit hook waits in all.
MAX_WAIT_S = 5.0

_open: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False
_created = 0  # files handed out so far: a new one means a scan is still at work


def python_file(obj: Any, mode: str = "r") -> pa.PythonFile:
    """``pa.PythonFile(obj, mode)``, with ``obj`` tracked until PyArrow lets go of it."""
    global _registered, _created
    with _lock:
        _open.add(obj)
        _created += 1
        if not _registered:
            atexit.register(wait_for_release)
            _registered = True
    return pa.PythonFile(obj, mode=mode)


def open_count() -> int:
    """How many tracked Python files PyArrow (or anyone) still holds."""
    return len(_open)


def wait_for_release(
    quiet_s: float = QUIET_S, settle_s: float = SETTLE_S, max_wait_s: float = MAX_WAIT_S
) -> int:
    """Wait until PyArrow has dropped every tracked file and opened none for ``quiet_s`` (a
    scan's read-ahead may still open one after the scan returned; see the module docstring);
    returns how many are still held."""
    gc.collect()
    start = time.monotonic()
    state = (open_count(), _created)
    since = start
    while time.monotonic() - start < max_wait_s:
        time.sleep(0.005)  # releases the GIL to the worker disposing of a scan
        now = (open_count(), _created)
        if now != state:
            state, since = now, time.monotonic()
        elif time.monotonic() - since >= (quiet_s if state[0] == 0 else settle_s):
            break
    return state[0]


class TrackedFSSpecHandler(pafs.FSSpecHandler):
    """``pyarrow.fs.FSSpecHandler`` whose files are ``python_file``s."""

    def open_input_stream(self, path: str) -> pa.PythonFile:
        if not self.fs.isfile(path):
            raise FileNotFoundError(path)
        return python_file(self.fs.open(path, mode="rb"), mode="r")

    def open_input_file(self, path: str) -> pa.PythonFile:
        if not self.fs.isfile(path):
            raise FileNotFoundError(path)
        return python_file(self.fs.open(path, mode="rb"), mode="r")

    def open_output_stream(self, path: str, metadata: dict[str, str]) -> pa.PythonFile:
        return python_file(self.fs.open(path, mode="wb"), mode="w")

    def open_append_stream(self, path: str, metadata: dict[str, str]) -> pa.PythonFile:
        return python_file(self.fs.open(path, mode="ab"), mode="w")


def wrap(fs: fsspec.AbstractFileSystem) -> pafs.PyFileSystem:
    """A PyArrow filesystem over the fsspec filesystem ``fs`` (``TrackedFSSpecHandler``)."""
    return pafs.PyFileSystem(TrackedFSSpecHandler(fs))
