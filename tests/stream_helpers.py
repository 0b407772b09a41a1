"""Shared pieces for the streaming tests: a scripted pressure source and small Parquet data."""

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from memory_helpers import fixed_limits

from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel

MiB = 1024 * 1024
NORMAL = MemoryPressureLevel.NORMAL
WARNING = MemoryPressureLevel.WARNING
CRITICAL = MemoryPressureLevel.CRITICAL
EMERGENCY = MemoryPressureLevel.EMERGENCY

SCHEMA = pa.schema([("id", pa.int64()), ("x", pa.float64()), ("status", pa.string())])


class ScriptedMonitor(MemoryMonitor):
    """A MemoryMonitor whose pressure levels come from a script, one per check.

    When the script runs out the last level repeats. ``checks`` counts calls; ``levels_seen``
    records what each returned. Everything else (status, peaks) is the real monitor's.
    """

    def __init__(self, levels: Iterable[MemoryPressureLevel], **kwargs: object) -> None:
        kwargs.setdefault("limits", fixed_limits(8192))
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.script = list(levels)
        self.checks = 0
        self.levels_seen: list[MemoryPressureLevel] = []

    def check_memory_pressure(self) -> MemoryPressureLevel:
        index = min(self.checks, len(self.script) - 1)
        level = self.script[index] if self.script else NORMAL
        self.checks += 1
        self.levels_seen.append(level)
        self.sample()  # keep peaks real
        return level


def table(rows: int, start: int = 0) -> pa.Table:
    ids = np.arange(start, start + rows, dtype=np.int64)
    status = np.where(ids % 3 == 0, "active", "inactive")
    return pa.table({"id": ids, "x": ids * 0.5, "status": status}, schema=SCHEMA)


def write_files(
    directory: Path, files: int, rows_per_file: int, row_group_size: int = 10_000
) -> Path:
    """``files`` Parquet files with consecutive ids, ``rows_per_file`` rows each."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        pq.write_table(
            table(rows_per_file, i * rows_per_file),
            directory / f"part-{i:03d}.parquet",
            row_group_size=row_group_size,
        )
    return directory


def ids_of(chunks: Iterable[pa.Table]) -> list[int]:
    out: list[int] = []
    for chunk in chunks:
        out.extend(chunk.column("id").to_pylist())
    return out
