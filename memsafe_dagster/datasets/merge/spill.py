"""Spill files: source rows the merge must read twice, and key runs too large for memory.

Both are Arrow IPC streams (lz4) on a local disk, written and read a batch at a time. They live
in the transaction's staging directory when the target is local (so recovery removes what a
crash leaves), else in a private temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


class SpillDir:
    """A local directory for spill files, removed on ``cleanup``."""

    def __init__(self, base: str | None) -> None:
        if base is not None:
            os.makedirs(base, exist_ok=True)
            self.path = base
        else:
            self.path = tempfile.mkdtemp(prefix="memsafe-merge-")
        self._count = 0

    def new_path(self, name: str) -> str:
        self._count += 1
        return os.path.join(self.path, f"{name}-{self._count:04d}.arrows")

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class IpcSpool:
    """Append tables of one schema to a local IPC stream, then read them back in order."""

    def __init__(self, path: str, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.rows = 0
        self._sink = pa.OSFile(path, "wb")
        self._writer: pa.ipc.RecordBatchStreamWriter | None = pa.ipc.new_stream(
            self._sink, schema, options=_IPC_OPTIONS
        )

    def write(self, table: pa.Table) -> None:
        assert self._writer is not None, "spool already closed for writing"
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None

    def read(self) -> Iterator[pa.RecordBatch]:
        """The spooled batches in order (one at a time in memory)."""
        self.finish()
        with pa.OSFile(self.path, "rb") as fh:
            reader = pa.ipc.open_stream(fh)
            yield from reader

    def remove(self) -> None:
        self.finish()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


class Reservoir:
    """A uniform sample of up to ``size`` uint64 codes from a stream (for pass boundaries)."""

    def __init__(self, size: int = 65_536, seed: int = 1) -> None:
        self.size = size
        self.sample = np.zeros(0, dtype=np.uint64)
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def add(self, codes: np.ndarray) -> None:
        n = len(codes)
        if n == 0:
            return
        room = self.size - len(self.sample)
        if room > 0:
            self.sample = np.concatenate([self.sample, codes[:room]])
            codes = codes[room:]
            self.seen += min(room, n)
        if len(codes) == 0:
            return
        # Algorithm R, vectorized: item i (0-based over the stream) replaces a random slot with
        # probability size / (i + 1).
        idx = np.arange(self.seen, self.seen + len(codes), dtype=np.float64)
        take = self._rng.random(len(codes)) < self.size / (idx + 1)
        chosen = codes[take]
        if len(chosen):
            slots = self._rng.integers(0, self.size, len(chosen))
            self.sample[slots] = chosen
        self.seen += len(codes)

    def splitters(self, parts: int) -> list[int]:
        """``parts - 1`` increasing code boundaries that cut the sample into even parts."""
        if parts <= 1 or len(self.sample) == 0:
            return []
        ordered = np.sort(self.sample)
        cuts = [int(ordered[(len(ordered) * i) // parts]) for i in range(1, parts)]
        return sorted(set(c for c in cuts if c > 0))
