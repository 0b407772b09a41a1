"""Admission: memory reserved across every step process of one container before heavy work.

Protocol. All processes in one memory cgroup share one ledger file (its path derives from the
cgroup directory, so steps of one container meet and other containers do not; override it with
``MEMSAFE_ADMISSION_LEDGER`` or ``ledger_path=``). The file is a JSON list of reservations, each
``{pid, start, reserved_mb, baseline_mb, label, since}``; every read-modify-write happens under
an exclusive ``fcntl.flock`` on the file itself, so check-and-reserve is atomic across processes.

A reservation belongs to the process ``pid`` whose kernel start time (``/proc/<pid>/stat``
field 22) is ``start``; one whose process is gone or whose pid was reused is dropped at the next
read. So a step that is SIGKILLed (the OOM killer) leaks nothing beyond that read.

A step asking for ``need_mb`` (its expected peak minus what its process already holds) is
admitted when ``need_mb <= limit - working set - outstanding``, where ``outstanding`` sums, over
the other live reservations, what each has not yet used (its reservation minus its process's
RSS growth since it reserved): memory a step already touches is in the working set and must not
be counted twice. While that does not hold, it waits (polling, the lock released between
polls) and reports why through ``on_wait``; after ``timeout_s`` it raises ``AdmissionTimeout``.
A step that finds no other reservation is admitted even when it does not fit, since waiting
cannot help it (its own memory guard stops it cleanly if it outgrows the limit).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memsafe_dagster.memory.limits import MemoryLimits, detect_memory_limits
from memsafe_dagster.memory.process import current_rss_bytes
from memsafe_dagster.memory.sizes import MiB

LEDGER_ENV = "MEMSAFE_ADMISSION_LEDGER"
#: Without metadata or history, a step reserves this share of the limit ...
DEFAULT_RESERVATION_FRACTION = 0.25
#: ... but never more than this many MB.
DEFAULT_RESERVATION_CAP_MB = 512.0
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class AdmissionTimeout(RuntimeError):
    """The step waited ``timeout_s`` and the container never had room for its reservation."""

    def __init__(self, message: str, *, need_mb: float, state: AdmissionState) -> None:
        super().__init__(message)
        self.need_mb = need_mb
        self.state = state


@dataclass(frozen=True)
class AdmissionState:
    """What the ledger and the cgroup said at one check."""

    limit_mb: float
    working_set_mb: float
    others: int
    others_reserved_mb: float
    others_outstanding_mb: float

    @property
    def available_mb(self) -> float:
        return self.limit_mb - self.working_set_mb - self.others_outstanding_mb

    def waiting_message(self, need_mb: float) -> str:
        """ "waiting for 450 MB: 2 steps hold 900 MB of 1,200 MB" (plus the free figure)."""
        steps = "step holds" if self.others == 1 else "steps hold"
        return (
            f"waiting for {need_mb:,.0f} MB: {self.others} {steps} {self.others_reserved_mb:,.0f}"
            f" MB of {self.limit_mb:,.0f} MB ({max(self.available_mb, 0):,.0f} MB available "
            f"after the working set of {self.working_set_mb:,.0f} MB and their unused "
            "reservations)"
        )


@dataclass(frozen=True)
class Reservation:
    """A granted reservation: how much, after how long, with what the ledger said then."""

    reserved_mb: float
    wait_s: float
    state: AdmissionState
    ledger_path: str
    waited: bool


def default_ledger_path(limits: MemoryLimits) -> str:
    """The ledger of this container: env override, else one file per memory cgroup."""
    override = os.environ.get(LEDGER_ENV)
    if override:
        return override
    where = limits.cgroup_path or "no-cgroup"
    ident = where
    with contextlib.suppress(OSError):
        st = os.stat(where)
        ident = f"{where}:{st.st_dev}:{st.st_ino}"
    digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return os.path.join(base or tempfile.gettempdir(), f"memsafe-admission-{digest}.json")


def default_reservation_mb(limit_mb: float) -> float:
    """The documented default expected increment: 25 % of the limit, at most 512 MB."""
    return min(limit_mb * DEFAULT_RESERVATION_FRACTION, DEFAULT_RESERVATION_CAP_MB)


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` in clock ticks (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    try:
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE / MiB
    except (OSError, ValueError, IndexError):
        return None


class AdmissionLedger:
    """The container-wide ledger of memory reservations (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        limits: MemoryLimits | None = None,
        poll_interval_s: float = 0.2,
    ) -> None:
        self.limits = limits if limits is not None else detect_memory_limits()
        self.path = str(path) if path is not None else default_ledger_path(self.limits)
        self.poll_interval_s = poll_interval_s

    # -- the file ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        with os.fdopen(fd, "r+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                fh.seek(0)
                text = fh.read()
                try:
                    entries = json.loads(text) if text.strip() else []
                except ValueError:
                    entries = []
                if not isinstance(entries, list):
                    entries = []
                live = [e for e in entries if _alive(e)]
                yield fh, live
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _write(fh: Any, entries: list[dict[str, Any]]) -> None:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(entries))
        fh.flush()

    def reservations(self) -> list[dict[str, Any]]:
        """The live reservations (dead processes' entries are dropped, and the file rewritten)."""
        with self._locked() as (fh, live):
            self._write(fh, live)
            return list(live)

    # -- the decision -----------------------------------------------------------------------

    def state(
        self, entries: list[dict[str, Any]], *, exclude_pid: int | None = None
    ) -> AdmissionState:
        """The limit, the cgroup's working set and the other reservations' figures."""
        working_set, _available = self.limits.usage(current_rss_bytes())
        if working_set is None:
            working_set = current_rss_bytes()
        others = [e for e in entries if e.get("pid") != exclude_pid]
        outstanding = 0.0
        for entry in others:
            rss = _rss_mb(int(entry["pid"]))
            used = max(0.0, (rss if rss is not None else 0.0) - float(entry.get("baseline_mb", 0)))
            outstanding += max(0.0, float(entry["reserved_mb"]) - used)
        return AdmissionState(
            limit_mb=self.limits.limit_bytes / MiB,
            working_set_mb=working_set / MiB,
            others=len(others),
            others_reserved_mb=sum(float(e["reserved_mb"]) for e in others),
            others_outstanding_mb=outstanding,
        )

    def try_reserve(self, need_mb: float, *, label: str = "") -> tuple[bool, AdmissionState]:
        """Reserve ``need_mb`` for this process if it fits now (atomic across processes)."""
        pid = os.getpid()
        with self._locked() as (fh, live):
            state = self.state(live, exclude_pid=pid)
            fits = need_mb <= state.available_mb or state.others == 0
            if fits:
                live = [e for e in live if e.get("pid") != pid]
                live.append(
                    {
                        "pid": pid,
                        "start": process_start_time(pid),
                        "reserved_mb": round(float(need_mb), 3),
                        "baseline_mb": round(current_rss_bytes() / MiB, 3),
                        "label": label,
                        "since": time.time(),
                    }
                )
            self._write(fh, live)
            return fits, state

    def reserve(
        self,
        need_mb: float,
        *,
        label: str = "",
        timeout_s: float = 600.0,
        on_wait: Callable[[AdmissionState], None] | None = None,
        report_every_s: float = 10.0,
    ) -> Reservation:
        """Wait until ``need_mb`` fits, then reserve it; ``AdmissionTimeout`` after ``timeout_s``.

        ``on_wait`` is called at the first refusal and then every ``report_every_s``.
        """
        started = time.monotonic()
        last_report = None
        waited = False
        while True:
            fits, state = self.try_reserve(need_mb, label=label)
            now = time.monotonic()
            if fits:
                return Reservation(need_mb, now - started, state, self.path, waited)
            waited = True
            if now - started >= timeout_s:
                raise AdmissionTimeout(
                    f"gave up after {now - started:.0f} s {state.waiting_message(need_mb)}",
                    need_mb=need_mb,
                    state=state,
                )
            if on_wait is not None and (last_report is None or now - last_report >= report_every_s):
                on_wait(state)
                last_report = now
            time.sleep(self.poll_interval_s)

    def release(self, pid: int | None = None) -> None:
        """Drop the reservation of ``pid`` (default: this process)."""
        pid = os.getpid() if pid is None else pid
        with self._locked() as (fh, live):
            self._write(fh, [e for e in live if e.get("pid") != pid])


