"""MergeRun: what the phases of one merge share, passed to each phase explicitly.

The phases (``ingest``, ``matching``, ``rewrite``) are functions of a ``MergeRun`` and of the
results of the phases before them; nothing is handed from phase to phase through attributes set
on the side. A run holds the request and the budget (read-only), the target as its footers
describe it, the guard every phase reports to, the transaction new files are staged in, and the
thread pool files are processed on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from memsafe_dagster.datasets.keys import KeyCodec
from memsafe_dagster.datasets.merge.bits import BitSet
from memsafe_dagster.datasets.merge.budget import MergeBudget
from memsafe_dagster.datasets.merge.guard import MergeGuard
from memsafe_dagster.datasets.merge.request import MergeRequest
from memsafe_dagster.datasets.merge.spill import IpcSpool, Reservoir
from memsafe_dagster.datasets.merge.store import MergeTarget, TargetWrite
from memsafe_dagster.datasets.merge.strategy import StrategyRule
from memsafe_dagster.datasets.merge.target import TargetDataset
from memsafe_dagster.datasets.sink import SettingsProvider

Task = Callable[[], None]


@dataclass
class Ingested:
    """What ingesting the source produced: its row count and its key codes (in memory or
    spilled), and the spooled rows when they must be read twice."""

    rows: int = 0
    codes: list[np.ndarray] = field(default_factory=list)
    keys: list[pa.Table] = field(default_factory=list)
    key_spill: IpcSpool | None = None
    row_spool: IpcSpool | None = None
    reservoir: Reservoir = field(default_factory=Reservoir)
    index_bytes: int = 0

    @property
    def spilled(self) -> bool:
        return self.key_spill is not None


@dataclass
class Matched:
    """What matching found: source rows whose key is in the target, source rows dropped as
    duplicates, and how the target was read (the target files carry their own marks)."""

    source: BitSet
    dropped: BitSet
    key_passes: int = 1
    files_pruned: int = 0
    row_groups_pruned: int = 0

    @classmethod
    def for_source(cls, rows: int) -> Matched:
        """No marks yet, for a source of ``rows`` rows."""
        return cls(source=BitSet(rows), dropped=BitSet(rows))

    @property
    def source_matched(self) -> int:
        return self.source.count()

    @property
    def source_dropped(self) -> int:
        return self.dropped.count()


@dataclass
class MergeRun:
    """One merge in progress (see the module docstring)."""

    request: MergeRequest
    budget: MergeBudget
    target: MergeTarget
    guard: MergeGuard
    write: TargetWrite
    dataset: TargetDataset
    schema: pa.Schema
    codec: KeyCodec
    settings: SettingsProvider
    workers: int
    cpus: int
    phases: dict[str, float]
    pool: ThreadPoolExecutor | None = None
    abort: threading.Event = field(default_factory=threading.Event)
    _names: int = 0
    _name_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def afs(self) -> pafs.FileSystem:
        """Where target files are read and new files are written."""
        return self.target.afs

    @property
    def rule(self) -> StrategyRule:
        return self.request.rule

    @property
    def keys(self) -> tuple[str, ...]:
        return self.request.keys

    def new_file(self, directory: str, prefix: str) -> str:
        """A staging path for a new data file ``<directory>/<prefix>-<txn>-NNNNN.parquet``."""
        with self._name_lock:
            n = self._names
            self._names += 1
        name = f"{prefix}-{self.write.txn}-{n:05d}.parquet"
        return self.write.new_file(f"{directory}/{name}" if directory else name)

    def background_writes(self, concurrent_tasks: int) -> bool:
        """Whether outputs encode in their own threads (see ``MergeOptions.background_writes``):
        with one file at a time, or fewer files than workers, the spare core encodes."""
        if self.request.options.background_writes is not None:
            return self.request.options.background_writes
        return self.cpus > 1 and (self.workers == 1 or concurrent_tasks < self.workers)

    def run_tasks(self, tasks: list[tuple[int, Task]]) -> None:
        """Run weighted ``tasks`` on the pool, heaviest first (so both cores stay busy to the
        end); the first failure cancels the rest and is raised."""
        if not tasks:
            return
        ordered = [task for _, task in sorted(tasks, key=lambda t: -t[0])]
        if self.pool is None or len(ordered) == 1:
            for task in ordered:
                task()
            return
        futures: list[Future[None]] = [self.pool.submit(task) for task in ordered]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            self.abort.set()
            for f in pending:
                f.cancel()
            wait(pending)
            raise failed[0].exception()  # type: ignore[misc]
