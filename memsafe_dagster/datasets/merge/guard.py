"""The merge's memory guard and progress: one object every phase reports to.

``check(phase)`` reads the pressure level (a few tens of microseconds). WARNING changes nothing
but the release of PyArrow's cached memory (above half the budget, see ``_release_if_grown``):
a merge at steady state often sits just past 70 % of its budget, and serializing or shrinking
there costs time for no memory back (in a merge the row group being written, not the chunk,
dominates). CRITICAL starts no new file while one is in flight, halves the chunks, collects
garbage and returns cached memory to the OS. Files in flight hold slots, oldest first; at
CRITICAL or worse every slot but the oldest waits (without failing) until pressure eases or it
becomes the oldest, so a merge that cannot hold several files at once finishes one file at a
time. EMERGENCY releases memory, rechecks, and raises ``MemoryPressureError`` naming the phase
only in the oldest slot or outside the workers: where one file alone cannot fit.

The guard keeps no figures of its own: it opens a ``PeakWindow`` on the monitor it is given and
asks the monitor's one sampler to sample at least every ``sample_interval_s``, so the merge's
peaks come from the same readings as those of any window around it (a Dagster step's).
"""

from __future__ import annotations

import contextlib
import gc
import math
import threading
import time
from collections.abc import Callable, Iterator

import pyarrow as pa

from memsafe_dagster.memory import (
    MemoryMonitor,
    MemoryPressureError,
    MemoryPressureLevel,
    MemoryReading,
    PeakWindow,
    SamplingRequest,
)
from memsafe_dagster.memory.process import bound_heap, current_rss_bytes
from memsafe_dagster.memory.window import WindowPeaks

NORMAL = MemoryPressureLevel.NORMAL
WARNING = MemoryPressureLevel.WARNING
CRITICAL = MemoryPressureLevel.CRITICAL
EMERGENCY = MemoryPressureLevel.EMERGENCY

ProgressCallback = Callable[[int, int], None]
RELEASE_FRACTION = 0.5
# Smaller chunks save little memory (the row group being written dominates) and cost a lot.
MIN_CHUNK_ROWS = 8_192


