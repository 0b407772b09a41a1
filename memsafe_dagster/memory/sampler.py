"""A daemon thread that samples a MemoryMonitor so peaks between explicit checks are kept."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memsafe_dagster.memory.monitor import MemoryMonitor


class MemorySampler:
    """Calls ``monitor.sample()`` every ``interval_s`` seconds until stopped.

    Usable as a context manager. ``cpu_seconds`` is the thread's own CPU time, so its overhead
    can be measured rather than guessed.
    """

    def __init__(self, monitor: MemoryMonitor, interval_s: float = 0.1) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        self.monitor = monitor
        self.interval_s = interval_s
        self.samples = 0
        self.cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> MemorySampler:
        if self.running:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="memsafe-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 5 * self.interval_s))
            self._thread = None

    def _run(self) -> None:
        start_cpu = time.thread_time()
        while not self._stop.is_set():
            try:
                self.monitor.sample()
                self.samples += 1
            except Exception:  # a failed reading must never kill the sampled work
                pass
            self.cpu_seconds = time.thread_time() - start_cpu
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
