"""What every phase of a merge shares: the attributes ``MergeEngine`` sets up, helpers that
only need them, and the per-source-row bit sets."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from memsafe_dagster.datasets.commit import DatasetTransaction
from memsafe_dagster.datasets.keys import KeyCodec
from memsafe_dagster.datasets.merge.guard import MergeGuard
from memsafe_dagster.datasets.merge.options import MergeOptions
from memsafe_dagster.datasets.merge.plan import TargetDataset, TargetFile
from memsafe_dagster.datasets.merge.result import MergeResult
from memsafe_dagster.datasets.merge.spill import IpcSpool, Reservoir
from memsafe_dagster.datasets.sink import SettingsProvider

# Bytes of memory per source key while the index is built (codes, positions, sort
# permutation, sorted copies, bitmap, flags); hashed keys add their values twice.
INDEX_BYTES_PER_KEY = 40


class BitSet:
    """A packed bit per source row (matched, dropped as a duplicate)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.bits = np.zeros((n + 7) // 8, dtype=np.uint8)

    def set(self, positions: np.ndarray) -> None:
        if len(positions):
            positions = positions.astype(np.int64, copy=False)
            bit = np.left_shift(np.uint8(1), (positions & 7).astype(np.uint8))
            np.bitwise_or.at(self.bits, positions >> 3, bit)

    def slice(self, start: int, stop: int) -> np.ndarray:
        lo, hi = start >> 3, (stop + 7) >> 3
        bits = np.unpackbits(self.bits[lo:hi], bitorder="little").astype(bool)
        skip = start - (lo << 3)
        return bits[skip : skip + (stop - start)]

    def count(self) -> int:
        if hasattr(np, "bitwise_count"):
            return int(np.bitwise_count(self.bits).sum(dtype=np.int64))
        return int(np.unpackbits(self.bits).sum(dtype=np.int64))


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


class EngineState:
    """The attributes the phase mixins share (``MergeEngine`` sets them) and the helpers that
    need nothing else."""

    target: str
    fs: fsspec.AbstractFileSystem
    afs: pafs.FileSystem
    strategy: str
    keys: tuple[str, ...]
    on_duplicate: str
    streaming: bool
    max_memory_mb: float
    max_process_memory_mb: float | None
    opts: MergeOptions
    workers: int
    cpus: int
    guard: MergeGuard
    result: MergeResult
    phases: dict[str, float]
    schema: pa.Schema
    dataset: TargetDataset
    codec: KeyCodec
    settings: SettingsProvider
    txn: DatasetTransaction
    abort: threading.Event
    pool: ThreadPoolExecutor | None
    replaced: list[TargetFile]
    compacted: list[TargetFile]
    _early_write: Future[None] | None
    _source_written: int
    _name_lock: threading.Lock
    _names: int

    def _background(self, concurrent_tasks: int) -> bool:
        """Whether outputs encode in their own threads (see ``MergeOptions``)."""
        if self.opts.background_writes is not None:
            return self.opts.background_writes
        # With one file at a time (or fewer files than workers) the spare core encodes.
        return self.cpus > 1 and (self.workers == 1 or concurrent_tasks < self.workers)

    def _new_file(self, directory: str, prefix: str) -> str:
        with self._name_lock:
            n = self._names
            self._names += 1
            name = f"{prefix}-{self.txn.txn}-{n:05d}.parquet"
            return self.txn.new_file(f"{directory}/{name}" if directory else name)

    def _index_budget(self) -> int:
        if self.opts.index_memory_mb is not None:
            return int(self.opts.index_memory_mb * 2**20)
        budget = 0.4 * self.max_memory_mb
        if self.max_process_memory_mb:
            budget = min(budget, 0.4 * self.max_process_memory_mb)
        return int(budget * 2**20)