def _alive(entry: Any) -> bool:
    if not isinstance(entry, dict) or "pid" not in entry or "reserved_mb" not in entry:
        return False
    try:
        pid = int(entry["pid"])
    except (TypeError, ValueError):
        return False
    start = process_start_time(pid)
    return start is not None and start == entry.get("start")


def expected_increment_mb(
    *,
    expected_peak_mb: float | None,
    history_increments_mb: list[float] | None,
    baseline_mb: float,
    limit_mb: float,
    percentile: float = 0.9,
    margin: float = 0.2,
) -> tuple[float, str]:
    """(MB to reserve, where the figure came from) for a step whose process holds
    ``baseline_mb`` now.

    ``expected_peak_mb`` is a peak RSS of the step's process (as ``memsafe/peak_rss_mb``
    records it): the reservation is that peak minus the baseline. History gives increments
    (``memsafe/step_rss_mb``): their ``percentile`` plus ``margin``. Else the default.
    """
    if expected_peak_mb is not None:
        return max(0.0, float(expected_peak_mb) - baseline_mb), "metadata"
    values = sorted(float(p) for p in (history_increments_mb or []) if p is not None)
    if values:
        index = min(len(values) - 1, round(percentile * (len(values) - 1)))
        return max(0.0, values[index] * (1 + margin)), "history"
    return default_reservation_mb(limit_mb), "default"