class MergeGuard(WindowPeaks):
    """Pressure checks, adaptive chunk sizes, a concurrency limit, the merge's window, progress.

    ``peak_rss_mb``, ``peak_pyarrow_mb`` and ``max_pressure`` are those of the merge's window.
    """

    def __init__(
        self,
        monitor: MemoryMonitor,
        *,
        workers: int,
        chunk_rows: int,
        progress_callback: ProgressCallback | None = None,
        sample_interval_s: float = 0.05,
    ) -> None:
        self.monitor = monitor
        self.workers = workers
        self.requested_rows = chunk_rows
        self._chunk_rows = chunk_rows
        self._calm = 0
        self.window: PeakWindow | None = None
        self.phase = "starting"
        self._callback = progress_callback
        self._done = 0
        self._total = 0
        self._emitted: tuple[int, int] | None = None
        self._progress_lock = threading.Lock()
        self._slots = threading.Condition()
        self._active = 0
        self._interval = sample_interval_s
        self._sampling: SamplingRequest | None = None
        # PyArrow's allocator keeps freed memory for reuse; past RELEASE_FRACTION of the process
        # budget (or of the PyArrow budget) checks hand it back to the OS (about 1 ms).
        budget_mb = monitor.max_process_memory_mb or monitor.max_pyarrow_mb
        self._release_above = int(RELEASE_FRACTION * budget_mb * 2**20) if budget_mb else None
        self._released_at = 0.0
        self._collected = 0.0
        self.min_chunk_rows = min(chunk_rows, MIN_CHUNK_ROWS)
        self._released_at_rss = 0
        self.start_rss = 0
        self._holders: list[int] = []  # threads in slots, oldest first
        self.pauses = 0

    # -- the window -------------------------------------------------------------------------

    def __enter__(self) -> MergeGuard:
        bound_heap()  # large buffers go back to the kernel when freed (memory.process)
        self.window = PeakWindow(self.monitor)
        reading, _level = self.monitor.sample()
        self.start_rss = reading.rss_bytes
        if self._interval > 0:
            self._sampling = self.monitor.sampler.request(self._interval)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sampling is not None:
            self._sampling.release()
            self._sampling = None
        with contextlib.suppress(Exception):
            self.monitor.sample()
        if self.window is not None:
            self.window.close()

    @property
    def max_pressure(self) -> MemoryPressureLevel:
        """The worst level any sample saw during the merge."""
        return self.window.max_pressure if self.window is not None else NORMAL

    @property
    def level(self) -> MemoryPressureLevel:
        """The level of the latest sample (a check's or the background sampler's)."""
        return self.window.last_level if self.window is not None else NORMAL

    # -- checks -----------------------------------------------------------------------------

    def check(self, phase: str) -> MemoryPressureLevel:
        """Read the pressure level and act on it; raises at EMERGENCY (see the module
        docstring: a thread that is not the oldest in a slot waits instead)."""
        self.phase = phase
        reading, level = self.monitor.sample()
        if level >= CRITICAL and self._is_follower():
            reading, level = self._pause_while_pressed(level)
        if self._release_above is not None and reading.rss_bytes > self._release_above:
            self._release_if_grown(reading.rss_bytes)
        if level is EMERGENCY or (level is CRITICAL and time.monotonic() - self._collected > 0.5):
            _release_memory()  # a full collection costs: at most every half second unless dire
            self._collected = time.monotonic()
            reading, level = self.monitor.sample()
            if level is EMERGENCY:
                status = self.monitor.status_of(reading, level, self.window)
                detail = self.monitor.get_detailed_status(self.window)
                raise MemoryPressureError(
                    f"memory pressure EMERGENCY during merge phase '{phase}': {detail}. "
                    f"Nothing was committed; the target is unchanged. {self._advice()}",
                    level=level,
                    status=status,
                )
        self._adapt(level)
        return level

    def _advice(self) -> str:
        """What to change: smaller chunks cannot help when the process was already near its
        budget before the merge read anything, or sat past half of it while PyArrow held little."""
        budget_mb = self.monitor.max_process_memory_mb
        start_mb = self.start_rss / 2**20
        data_mb = self.window.peak_pyarrow_mb if self.window is not None else 0.0
        if budget_mb and (
            start_mb >= 0.75 * budget_mb
            or (start_mb >= 0.5 * budget_mb and data_mb < 0.25 * budget_mb)
        ):
            # The merge's own need is at least what pushed it over; leave it twice that.
            need_mb = max(data_mb, budget_mb - start_mb, 32.0)
            fits_mb = math.ceil((start_mb + 2 * need_mb) / 64) * 64
            return (
                f"The process already used {start_mb:.0f} MB of its {budget_mb:.0f} MB budget "
                "before the merge started (interpreter, libraries, earlier work) and PyArrow "
                f"held {data_mb:.0f} MB at the peak, so smaller chunks will not help: raise the "
                f"memory budget (about {fits_mb} MB would fit)"
            )
        return "Lower merge_chunk_size_rows, or raise the memory budget"

    def _release_if_grown(self, rss: int) -> None:
        """Return PyArrow's cached memory when RSS grew 8 MB since the last time (or 0.2 s
        passed): often enough to hold the peak down, rarely enough to cost nothing."""
        now = time.monotonic()
        if rss - self._released_at_rss < 8 * 2**20 and now - self._released_at < 0.2:
            return
        with contextlib.suppress(Exception):
            pa.default_memory_pool().release_unused()
        self._released_at = now
        self._released_at_rss = current_rss_bytes()

    def _adapt(self, level: MemoryPressureLevel) -> None:
        size = self._chunk_rows
        if level >= CRITICAL:
            self._calm = 0
            self._chunk_rows = max(self.min_chunk_rows, size // 2)
        elif level is WARNING:
            self._calm = 0
        else:
            self._calm += 1
            if self._calm >= 3 and size < self.requested_rows:
                self._chunk_rows = min(self.requested_rows, int(size * 1.25) + 1)
                self._calm = 0
        if level < WARNING:
            with self._slots:
                self._slots.notify_all()

    def bound_chunk_rows(self, rows: int) -> None:
        """Lower the requested chunk size to ``rows`` (wide rows: bytes bound the chunk)."""
        rows = max(1, min(rows, self.requested_rows))
        self.requested_rows = rows
        self._chunk_rows = min(self._chunk_rows, rows)
        self.min_chunk_rows = min(self.min_chunk_rows, rows)

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk now (smaller under pressure, back to the request when calm)."""
        return self._chunk_rows

    @property
    def allowed_workers(self) -> int:
        return 1 if self.level >= CRITICAL else self.workers

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the concurrent-work slots (one only, under pressure)."""
        me = threading.get_ident()
        with self._slots:
            while self._active >= self.allowed_workers:
                self._slots.wait(timeout=0.05)
            self._active += 1
            self._holders.append(me)
        try:
            yield
        finally:
            with self._slots:
                self._active -= 1
                with contextlib.suppress(ValueError):
                    self._holders.remove(me)
                self._slots.notify_all()

    def _is_follower(self) -> bool:
        """True in a slot that is not the oldest one held: it can wait for the leader."""
        me = threading.get_ident()
        with self._slots:
            return me in self._holders and self._holders[0] != me

    def _pause_while_pressed(
        self, level: MemoryPressureLevel
    ) -> tuple[MemoryReading, MemoryPressureLevel]:
        """Serialize: a follower waits while pressure stays CRITICAL or worse and it is not
        the oldest slot, so the work in flight shrinks to one file instead of failing."""
        self.pauses += 1
        _release_memory()
        while True:
            with self._slots:
                self._slots.wait(timeout=0.05)
            reading, level = self.monitor.sample()
            if level < CRITICAL or not self._is_follower():
                return reading, level

    # -- progress ---------------------------------------------------------------------------

    def add_total(self, rows: int) -> None:
        with self._progress_lock:
            self._total += max(0, rows)
            self._emit()

    def set_total(self, rows: int) -> None:
        with self._progress_lock:
            self._total = max(rows, self._done)
            self._emit()

    def advance(self, rows: int) -> None:
        if rows <= 0:
            return
        with self._progress_lock:
            self._done += rows
            self._total = max(self._total, self._done)
            self._emit()

    def finish_progress(self) -> None:
        with self._progress_lock:
            self._total = self._done = max(self._done, self._total)
            self._emit()

    @property
    def done(self) -> int:
        return self._done

    def _emit(self) -> None:
        # Each (done, total) is reported once: a finished phase does not repeat the last figure.
        figures = (self._done, self._total)
        if self._callback is not None and figures != self._emitted:
            self._emitted = figures
            self._callback(*figures)


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        pa.default_memory_pool().release_unused()


def timed(phases: dict[str, float], name: str) -> contextlib.AbstractContextManager[None]:
    """Add the wall time of a block to ``phases[name]``."""

    @contextlib.contextmanager
    def _timer() -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - started

    return _timer()


@contextlib.contextmanager
def merge_memory_pool(choice: str) -> Iterator[str]:
    """Make ``choice`` the default Arrow pool for the block (see ``MergeOptions.memory_pool``);
    yields the backend name in use. A pool this PyArrow build lacks leaves the default."""
    previous = pa.default_memory_pool()
    pool = None
    if choice in ("auto", "jemalloc"):
        with contextlib.suppress(NotImplementedError, AttributeError, pa.ArrowException):
            pool = pa.jemalloc_memory_pool()
            pa.jemalloc_set_decay_ms(100)
    elif choice == "mimalloc":
        with contextlib.suppress(NotImplementedError, AttributeError, pa.ArrowException):
            pool = pa.mimalloc_memory_pool()
    elif choice == "system":
        pool = pa.system_memory_pool()
    if pool is None:
        yield previous.backend_name
        return
    pa.set_memory_pool(pool)
    try:
        yield pool.backend_name
    finally:
        pa.set_memory_pool(previous)
        # Hand the merge's cached memory back: a long-lived process (a Dagster run with
        # several merges) would otherwise carry it into everything that follows.
        with contextlib.suppress(Exception):
            pool.release_unused()
