"""MemorySampler: the one background thread that samples a MemoryMonitor, shared by all who ask.

Peaks between explicit checks are seen only if something samples in the meantime. Everyone who
wants that (``monitor.sampling()``, the Dagster resource's tracker, the merge guard) asks the
monitor's one sampler for an interval and holds a ``SamplingRequest`` until done. The thread
runs while at least one request is held, at the fastest interval among them, and each of its
samples feeds every window open on the monitor: several users cost one thread, not several.
``cpu_seconds`` is the CPU time of the sampler's threads, so the overhead can be measured.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memsafe_dagster.memory.monitor import MemoryMonitor

THREAD_NAME = "memsafe-sampler"


class SamplingRequest:
    """One user's claim on a sampler, released by ``release()`` or on leaving a ``with`` block."""

    def __init__(self, sampler: MemorySampler, token: int, interval_s: float) -> None:
        self.sampler = sampler
        self.interval_s = interval_s
        self._token: int | None = token

    @property
    def released(self) -> bool:
        return self._token is None

    def release(self) -> None:
        """Give the claim back (idempotent); the thread stops with the last one."""
        token, self._token = self._token, None
        if token is not None:
            self.sampler._release(token)

    def __enter__(self) -> SamplingRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class MemorySampler:
    """Calls ``monitor.sample()`` in one daemon thread while anyone holds a request.

    Each ``MemoryMonitor`` has exactly one, as ``monitor.sampler``. The interval is the
    smallest among the requests held; a faster request takes effect at once, and when it is
    released the thread slows back down to the fastest remaining one.
    """

    def __init__(self, monitor: MemoryMonitor) -> None:
        self.monitor = monitor
        self.samples = 0
        self.cpu_seconds = 0.0
        self._requests: dict[int, float] = {}
        self._tokens = itertools.count()
        self._wake = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None

    # -- state ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def interval_s(self) -> float | None:
        """The period in use now: the fastest request held (None when nobody asks)."""
        with self._wake:
            return min(self._requests.values(), default=None)

    @property
    def users(self) -> int:
        """How many requests are held."""
        with self._wake:
            return len(self._requests)

    # -- requests ---------------------------------------------------------------------------

    def request(self, interval_s: float = 0.1) -> SamplingRequest:
        """Sample at least every ``interval_s`` seconds until the request is released."""
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)):
            raise ValueError(f"interval_s must be a positive number, got {interval_s!r}")
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        with self._wake:
            fastest = min(self._requests.values(), default=None)
            token = next(self._tokens)
            self._requests[token] = float(interval_s)
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._run, args=(self._stop,), name=THREAD_NAME, daemon=True
                )
                self._thread.start()
            elif fastest is not None and interval_s < fastest:
                self._wake.notify_all()  # the thread is waiting out a longer period
        return SamplingRequest(self, token, float(interval_s))

    def _release(self, token: int) -> None:
        with self._wake:
            interval = self._requests.pop(token, None)
            if interval is None or self._requests or self._thread is None:
                return
            thread, stop = self._thread, self._stop
            self._thread = self._stop = None
            stop.set()  # type: ignore[union-attr]
            self._wake.notify_all()
        if thread is not threading.current_thread():
            thread.join(timeout=max(1.0, 5 * interval))

    # -- the thread -------------------------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        last_cpu = time.thread_time()
        while not stop.is_set():
            try:
                self.monitor.sample()
                sampled = 1
            except Exception:  # a failed reading must never kill the sampled work
                sampled = 0
            now_cpu = time.thread_time()
            with self._wake:
                self.samples += sampled
                self.cpu_seconds += now_cpu - last_cpu
                last_cpu = now_cpu
                if stop.is_set():
                    break
                self._wake.wait(min(self._requests.values(), default=0.1))

    def __repr__(self) -> str:
        return (
            f"MemorySampler(running={self.running}, interval_s={self.interval_s}, "
            f"users={self.users}, samples={self.samples})"
        )
